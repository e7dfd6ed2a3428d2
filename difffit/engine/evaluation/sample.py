"""Batched sampling with classifier-free guidance: SamplingOptions, the denoising loop, `generate`.

The loop follows the reference sample.py: the latent batch is run as [z, z] with labels [y, null]
through `forward_with_cfg` and only the conditional half is kept -- we keep only that half from
the start (the null half of the reference's batch never influences the result), so each step
runs the model on 2B inputs but steps and draws noise for B.

Determinism: sample i of a run with seed s draws its initial noise and every step's noise from
its own CPU generator (`sample_seed(s, i)`), so an image depends on (seed, index) only: not on
the batch size, the batch it lands in, the process that made it, or the device.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from difffit.engine.data.batches import MAX_FORWARD_BATCH
from difffit.engine.data.captions import read_text_file
from difffit.engine.data.text_cache import TextEmbeddings, text_embeddings
from difffit.engine.devices import autocast_dtype, resolve_device
from difffit.engine.errors import DiffFitError, require_at_least, require_at_most, require_seed
from difffit.engine.evaluation.options import SamplingFields, check_image_count
from difffit.engine.models.dit import DiT
from difffit.engine.models.families import FAMILIES, family_of
from difffit.engine.models.family import MAX_SIDE, TextConditioning
from difffit.engine.models.schedulers import (
    SCHEDULERS,
    DPMSolverSampler,
    ReferenceSampler,
    checked_steps,
    make_sampler,
)
from difffit.engine.models.speed import compile_blocks, padded_batch, resolve_compile
from difffit.engine.progress import make_progress

if TYPE_CHECKING:
    from difffit.engine.models.bases import Base


def sample_seed(seed: int, index: int) -> int:
    """The generator seed of sample `index`. torch's CPU generator keeps only 32 bits of a seed, so
    the pair is folded into 32 bits: injective in `index`, and different run seeds land far apart."""
    return (seed * 0x9E3779B1 + index) % 2**32


def sample_generators(seed: int, indices: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(sample_seed(seed, int(i))) for i in indices]


def draw_noise(generators: list[torch.Generator], shape: Sequence[int], device: torch.device | str) -> torch.Tensor:
    """One standard-normal tensor of `shape` per generator, stacked: (len(generators), *shape)."""
    noise = torch.stack([torch.randn(tuple(shape), generator=g) for g in generators])
    return noise.to(device, non_blocking=True)


# -- settings -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingOptions(SamplingFields):
    """How to sample (SamplingFields: guidance, scheduler, seed, batching and numerics), checked when made.

    The same object drives `difffit sample`, eval-fid's in-memory samples and fit's previews, and
    is what sample.json records.
    """

    def __post_init__(self) -> None:
        if self.cfg_scale is not None and not math.isfinite(self.cfg_scale):
            raise DiffFitError(f"--cfg-scale must be a finite number (got {self.cfg_scale}).")
        if self.cfg_channels not in ("3", "all"):
            raise DiffFitError(f"--cfg-channels must be 3 or all (got {self.cfg_channels!r}).")
        known = list(dict.fromkeys(name for family in FAMILIES.values() for name in family.schedulers))
        if self.scheduler is not None and self.scheduler not in known:
            raise DiffFitError(f"Unknown scheduler {self.scheduler!r}; choose one of {', '.join(known)}.")
        if self.scheduler in SCHEDULERS:  # DiT's names (text families take them too): their step rules
            checked_steps(self.scheduler, self.steps)
        elif self.steps is not None and not 1 <= self.steps <= 1000:
            raise DiffFitError(f"--steps must be between 1 and 1000 (got {self.steps}).")
        for name in ("width", "height"):
            if getattr(self, name) is not None:
                require_at_least(f"--{name}", getattr(self, name), 8)
                require_at_most(f"--{name}", getattr(self, name), MAX_SIDE, "the largest side difffit draws")
        require_at_least("--batch-size", self.batch_size, 1)
        require_at_most("--batch-size", self.batch_size, MAX_FORWARD_BATCH, "the most images one forward pass takes")
        require_seed("--seed", self.seed)
        autocast_dtype(self.mixed_precision)
        # An unknown device, a missing GPU or an unknown --compile is refused before any loading.
        resolve_compile(self.compile, resolve_device(self.device))

    @classmethod
    def from_fields(cls, fields: SamplingFields) -> SamplingOptions:
        """`fields` (a preset such as FID_SAMPLING), checked."""
        return cls(**dataclasses.asdict(fields))

    @property
    def num_steps(self) -> int:
        return self.steps if self.scheduler not in SCHEDULERS else checked_steps(self.scheduler, self.steps)

    def for_base(self, base: Base) -> SamplingOptions:
        """These options with the base's family's defaults where none were given (cfg scale, scheduler,
        steps), and checked against what the family offers."""
        family = family_of(base)
        defaults = family.sampling_defaults(base)
        resolved = dataclasses.replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})
        if resolved.scheduler not in family.schedulers:
            raise DiffFitError(
                f"--scheduler {resolved.scheduler} is not one of {family.title}'s; choose one of "
                f"{', '.join(family.schedulers)}."
            )
        family.check_sample_size(base, self.width, self.height)
        if self.negative_prompt and isinstance(family, TextConditioning) and not family.negative_prompts:
            raise DiffFitError(
                f"--negative-prompt has nothing to steer on {family.title} bases: they sample with "
                "guidance distilled into the model, without an unconditional branch."
            )
        return resolved

    @property
    def guided_channels(self) -> int | str:
        """`cfg_channels` as `DiT.forward_with_cfg` takes it."""
        return "all" if self.cfg_channels == "all" else 3

    @property
    def dtype(self) -> torch.dtype:
        """The sampling numerics: float32 (exact) or the autocast dtype."""
        return autocast_dtype(self.mixed_precision) or torch.float32

    def to_dict(self) -> dict:
        """The settings with the step count resolved; strict JSON, and `SamplingOptions(**d)` rebuilds them."""
        return {**dataclasses.asdict(self), "steps": self.num_steps}


# -- the latent loop ------------------------------------------------------------------------------


def make_denoiser(
    model: DiT,
    labels: torch.Tensor,
    cfg_scale: float,
    cfg_channels: int | str = 3,
    autocast_dtype: torch.dtype | None = None,
) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """`denoise(x, t)` -> the fp32 model output (eps, variance) for latents x at original step t.

    With guidance (cfg_scale != 1) the model sees [x, x] with labels [y, null] (the reference
    layout) and the guided conditional half is returned; at scale 1 it is a plain conditional call.
    """
    guided = cfg_scale != 1.0
    y = torch.cat([labels, torch.full_like(labels, model.config.num_classes)]) if guided else labels

    def denoise(x: torch.Tensor, t: int) -> torch.Tensor:
        t_batch = torch.full((len(y),), int(t), device=x.device, dtype=torch.long)
        with torch.autocast(x.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            if guided:
                out = model.forward_with_cfg(torch.cat([x, x]), t_batch, y, cfg_scale, cfg_channels)[: len(x)]
            else:
                out = model(x, t_batch, y)
        return out.float()

    return denoise


@torch.inference_mode()
def sample_denoised(
    model: DiT,
    labels: torch.Tensor,
    generators: list[torch.Generator],
    *,
    cfg_scale: float = 4.0,
    cfg_channels: int | str = 3,
    scheduler: str | ReferenceSampler | DPMSolverSampler = "ddpm",
    steps: int | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Denoise one batch: labels (B,) on the model's device, one generator per sample -> latents x_0."""
    sampler = make_sampler(scheduler, steps) if isinstance(scheduler, str) else scheduler
    if isinstance(sampler, ReferenceSampler) and not model.config.learn_sigma:
        raise DiffFitError("The ddpm and ddim schedulers need a model with a learned variance; use dpm-solver.")
    sampler.reset()
    device = labels.device
    c, size = model.config.in_channels, model.config.input_size
    shape = (c, size, size)
    denoise = make_denoiser(model, labels, cfg_scale, cfg_channels, autocast_dtype)
    x = draw_noise(generators, shape, device)
    last = len(sampler.timesteps) - 1
    for k, t in enumerate(sampler.timesteps):
        output = denoise(x, t)
        # The last DDPM step adds no noise, so it draws none.
        noise = draw_noise(generators, shape, device) if sampler.stochastic and k < last else None
        x = sampler.step(k, output, x, noise)
    return x


