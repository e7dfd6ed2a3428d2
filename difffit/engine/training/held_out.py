"""The held-out set of a fit run: which images are held out, and what validation reads of them.

- `split_validation`: `--val-fraction` of each class (`engine.data.batches.held_out`, fixed by the seed and
  the image list, so a resumed run holds out the same ones); on a text-to-image base with aspect-ratio
  buckets, of each class and bucket shape (the images' nearest bucket), so the held-out set has the
  training data's shapes. Or a separate `--val-data` folder or dataset (captioned, for text-to-image).
- `held_out_groups`: the held-out images' latents (cached as training latents are; drawn once with fixed
  latent noise), one group per shape: the square, or each training bucket, the nearest by aspect ratio
  taking each image; with each image's conditions (its label, or its caption's cached text embeddings).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from difffit.engine.data.batches import held_out, step_seed
from difffit.engine.data.buckets import bucket_sizes, nearest, read_sizes
from difffit.engine.data.hf_datasets import open_data
from difffit.engine.data.images import ImageFolder, require_images
from difffit.engine.data.latents import usable_latents
from difffit.engine.errors import DiffFitError
from difffit.engine.evaluation.clip_score import DEFAULT_CLIP_MODEL, clip_folder
from difffit.engine.evaluation.inception import resolve_inception_weights
from difffit.engine.evaluation.sample import draw_noise, read_prompts, sample_generators
from difffit.engine.models.families.dit import DIT
from difffit.engine.models.family import Family
from difffit.engine.progress import say
from difffit.engine.training.conditions import with_captions
from difffit.engine.training.config import FitConfig
from difffit.engine.training.state import Run

if TYPE_CHECKING:
    from difffit.engine.models.bases import Base

VAL_SEED = 0x7A11  # the validation noise's own stream: independent of the training draws


def split_validation(
    config: FitConfig, folder: ImageFolder, family: Family = DIT, base: Base | None = None
) -> tuple[ImageFolder, ImageFolder | None]:
    """(training items, held-out items or None). Also checks, before any work, what evaluation needs: the FID
    weights and the CLIP model offline, the prompts to sample. `base`: a text-to-image base, whose bucket
    shapes a bucketed run's held-out set is drawn over."""
    _check_evaluation_inputs(config, family)
    if config.val_data:
        return folder, _validation_data(config, folder, family)
    if not config.val_fraction:
        return folder, None
    groups, describe = _strata(config, folder, family, base)
    if family.conditioning == "text":  # every class and shape keeps an image to train on
        for group, count in sorted(Counter(groups).items()):
            if math.floor(config.val_fraction * count + 0.5) >= count:
                raise DiffFitError(
                    f"--val-fraction {config.val_fraction} would hold out all {count} image(s) of "
                    f"{describe(group)}, leaving none of it to train on.",
                    hint="Use a smaller --val-fraction, or --val-data DIR.",
                )
    chosen = held_out(groups, config.val_fraction, config.seed)
    if not chosen:
        raise DiffFitError(
            f"--val-fraction {config.val_fraction} holds out no image of {config.data} "
            f"({len(folder)} images in {len(folder.class_names)} classes).",
            hint="Use a larger fraction, or --val-data DIR.",
        )
    kept = sorted(set(range(len(folder))) - set(chosen))
    return replace(folder.take(kept), skipped=folder.skipped), folder.take(chosen)


def _check_evaluation_inputs(config: FitConfig, family: Family) -> None:
    if not config.eval_every:
        return
    if config.eval_prompts:
        read_prompts(config.eval_prompts)
    elif family.conditioning == "text" and not (config.val_fraction or config.val_data):
        raise DiffFitError(
            f"--eval-every samples the held-out captions on a {family.title} base, and there is no validation set.",
            hint="Add --val-fraction 0.1, --val-data DIR or --eval-prompts FILE.",
        )
    metrics = config.evaluation_metrics()
    if "fid" in metrics:
        resolve_inception_weights(config.inception_weights)  # missing offline: one sentence, before any work
    if "clip" in metrics:
        clip_folder(config.clip_model or DEFAULT_CLIP_MODEL)


def _validation_data(config: FitConfig, folder: ImageFolder, family: Family) -> ImageFolder:
    """--val-data: DiT's with the training data's classes; a text-to-image one captioned (classes do not matter)."""
    val = open_data(config.val_data, config.image_column, config.label_column, config.caption_column)
    if family.conditioning == "text":
        val = with_captions(val, config, family)
        return replace(val, labels=[0] * len(val), class_names=folder.class_names, skipped=[])
    index = {name: i for i, name in enumerate(folder.class_names)}
    if len(folder.class_names) == len(val.class_names) == 1:  # two flat folders: named after themselves
        index = {val.class_names[0]: 0}
    unknown = sorted({val.class_names[label] for label in val.labels} - set(index))
    if unknown:
        raise DiffFitError(
            f"--val-data {config.val_data} has classes the training data lacks: {', '.join(unknown[:10])}.",
            hint="Validate on the training data's classes.",
        )
    labels = [index[val.class_names[label]] for label in val.labels]
    return replace(val, labels=labels, class_names=folder.class_names, skipped=[])


