"""Aspect-ratio buckets (`fit --buckets auto`): images grouped by shape, every batch from one group.

The buckets of a training resolution R: every (width, height) whose sides are multiples of a step (the
family's `size_multiple`, VAE factor x patch size, raised towards R/16 as PixArt's own aspect-ratio bins
step: 64 px at 1024), whose area is at most R x R (so no batch needs more memory than a square one), as
close to it as the step allows, with aspect ratios from 1:4 to 4:1 (the span of PixArt's bins).

An image goes to the bucket nearest its aspect ratio (by log ratio: 2:1 and 1:2 are equally far from
square) and is centre-cropped and resized to it, as ADM crops a square (`images.center_crop`); its latents
are cached with its bucket's other images, in a cache per bucket (`latents.cache_key` keys a bucket apart
from a square). A bucket with fewer images than the batch is merged into its nearest neighbour by aspect
ratio, the smallest first, until every bucket fills a batch: its images are cropped to the neighbour's
shape, never dropped. The plan depends on the images' sizes and the batch only, so a resumed run makes the
same one; which bucket each step draws from is `engine.data.batches.BucketOrder`'s.

Written by hand: diffusers ships PixArt's fixed bins for 256 to 2048 px only (`ASPECT_RATIO_*_BIN`), and
no grouping of a dataset, merging or per-bucket caching.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.table import Table

from difffit.engine.data.images import BadImage, ImageFolder, Row, Size, check_elongation
from difffit.engine.data.latents import CachedLatents, EncodedLatents
from difffit.engine.progress import print_table, track

MAX_BUCKET_ASPECT = 4  # PixArt's aspect-ratio bins span 1:4 to 4:1
BUCKET_STEPS = 16  # PixArt's bins step by 1/16 of the resolution (64 px at 1024 px, 32 at 512)
Latents = CachedLatents | EncodedLatents


@dataclass(frozen=True)
class Bucket:
    """One shape of a bucketed run and the images cropped to it (indices into the training folder)."""

    size: Size  # (width, height) in pixels
    members: tuple[int, ...]
    merged: tuple[tuple[Size, int], ...] = ()  # (size, images) of the small buckets merged into this one

    @property
    def aspect(self) -> float:
        return self.size[0] / self.size[1]

    def summary(self) -> dict:
        """What FitResult and the adapter's training summary record of the bucket."""
        return {
            "width": self.size[0],
            "height": self.size[1],
            "images": len(self.members),
            "merged": [{"width": w, "height": h, "images": n} for (w, h), n in self.merged],
        }


