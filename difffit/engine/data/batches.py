"""What each training step sees, as a pure function of (seed, step): the same global batch on any number of
processes.

Exactness on resume comes from one rule: every random draw of optimizer step s is a function of
(seed, s). The data order is a per-epoch permutation seeded by (seed, epoch); the flips, latent noise
and label or caption dropout of the whole global batch come from a generator seeded by (seed, s), the
timesteps and diffusion noise from a device generator seeded the same way (`training.step`). So a
checkpoint needs only the step, and a run resumed from step 20 draws exactly what an uninterrupted
run draws. The held-out validation items (`held_out`) are a function of (seed, item list) too.

`--batch-size` is the global batch of one optimizer step; each of P processes takes its own slice
of it (batch / (P * grad_accum) per micro-step): its items, and the rows of the step's draws at its
slice's place in the global batch. Every process draws the global batch's random values and keeps its
rows, so what is trained does not depend on how many GPUs (or accumulation micro-steps) ran it.
With aspect-ratio buckets (`BucketOrder`) a step's whole global batch comes from one bucket, the same on
every process.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from difffit.engine.data.buckets import BucketedLatents
from difffit.engine.data.latents import CachedLatents, EncodedLatents
from difffit.engine.data.text_cache import TextEmbeddings
from difffit.engine.errors import DiffFitError

# DataOrder shuffles an epoch in memory (about 40 bytes an item with its cached permutations), so --repeats
# may grow an epoch up to this many items (or the dataset's own size, if larger): 10M items is ~400 MB.
MAX_EPOCH_ITEMS = 10_000_000
# Images one forward pass takes (fit's micro-step on a process, a sampling or Inception batch): a batch's tensors are
# allocated at once, so a larger training step is split with --grad-accum instead.
MAX_FORWARD_BATCH = 1024


def step_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class DataOrder:
    """An endless stream of dataset indices: epoch e is a shuffle, seeded by (seed, e), of a pool.

    The pool holds each item once, or `repeats[i]` times. With `balance`, every class fills as many
    places of an epoch as the largest class has (its items in a fresh order each epoch, cycled), so
    classes are drawn equally whatever their sizes; without `balance`, an epoch is a shuffle of the pool itself.
    """

    def __init__(self, labels: Sequence[int], seed: int, repeats: Sequence[int] | None = None, balance: bool = False):
        self.seed, self.balance = seed, balance
        counts = torch.tensor(repeats if repeats is not None else [1] * len(labels), dtype=torch.long)
        self.pool = torch.repeat_interleave(torch.arange(len(labels)), counts)
        pool_labels = torch.tensor(list(labels), dtype=torch.long)[self.pool]
        self.by_class = [self.pool[pool_labels == c] for c in pool_labels.unique().tolist()]
        self.n = epoch_size(labels, repeats, balance)
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            g = torch.Generator().manual_seed(step_seed(self.seed, epoch, 0x0D47A))
            pool = self.pool
            if self.balance:
                places = self.n // len(self.by_class)
                pool = torch.cat(
                    [
                        items[torch.randperm(len(items), generator=g).repeat(-(-places // len(items)))][:places]
                        for items in self.by_class
                    ]
                )
            self._perms[epoch] = pool[torch.randperm(self.n, generator=g)]
        return self._perms[epoch]

    def take(self, start: int, count: int) -> torch.Tensor:
        """Stream positions start .. start+count-1."""
        positions = torch.arange(start, start + count)
        out = torch.empty(count, dtype=torch.long)
        for epoch in positions.div(self.n, rounding_mode="floor").unique().tolist():
            mask = positions // self.n == epoch
            out[mask] = self._perm(epoch)[positions[mask] % self.n]
        return out

    def take_batch(self, split: Split, step: int, micro: int) -> torch.Tensor:
        """This process's items of micro-step `micro` of optimizer step `step`."""
        return self.take(split.start(step, micro), split.per_process)