def check_finite(images: torch.Tensor | np.ndarray, batch: list[int], options: SamplingOptions) -> None:
    """Refuse NaN or inf pixels, which the conversion to bytes would turn into black images."""
    if not bool(np.isfinite(images).all() if isinstance(images, np.ndarray) else torch.isfinite(images).all()):
        raise DiffFitError(
            f"Sampling produced NaN or inf values (images {batch[0]}-{batch[-1]}); they would be black images, "
            "so nothing more is written or scored.",
            hint=f"Lower --cfg-scale (now {options.cfg_scale:g}), or use --mixed-precision no; an adapter whose "
            "training diverged samples this way too.",
        )


def to_bytes(images: np.ndarray) -> np.ndarray:
    """A pipeline's float images in [0, 1] (N, H, W, 3) -> uint8, as diffusers' numpy_to_pil converts them."""
    return (images * 255).round().astype(np.uint8)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8 on the CPU, the reference sample_ddp.py way."""
    return torch.clamp(127.5 * images.float() + 128.0, 0, 255).permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8)


# -- images ---------------------------------------------------------------------------------------


def parse_classes(specs: Sequence[str], class_names: Sequence[str] | None, num_classes: int) -> list[int] | None:
    """--class values (names, case-insensitive, or indices) -> class indices; None when none given."""
    if not specs:
        return None
    by_name = {name.lower(): i for i, name in enumerate(class_names or [])}
    out = []
    for spec in specs:
        key = spec.strip()
        if key.lower() in by_name:
            out.append(by_name[key.lower()])
        elif key.isdigit() and int(key) < num_classes:
            out.append(int(key))
        elif key.isdigit():
            raise DiffFitError(f"Class index {key} is out of range; this model has classes 0..{num_classes - 1}.")
        elif class_names:
            shown = ", ".join(class_names[:20]) + (
                f", ... ({len(class_names) - 20} more)" if len(class_names) > 20 else ""
            )
            raise DiffFitError(f"Unknown class {spec!r}; valid classes: {shown}.", hint="Give a name or an index.")
        else:
            raise DiffFitError(
                f"Unknown class {spec!r}: this model has no class names; give an index 0..{num_classes - 1}."
            )
    return out


def read_prompts(path: str | Path) -> list[str]:
    """A prompts file: UTF-8 (read as caption files are), one prompt per line, blank lines skipped."""
    path = Path(path)
    prompts = [line.strip() for line in read_text_file(path, "prompts file").splitlines() if line.strip()]
    if not prompts:
        raise DiffFitError(f"The prompts file {path} holds no prompt.", hint="Write one prompt per line.")
    return prompts


def resolve_labels(num_classes: int, classes: Sequence[int] | None, indices: Sequence[int]) -> list[int]:
    """Sample i gets classes[i % len(classes)]; by default the classes in turn."""
    classes = list(range(num_classes)) if not classes else [int(c) for c in classes]
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise DiffFitError(f"Class index {bad[0]} is out of range; this model has classes 0..{num_classes - 1}.")
    return [classes[i % len(classes)] for i in indices]


def generate_batches(
    base: Base,
    indices: Sequence[int],
    options: SamplingOptions,
    *,
    classes: Sequence[int] | None = None,
    prompts: Sequence[str] | None = None,
    embeddings: TextEmbeddings | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yield (sample indices, uint8 images (B, H, W, 3)) batch by batch, so callers can write as they go.

    Sample i is of class classes[i % len(classes)] (class-conditional bases) or prompt prompts[i %
    len(prompts)] (text-conditional ones; `embeddings`, when given, already holds the prompts' embeddings,
    as fit's previews do). float32 (`mixed_precision="no"`) is the exact reference
    numerics; bf16 / fp16 run model and decoder under autocast. `device` overrides `options.device` (a
    launcher's process device). Moves `base.model` to the device.
    """
    from rich.progress import TextColumn

    indices = [int(i) for i in indices]
    device = torch.device(device) if device is not None else resolve_device(options.device)
    options = options.for_base(base)
    check_conditioning(base, classes, prompts)
    if family_of(base).conditioning == "text":
        batch_images = _text_batches(base, indices, options, prompts, device, embeddings)
    else:
        batch_images = _class_batches(base, indices, options, classes, device)
    with make_progress(TextColumn("{task.fields[rate]}"), enabled=progress) as bar:
        task = bar.add_task("Sampling", total=len(indices), rate="")
        start = time.perf_counter()
        for lo in range(0, len(indices), options.batch_size):
            batch = indices[lo : lo + options.batch_size]
            images = batch_images(lo, batch)
            done = lo + len(batch)
            bar.update(task, advance=len(batch), rate=f"{done / (time.perf_counter() - start):.2f} img/s")
            yield batch, images


