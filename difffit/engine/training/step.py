"""Per-step state of the training loop that lives on the device: its random draws and its loss sums.

No host sync per step: timesteps and noise come from a device generator seeded by (seed, step), so
nothing is copied to the GPU and a resumed run draws exactly what an uninterrupted one does; the loss
sums accumulate on the device and are read (and checked for finiteness) every `log_every` steps, so a
NaN stop can lag by up to that many steps (checkpoints flush first, so a checkpoint never follows an
undetected NaN).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch

from difffit.engine.data.batches import step_seed

if TYPE_CHECKING:
    from difffit.engine.models.family import ModelCall

STATS = ("loss", "mse", "vb")
DEVICE_STREAM = 3  # the last part of the seed tuple: streams 1 (the model's own randomness) and 2 (data) are train.py's


def step_generator(device: torch.device | str, seed: int, step: int) -> torch.Generator:
    """The device generator of optimizer step `step`, which draws the global batch's timesteps and noise (every
    process the same, keeping its rows); seeding it costs no host sync."""
    return torch.Generator(device=device).manual_seed(step_seed(seed, step, DEVICE_STREAM))


class LossMeter:
    """Loss, MSE and VB sums on the device; one host read per `log_every` steps.

    `add` after each optimizer step (tensors, no sync); when `due(step)`, `read()` returns the means
    over the steps since the last read and whether they were all finite. `reduce` (e.g. accelerate's
    `reduce(t, "mean")`) averages the sums over processes in the same single read; extra host values
    to share at that moment (a stop request) ride along in `read(extra=...)`.
    """

    def __init__(self, device: torch.device | str, log_every: int = 1):
        self.device, self.log_every = torch.device(device), max(1, int(log_every))
        self._sums = torch.zeros(len(STATS), device=self.device)
        self._steps = 0

    def add(self, loss: torch.Tensor, mse: torch.Tensor, vb: torch.Tensor) -> None:
        self._sums += torch.stack([loss.detach().float(), mse.detach().float(), vb.detach().float()])
        self._steps += 1

    def due(self, step: int, last_step: int | None = None) -> bool:
        return self._steps > 0 and (step % self.log_every == 0 or step == last_step)

    def read(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None, extra: tuple[float, ...] = ()) -> dict:
        """{'loss', 'mse', 'vb': means since the last read, 'finite': bool, 'steps': n, 'extra': [...]}."""
        packed = torch.cat([self._sums / max(self._steps, 1), torch.tensor(extra, device=self.device)])
        if reduce is not None:
            packed = reduce(packed)
        values = packed.tolist()  # the one host sync
        stats = dict(zip(STATS, values[: len(STATS)], strict=True))
        out = {
            **stats,
            "finite": all(math.isfinite(v) for v in stats.values()),
            "steps": self._steps,
            "extra": values[len(STATS) :],
        }
        self._sums.zero_()
        self._steps = 0
        return out


@torch.no_grad()
def update_ema(ema: dict[str, torch.Tensor], params: dict[str, torch.nn.Parameter], step: int, decay: float) -> None:
    """One foreach lerp of the EMA over the trained tensors only; the decay warms up as (1+s)/(10+s)."""
    if ema:
        decay = min(decay, (1 + step) / (10 + step))  # short runs would otherwise keep the initial values
        torch._foreach_lerp_(list(ema.values()), [p.detach().float() for p in params.values()], 1 - decay)


@contextlib.contextmanager
def swapped_in(params: dict[str, torch.nn.Parameter], values: dict[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily put `values` (the EMA) into `params`."""
    if not values:
        yield
        return
    live = {name: p.detach().clone() for name, p in params.items()}
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(values[name])
    try:
        yield
    finally:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(live[name])


def denoiser(
    forward: ModelCall, y: torch.Tensor | dict[str, torch.Tensor], autocast_dtype: torch.dtype | None
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The model as the loss calls it: autocast around the network only, fp32 out (the loss stays fp32)."""

    def denoise(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.autocast(xt.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            return forward(xt, t, y).float()

    return denoise