def _strata(
    config: FitConfig, folder: ImageFolder, family: Family, base: Base | None
) -> tuple[list[int], Callable[[int], str]]:
    """(each item's stratum, a stratum's name): its class, or with buckets its class and nearest bucket shape."""
    classes = folder.class_names

    def of_class(label: int) -> str:
        return f"class {classes[label]}" if len(classes) > 1 else str(config.data)

    if family.conditioning != "text" or not config.bucketed(family):
        return list(folder.labels), of_class
    shapes = bucket_sizes(config.resolution or base.resolution, family.size_multiple(base), family.largest_side(base))
    sizes, _ = read_sizes(folder, progress=False)  # an unreadable image goes with the square; training skips it
    side = config.resolution or base.resolution
    where = nearest([sizes.get(item, (side, side)) for item in folder.files], shapes).tolist()

    def of_bucket(group: int) -> str:
        (width, height), label = shapes[group % len(shapes)], group // len(shapes)
        return f"the {width} x {height} bucket" + (f" of class {classes[label]}" if len(classes) > 1 else "")

    return [label * len(shapes) + shape for label, shape in zip(folder.labels, where, strict=True)], of_bucket


def held_out_prompts(config: FitConfig, val: ImageFolder | None) -> list[str]:
    """What a text-to-image run encodes for validation besides its training captions: the held-out captions
    and the --eval-prompts."""
    return [
        *(val.captions or [] if val is not None else []),
        *(read_prompts(config.eval_prompts) if config.eval_every and config.eval_prompts else []),
    ]


@dataclass
class Group:
    """Held-out images of one shape: latents x0 (N, C, h, w) on the CPU and their conditions: labels (N,), or
    their captions, whose embeddings `conditions` gathers."""

    x0: torch.Tensor
    conditions: torch.Tensor | Callable[[torch.Tensor], dict[str, torch.Tensor]]

    def take(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | dict[str, torch.Tensor]]:
        conditions = self.conditions[rows] if isinstance(self.conditions, torch.Tensor) else self.conditions(rows)
        return self.x0[rows], conditions


def held_out_groups(run: Run, val: ImageFolder, progress: bool) -> tuple[ImageFolder, list[Group]]:
    """(the usable held-out images, their Groups), the latents drawn once (plain, fixed latent noise)."""
    config, base, device = run.config, run.base, run.accelerator.device
    text = run.family.conditioning == "text"
    if not text:
        val = val.keep_classes(run.folder.class_names)  # without the classes training dropped as unreadable
    groups, usable, done = [], [], 0
    for size, members in _shapes(run, val):
        images, latents = usable_latents(
            val.take(members),
            size,
            base.vae_spec,
            base.vae,
            cache=config.cache_latents,
            cache_dir=config.cache_dir,
            batch_size=config.batch_size,
            device=device,
            num_workers=0,
            progress=progress,
        )
        for item, reason in images.skipped if run.main else ():
            say(f"skipped validation image {item}: {reason}")
        if not len(images):
            continue
        parts = []
        for lo in range(0, len(images), config.batch_size):
            index = torch.arange(lo, min(lo + config.batch_size, len(images)))
            generators = sample_generators(step_seed(config.seed, VAL_SEED, 1), (index + done).tolist())
            noise = draw_noise(generators, latents.shape(index), "cpu")
            parts.append(latents.draw(index, torch.zeros_like(index), noise, device).cpu())
        conditions = _caption_rows(run, images.captions) if text else torch.tensor(images.labels)
        groups.append(Group(torch.cat(parts), conditions))
        usable.append(images)
        done += len(images)
    kept = {item for images in usable for item in images.files}
    val = val.take([i for i, item in enumerate(val.files) if item in kept])
    require_images(val)
    return val, groups


def _shapes(run: Run, val: ImageFolder) -> list[tuple[int | tuple[int, int], list[int]]]:
    """(crop size, held-out items) of each shape: the run's square, or each training bucket's, the nearest by
    aspect ratio taking each image (as the training images' own buckets took them)."""
    if not run.buckets:
        return [(run.resolution, list(range(len(val))))]
    sizes, unreadable = read_sizes(val, progress=False)
    for item, reason in unreadable.items() if run.main else ():
        say(f"skipped validation image {item}: {reason}")
    readable = [i for i, item in enumerate(val.files) if item in sizes]
    where = nearest([sizes[val.files[i]] for i in readable], [bucket.size for bucket in run.buckets]).tolist()
    return [
        (bucket.size, [i for i, b in zip(readable, where, strict=True) if b == k])
        for k, bucket in enumerate(run.buckets)
        if k in where
    ]


def _caption_rows(run: Run, captions: list[str]) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    embeddings = run.batches.conditions.embeddings  # the training captions' cache, which holds these as extras
    return lambda rows: embeddings.of_each([captions[r] for r in rows.tolist()])
