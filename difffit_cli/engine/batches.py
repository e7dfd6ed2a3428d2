"""What each training step sees, as a pure function of (seed, step, process).

Exactness on resume comes from one rule: every random draw of optimizer step s on process r is a
function of (seed, s, r). The data order is a per-epoch permutation seeded by (seed, epoch); the
flips, latent noise, timesteps and diffusion noise come from a generator seeded by (seed, s, r);
the global torch RNG (the model's label dropout) is re-seeded from the same triple each step. So a
checkpoint needs only the step, and a run resumed from step 20 draws exactly what an uninterrupted
run draws.

`--batch-size` is the global batch of one optimizer step; each of P processes takes its own slice
of it (batch / (P * grad_accum) per micro-step), so results do not depend on how many GPUs ran them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from difffit_cli.engine.errors import DiffFitError
from difffit_cli.engine.latents import CachedLatents, EncodedLatents


def step_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class DataOrder:
    """An endless stream of dataset indices: epoch e is a permutation seeded by (seed, e)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            g = torch.Generator().manual_seed(step_seed(self.seed, epoch, 0x0D47A))
            self._perms[epoch] = torch.randperm(self.n, generator=g)
        return self._perms[epoch]

    def take(self, start: int, count: int) -> torch.Tensor:
        """Stream positions start .. start+count-1."""
        positions = torch.arange(start, start + count)
        out = torch.empty(count, dtype=torch.long)
        for epoch in positions.div(self.n, rounding_mode="floor").unique().tolist():
            mask = positions // self.n == epoch
            out[mask] = self._perm(epoch)[positions[mask] % self.n]
        return out


@dataclass(frozen=True)
class Split:
    """How one optimizer step's global batch splits over processes and accumulation micro-steps."""

    batch_size: int
    grad_accum: int
    rank: int
    world: int

    @property
    def per_process(self) -> int:
        per_process, rest = divmod(self.batch_size, self.world * self.grad_accum)
        if rest or not per_process:
            raise DiffFitError(
                f"--batch-size {self.batch_size} does not split evenly over {self.world} process(es) x "
                f"--grad-accum {self.grad_accum}.", hint="Use a multiple of their product as the batch size.")
        return per_process

    def start(self, step: int, micro: int) -> int:
        """The data-stream position of this process's slice of micro-step `micro` of `step`."""
        return step * self.batch_size + (micro * self.world + self.rank) * self.per_process


class Batches:
    """Micro-batches (latents x0, labels) for the training loop, drawn from cached or encoded latents."""

    def __init__(self, latents: CachedLatents | EncodedLatents, labels: list[int], latent_shape: tuple[int, ...],
                 split: Split, seed: int, device: torch.device):
        self.latents, self.labels = latents, torch.tensor(labels)
        self.latent_shape, self.split, self.device = latent_shape, split, device
        self.order = DataOrder(len(labels), seed)

    def micro_batch(self, step: int, micro: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.split.per_process
        index = self.order.take(self.split.start(step, micro), n)
        flips = torch.randint(0, 2, (n,), generator=g)
        latent_noise = torch.randn((n, *self.latent_shape), generator=g)
        x0 = self.latents.draw(index, flips, latent_noise, self.device)
        return x0, self.labels[index].to(self.device)