def bucket_step(resolution: int, multiple: int) -> int:
    """The side step of the buckets: the multiple of `multiple` nearest below resolution / BUCKET_STEPS that
    divides the resolution (so the square is a bucket), and `multiple` itself for small resolutions."""
    whole = resolution // multiple
    limit = max(1, whole // BUCKET_STEPS)
    return multiple * max(k for k in range(1, limit + 1) if whole % k == 0)


def bucket_sizes(resolution: int, multiple: int, largest: int | None = None) -> list[Size]:
    """Every bucket of a resolution (see the module docstring), by aspect ratio, portrait first; `largest`:
    the longest side the model takes (SD3's positional table), which narrows the aspect ratios."""
    step = bucket_step(resolution, multiple)
    sizes = set()
    for short in range(step, resolution + 1, step):
        long = resolution * resolution // short // step * step  # the longest side that keeps the area <= R^2
        if long <= MAX_BUCKET_ASPECT * short and (largest is None or long <= largest):
            sizes |= {(long, short), (short, long)}
    return sorted(sizes, key=lambda size: size[0] / size[1])


def nearest(sizes: Sequence[Size], to: Sequence[Size]) -> torch.Tensor:
    """For each of `sizes`, the index of the one of `to` nearest its aspect ratio by log ratio (the first of a
    tie). Vectorized, for datasets of millions of images; float64, so a tie is a tie on every machine."""
    return (_log_aspects(sizes)[:, None] - _log_aspects(to)[None]).abs().argmin(1)


def _log_aspects(sizes: Sequence[Size]) -> torch.Tensor:
    shapes = torch.tensor(sizes, dtype=torch.float64).reshape(-1, 2)
    return torch.log(shapes[:, 0] / shapes[:, 1])


def plan_buckets(
    sizes: Sequence[Size], resolution: int, multiple: int, batch_size: int, largest: int | None = None
) -> list[Bucket]:
    """Images of `sizes` (width, height) into buckets: each to the nearest aspect ratio, then every bucket
    with fewer than `batch_size` images merged into its nearest neighbour that has images, the smallest first.
    Returns the buckets that have images, by aspect ratio."""
    shapes = bucket_sizes(resolution, multiple, largest)
    where = nearest(sizes, shapes)
    members = [torch.nonzero(where == b).flatten().tolist() for b in range(len(shapes))]
    merged: list[list[tuple[Size, int]]] = [[] for _ in shapes]
    while True:
        used = [b for b in range(len(shapes)) if members[b]]
        small = [b for b in used if len(members[b]) < batch_size]
        if not small or len(used) == 1:
            break
        b = min(small, key=lambda b: (len(members[b]), b))
        others = [o for o in used if o != b]
        into = others[int(nearest([shapes[b]], [shapes[o] for o in others])[0])]
        own = len(members[b]) - sum(count for _, count in merged[b])  # the images first sorted into b
        members[into] = sorted(members[into] + members[b])
        merged[into] += [(shapes[b], own), *merged[b]]
        members[b], merged[b] = [], []
    return [Bucket(shapes[b], tuple(members[b]), tuple(merged[b])) for b in range(len(shapes)) if members[b]]


def read_sizes(folder: ImageFolder, progress: bool) -> tuple[dict[Path | Row, Size], dict[Path | Row, str]]:
    """({item: (width, height)}, {item: reason}) from the image headers: the sizes, and the images that
    cannot be read or are too elongated to crop (named like every unusable image)."""
    sizes, bad = {}, {}
    with track(len(folder), "Reading image sizes", progress) as advance:
        for item in folder.files:
            try:
                sizes[item] = folder.size(item)
                check_elongation(sizes[item])
            except BadImage as exc:
                bad[item] = str(exc)
            advance()
    return sizes, bad


class BucketedLatents:
    """Training latents of a bucketed run: item i's come from its bucket's latents (a cache per bucket).
    Every index of one draw must be of one bucket: a batch is one shape."""

    def __init__(self, buckets: list[Bucket], parts: list[Latents]):
        self.buckets, self.parts = buckets, parts
        count = sum(len(b.members) for b in buckets)
        self.bucket_of = torch.empty(count, dtype=torch.long)
        self.position = torch.empty(count, dtype=torch.long)  # the item's place in its bucket
        for b, bucket in enumerate(buckets):
            members = torch.tensor(bucket.members, dtype=torch.long)
            self.bucket_of[members] = b
            self.position[members] = torch.arange(len(members))

    @property
    def cache_path(self) -> Path | None:
        """The folder holding every bucket's cache (None: encoded on the fly, or no usable image)."""
        paths = [part.cache_path for part in self.parts]
        return paths[0].parent if paths and paths[0] is not None else None

    def _part(self, index: torch.Tensor) -> Latents:
        buckets = self.bucket_of[index].unique()
        if len(buckets) != 1:
            raise ValueError(f"a batch drawn from {len(buckets)} buckets; each batch must be of one")
        return self.parts[int(buckets[0])]

    def shape(self, index: torch.Tensor) -> tuple[int, ...]:
        return self._part(index).shape(index)

    def draw(self, index: torch.Tensor, flips: torch.Tensor, noise: torch.Tensor, device: torch.device) -> torch.Tensor:
        return self._part(index).draw(self.position[index], flips, noise, device)


def bucketed_latents(
    folder: ImageFolder,
    resolution: int,
    multiple: int,
    batch_size: int,
    latents_for: Callable[[ImageFolder, Size], tuple[ImageFolder, Latents]],
    progress: bool,
    largest: int | None = None,
) -> tuple[ImageFolder, BucketedLatents]:
    """The folder without its unusable images, planned into buckets, and each bucket's latents.

    `latents_for(images, size)` gives (the usable ones, their latents at `size`): `latents.usable_latents`.
    Images found unusable while caching leave their bucket; should one fall below the batch so, the rest
    is planned again (a bucket whose images changed gets a new cache; moved images their new bucket's crop).
    """
    sizes, unreadable = read_sizes(folder, progress)
    folder = folder.without(unreadable)
    while True:
        buckets = plan_buckets([sizes[item] for item in folder.files], resolution, multiple, batch_size, largest)
        usable = [latents_for(folder.take(bucket.members), bucket.size) for bucket in buckets]
        bad = {item: reason for images, _ in usable for item, reason in images.skipped}
        kept = folder.without(bad)
        if not bad or len(buckets) == 1 or all(len(images) >= batch_size for images, _ in usable):
            break
        folder = kept
    place = {item: i for i, item in enumerate(kept.files)}
    buckets = [
        Bucket(bucket.size, tuple(place[item] for item in images.files), bucket.merged)
        for bucket, (images, _) in zip(buckets, usable, strict=True)
    ]
    return kept, BucketedLatents(buckets, [latents for _, latents in usable])


def show_buckets(buckets: list[Bucket], batch_size: int) -> None:
    """The bucket table on stderr: each shape, its images, and the small buckets merged into it."""
    table = Table(title=f"Aspect-ratio buckets (batch {batch_size})", title_justify="left")
    for name, justify in (
        ("bucket (W x H)", "left"),
        ("aspect", "right"),
        ("images", "right"),
        ("merged into it", "left"),
    ):
        table.add_column(name, justify=justify)
    for bucket in buckets:
        merged = ", ".join(f"{w} x {h} ({n} image{'s' if n != 1 else ''})" for (w, h), n in bucket.merged)
        table.add_row(
            f"{bucket.size[0]} x {bucket.size[1]}", f"{bucket.aspect:.2f}", f"{len(bucket.members):,}", merged
        )
    print_table(table)