class BucketOrder:
    """The data stream of a bucketed run (`--buckets auto`): each step's global batch from one bucket.

    Each bucket streams its items as a DataOrder of its own (seeded by (seed, bucket); `repeats` as there).
    Steps are dealt to buckets in rounds: a round has as many steps as an epoch has items, bucket b
    holding as many of them as its own epoch has items, in an order shuffled by (seed, round). Over a
    round each bucket passes over its items exactly `batch` times, so every image is drawn equally often
    (times its repeats) whatever the size of its bucket, and no remainder is ever dropped. Step s's
    bucket, and how many steps that bucket had before it, are a function of (seed, s): resume is exact.
    """

    def __init__(
        self, buckets: Sequence[Sequence[int]], labels: Sequence[int], seed: int, repeats: Sequence[int] | None = None
    ):
        self.seed = seed
        self.members = [torch.tensor(list(items), dtype=torch.long) for items in buckets]
        self.orders = [
            DataOrder(
                [labels[i] for i in items],
                step_seed(seed, b, 0xB0C),
                None if repeats is None else [repeats[i] for i in items],
            )
            for b, items in enumerate(buckets)
        ]
        self.steps = torch.tensor([order.n for order in self.orders])  # each bucket's steps in a round
        self.n = int(self.steps.sum())
        self._round: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def round_plan(self, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(the bucket of each step of round r, how many steps that bucket had before it in the round)."""
        if self._round is None or self._round[0] != r:
            g = torch.Generator().manual_seed(step_seed(self.seed, r, 0xB0C4E7))
            buckets = torch.repeat_interleave(torch.arange(len(self.orders)), self.steps)
            buckets = buckets[torch.randperm(self.n, generator=g)]
            grouped = torch.sort(buckets, stable=True).indices  # each bucket's steps, in round order
            first = torch.cumsum(self.steps, 0) - self.steps  # where each bucket's group starts in `grouped`
            before = torch.empty_like(buckets)
            before[grouped] = torch.arange(self.n) - first[buckets[grouped]]
            self._round = (r, buckets, before)
        return self._round[1:]

    def take_batch(self, split: Split, step: int, micro: int) -> torch.Tensor:
        """This process's items of micro-step `micro` of optimizer step `step`, all of one bucket."""
        r, place = divmod(step, self.n)
        buckets, before = self.round_plan(r)
        b = int(buckets[place])
        done = r * int(self.steps[b]) + int(before[place])  # the steps bucket b had before this one
        return self.members[b][self.orders[b].take(split.start(done, micro), split.per_process)]


def epoch_size(labels: Sequence[int], repeats: Sequence[int] | None = None, balance: bool = False) -> int:
    """Items in one epoch of a DataOrder, counted without building it: each item `repeats[i]` times, or with
    `balance` as many per class as the largest class has."""
    per_class = Counter()
    for label, count in zip(labels, repeats if repeats is not None else [1] * len(labels), strict=True):
        per_class[label] += count
    return max(per_class.values()) * len(per_class) if balance else sum(per_class.values())


def item_repeats(repeats: int | dict[str, int], labels: Sequence[int], class_names: Sequence[str]) -> list[int] | None:
    """--repeats as one count per item: a global integer, or {class name: count} (others once); None for 1."""
    if isinstance(repeats, int):
        return None if repeats == 1 else [repeats] * len(labels)
    unknown = sorted(set(repeats) - set(class_names))
    if unknown:
        raise DiffFitError(
            f"`repeats` names class(es) the data does not have: {', '.join(unknown)}.",
            hint=f"The classes are: {', '.join(class_names[:20])}.",
        )
    per_class = [repeats.get(name, 1) for name in class_names]
    return [per_class[label] for label in labels]


def held_out(labels: Sequence[int], fraction: float, seed: int) -> list[int]:
    """The validation items: round(fraction * n) of each class, chosen by (seed, class), never a class's
    last item. A pure function of the seed and the item list, so a resumed run holds out the same ones."""
    labels_t = torch.tensor(list(labels), dtype=torch.long)
    chosen: list[int] = []
    for c in labels_t.unique().tolist():
        items = torch.nonzero(labels_t == c).flatten()
        k = min(math.floor(fraction * len(items) + 0.5), len(items) - 1)
        g = torch.Generator().manual_seed(step_seed(seed, c, 0x5A1D))
        chosen += items[torch.randperm(len(items), generator=g)[:k]].tolist()
    return sorted(chosen)


@dataclass(frozen=True)
class Split:
    """How one optimizer step's global batch splits over processes and accumulation micro-steps."""

    batch_size: int
    grad_accum: int
    rank: int
    world: int

    def __post_init__(self):
        per_process, rest = divmod(self.batch_size, self.world * self.grad_accum)
        if rest or not per_process:
            raise DiffFitError(
                f"--batch-size {self.batch_size} does not split evenly over {self.world} process(es) x "
                f"--grad-accum {self.grad_accum}.",
                hint="Use a multiple of their product as the batch size.",
            )
        if per_process > MAX_FORWARD_BATCH:
            accum = -(-self.batch_size // (self.world * MAX_FORWARD_BATCH))
            raise DiffFitError(
                f"--batch-size {self.batch_size:,} makes micro-batches of {per_process:,} images per process, above "
                f"{MAX_FORWARD_BATCH:,}, the most one forward pass takes.",
                hint=f"Add --grad-accum {accum} (or more) to split each step, or use a smaller --batch-size.",
            )

    @property
    def per_process(self) -> int:
        return self.batch_size // (self.world * self.grad_accum)

    def offset(self, micro: int) -> int:
        """Where this process's slice of micro-step `micro` starts within its step's global batch."""
        return (micro * self.world + self.rank) * self.per_process

    def rows(self, micro: int) -> slice:
        """This process's rows of micro-step `micro` among its step's global-batch draws."""
        return slice(self.offset(micro), self.offset(micro) + self.per_process)

    def start(self, step: int, micro: int) -> int:
        """The data-stream position of this process's slice of micro-step `micro` of `step`."""
        return step * self.batch_size + self.offset(micro)


class Labels:
    """Class labels as what the model is conditioned on (DiT). With probability `dropout` an item's label is
    replaced by `null`, the null class classifier-free guidance samples with (the model's own draw is off)."""

    def __init__(self, labels: Sequence[int], dropout: float = 0.0, null: int | None = None):
        self.labels = torch.tensor(list(labels), dtype=torch.long)
        self.dropout, self.null = dropout, null

    def take(self, index: torch.Tensor, drop: torch.Tensor | None) -> torch.Tensor:
        labels = self.labels[index]
        return labels if drop is None else torch.where(drop, self.null, labels)


class Captions:
    """Caption embeddings as what the model is conditioned on (text-to-image families).

    With probability `dropout` an item's caption is replaced by the empty caption's embeddings, the
    unconditional input the pipelines' guidance uses.
    """

    def __init__(self, embeddings: TextEmbeddings, dropout: float):
        self.embeddings, self.dropout = embeddings, dropout
        self.empty = embeddings.of("") if dropout else None

    def take(self, index: torch.Tensor, drop: torch.Tensor | None) -> dict[str, torch.Tensor]:
        rows = self.embeddings.take(index)
        if drop is not None:
            for name, tensor in rows.items():
                tensor[drop] = self.empty[name].to(tensor.dtype)
        return rows


def to_device(
    conditions: torch.Tensor | dict[str, torch.Tensor], device: torch.device
) -> torch.Tensor | dict[str, torch.Tensor]:
    if isinstance(conditions, dict):
        return {name: tensor.to(device, non_blocking=True) for name, tensor in conditions.items()}
    return conditions.to(device)


class Batches:
    """Micro-batches (latents x0, conditions: labels or caption embeddings) for the training loop, drawn from
    cached or encoded latents (of one size, or of each batch's bucket)."""

    def __init__(
        self,
        latents: CachedLatents | EncodedLatents | BucketedLatents,
        conditions: Labels | Captions,
        split: Split,
        order: DataOrder | BucketOrder,
        device: torch.device,
    ):
        self.latents, self.conditions = latents, conditions
        self.split, self.order, self.device = split, order, device
        self._drawn: tuple[int, StepDraws] | None = None

    def micro_batch(
        self, step: int, micro: int, g: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor | dict[str, torch.Tensor]]:
        """Micro-step `micro` of optimizer step `step`, this process's slice; `g`: the step's generator, which
        draws the whole global batch's flips, latent noise and dropout at the step's first micro-step."""
        index = self.order.take_batch(self.split, step, micro)
        if self._drawn is None or self._drawn[0] != step:
            self._drawn = (
                step,
                StepDraws.draw(g, self.split.batch_size, self.latents.shape(index), self.conditions.dropout),
            )
        rows, draws = self.split.rows(micro), self._drawn[1]
        x0 = self.latents.draw(index, draws.flips[rows], draws.latent_noise[rows], self.device)
        drop = None if draws.drop is None else draws.drop[rows]
        return x0, to_device(self.conditions.take(index, drop), self.device)


@dataclass(frozen=True)
class StepDraws:
    """The random values of one optimizer step's global batch, one row per item (drawn on the CPU)."""

    flips: torch.Tensor
    latent_noise: torch.Tensor
    drop: torch.Tensor | None  # the items whose label or caption is dropped; None without dropout

    @classmethod
    def draw(cls, g: torch.Generator, batch: int, shape: tuple[int, ...], dropout: float) -> StepDraws:
        flips = torch.randint(0, 2, (batch,), generator=g)
        latent_noise = torch.randn((batch, *shape), generator=g)
        drop = torch.rand(batch, generator=g) < dropout if dropout else None
        return cls(flips, latent_noise, drop)