def check_conditioning(base: Base, classes: Sequence | None, prompts: Sequence[str] | None) -> None:
    """Classes for a class-conditional base, prompts (at least one) for a text-to-image one."""
    family = family_of(base)
    if (classes and family.conditioning != "class") or (prompts and family.conditioning != "text"):
        given, wanted = ("--class", "--prompt") if classes else ("--prompt", "--class")
        what = "text" if family.conditioning == "text" else "classes"
        raise DiffFitError(
            f"{given} does not apply to {base.spec}, a {family.title} base conditioned on {what}; use {wanted}."
        )
    if family.conditioning == "text" and not prompts:
        raise DiffFitError(f"{base.spec} is a text-to-image base; give it --prompt TEXT or --prompts FILE.")


def _class_batches(
    base: Base, indices: list[int], options: SamplingOptions, classes: Sequence[int] | None, device: torch.device
) -> Callable[[int, list[int]], torch.Tensor]:
    """DiT: `images(lo, batch)` for the batch starting at position `lo`, through the reference samplers."""
    model = base.model.to(device).eval()
    labels_all = resolve_labels(model.config.num_classes, classes, indices)
    sampler = make_sampler(options.scheduler, options.steps)
    mixed = autocast_dtype(options.mixed_precision)
    vae = base.vae(device, torch.float32)
    compiled = resolve_compile(options.compile, device)
    if compiled:
        compile_blocks(model)

    def images(lo: int, batch: list[int]) -> torch.Tensor:
        labels = labels_all[lo : lo + len(batch)]
        # Compiled: every batch at the full size (the last one padded), so one graph serves the run.
        padded, real = padded_batch(batch, options.batch_size) if compiled else (batch, len(batch))
        labels = torch.tensor(labels + labels[-1:] * (len(padded) - real), device=device)
        latents = sample_denoised(
            model,
            labels,
            sample_generators(options.seed, padded),
            cfg_scale=options.cfg_scale,
            cfg_channels=options.guided_channels,
            scheduler=sampler,
            autocast_dtype=mixed,
        )[:real]
        with (
            torch.inference_mode(),
            torch.autocast(device.type, dtype=mixed or torch.float32, enabled=mixed is not None),
        ):
            decoded = vae.decode(latents)
        check_finite(decoded, batch, options)
        return to_uint8(decoded)

    return images


def _text_batches(
    base: Base,
    indices: list[int],
    options: SamplingOptions,
    prompts: Sequence[str],
    device: torch.device,
    embeddings: TextEmbeddings | None,
) -> Callable[[int, list[int]], torch.Tensor]:
    """Text families: `images(lo, batch)` through the family's pipeline. Each distinct prompt (and the
    negative prompt) is encoded once, on its own, so its embedding does not depend on the other prompts
    of the run; the text encoder is freed before the first image."""
    family = family_of(base)
    per_image = [prompts[i % len(prompts)] for i in indices]
    negatives = [options.negative_prompt] if family.negative_prompts else []  # FLUX: no unconditional branch
    if embeddings is None:
        encode = family.prompt_encoder(base, device, base.max_text_tokens)
        embeddings = text_embeddings(
            per_image, encode, key="", cache_dir=None, batch_size=1, progress=False, extra=negatives
        )
        encode.report_truncated()
        del encode  # the encoder goes with it (T5-XXL: 9 GB)
    negative = {name: value for prompt in negatives for name, value in embeddings.of(prompt).items()}
    base.model.to(device).eval()

    def images(lo: int, batch: list[int]) -> torch.Tensor:
        text = embeddings.of_each(per_image[lo : lo + len(batch)])
        unconditional = {name: value.expand(len(batch), *value.shape[1:]) for name, value in negative.items()}
        out = family.sample_images(base, text, unconditional, sample_generators(options.seed, batch), options, device)
        check_finite(out, batch, options)
        return torch.from_numpy(to_bytes(out))

    return images


def generate(
    base: Base,
    n: int,
    options: SamplingOptions | None = None,
    *,
    classes: Sequence[int] | None = None,
    prompts: Sequence[str] | None = None,
    embeddings: TextEmbeddings | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """n images as uint8 (n, H, W, 3): samples 0..n-1 of `generate_batches`."""
    check_image_count("-n", n)
    batches = generate_batches(
        base,
        range(n),
        options or SamplingOptions(),
        classes=classes,
        prompts=prompts,
        embeddings=embeddings,
        device=device,
        progress=progress,
    )
    return torch.cat([images for _, images in batches])
