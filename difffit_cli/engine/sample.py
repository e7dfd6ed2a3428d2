"""Batched sampling with classifier-free guidance, and the PNG / grid / npz writers.

The loop follows the reference sample.py: the latent batch is run as [z, z] with labels [y, null]
through `forward_with_cfg` and only the conditional half is kept -- we keep only that half from
the start (the null half of the reference's batch never influences the result), so each step
runs the model on 2B inputs but steps and draws noise for B.

Determinism: sample i of a run with seed s draws its initial noise and every step's noise from
its own CPU generator (`sample_seed(s, i)`), so an image depends on (seed, index) only: not on
the batch size, the batch it lands in, the process that made it, or the device.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from difffit_cli.engine.diffusion import GaussianDiffusion
from difffit_cli.engine.dit import DiT
from difffit_cli.engine.errors import DiffFitError
from difffit_cli.engine.io import atomic_path
from difffit_cli.engine.progress import make_progress

if TYPE_CHECKING:
    from difffit_cli.engine.adapter import AdapterMeta
    from difffit_cli.engine.bases import Base

SCHEDULERS = ("ddpm", "ddim", "dpm-solver")
DEFAULT_STEPS = {"ddpm": 250, "ddim": 50, "dpm-solver": 25}
GRID_MAX = 64  # grid.png shows at most this many images (the first ones)


def sample_seed(seed: int, index: int) -> int:
    """The generator seed of sample `index`. torch's CPU generator keeps only 32 bits of a seed, so
    the pair is folded into 32 bits: injective in `index`, and different run seeds land far apart."""
    return (seed * 0x9E3779B1 + index) % 2**32


def sample_generators(seed: int, indices: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(sample_seed(seed, int(i))) for i in indices]


def draw_noise(
    generators: list[torch.Generator], shape: Sequence[int], device: torch.device | str
) -> torch.Tensor:
    """One standard-normal tensor of `shape` per generator, stacked: (len(generators), *shape)."""
    noise = torch.stack([torch.randn(tuple(shape), generator=g) for g in generators])
    return noise.to(device, non_blocking=True)


# -- schedulers -----------------------------------------------------------------------------------


class ReferenceSampler:
    """The reference's respaced samplers: ancestral DDPM with the learned variance, or DDIM (eta 0)."""

    def __init__(self, kind: str, steps: int):
        self.stochastic = kind == "ddpm"
        # DDIM uses the reference's even-stride "ddimN" spacing when N allows one (25, 50, 100, ...),
        # otherwise the section spacing "N" that the reference's sample.py uses for DDPM.
        spacing = str(steps)
        if kind == "ddim" and any(len(range(0, 1000, s)) == steps for s in range(1, 1000)):
            spacing = f"ddim{steps}"
        self.diffusion = GaussianDiffusion(spacing)
        self.timesteps = self.diffusion.timesteps[::-1]  # original timesteps, in sampling order

    def reset(self) -> None:
        pass

    def step_at(
        self, index: torch.Tensor, model_output: torch.Tensor, x: torch.Tensor, noise: torch.Tensor | None
    ) -> torch.Tensor:
        """x_t -> x_{t-1} at spaced step `index` (per sample); DDPM without noise returns the mean."""
        if self.stochastic:
            return self.diffusion.ddpm_step(
                model_output, x, index, torch.zeros_like(x) if noise is None else noise
            )
        return self.diffusion.ddim_step(model_output, x, index)

    def step(
        self, k: int, model_output: torch.Tensor, x: torch.Tensor, noise: torch.Tensor | None
    ) -> torch.Tensor:
        index = torch.full((len(x),), self.diffusion.num_steps - 1 - k, device=x.device, dtype=torch.long)
        return self.step_at(index, model_output, x, noise)


class DPMSolverSampler:
    """diffusers' multistep DPM-Solver++ on DiT's schedule (linear betas 1e-4..0.02, 1000 steps),
    driven by the epsilon half of the model output; deterministic, for quick previews."""

    stochastic = False

    def __init__(self, steps: int):
        from diffusers import DPMSolverMultistepScheduler

        self.scheduler = DPMSolverMultistepScheduler(
            num_train_timesteps=1000,
            beta_start=1e-4,
            beta_end=0.02,
            beta_schedule="linear",
            prediction_type="epsilon",
        )
        self.steps = steps
        self.reset()
        self.timesteps = [int(t) for t in self.scheduler.timesteps]

    def reset(self) -> None:
        self.scheduler.set_timesteps(self.steps)  # clears the multistep history between batches

    def step(
        self, k: int, model_output: torch.Tensor, x: torch.Tensor, noise: torch.Tensor | None
    ) -> torch.Tensor:
        eps = model_output[:, : x.shape[1]]
        return self.scheduler.step(eps, self.scheduler.timesteps[k], x).prev_sample


def make_sampler(scheduler: str, steps: int | None = None) -> ReferenceSampler | DPMSolverSampler:
    if scheduler not in SCHEDULERS:
        raise DiffFitError(f"Unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}.")
    steps = DEFAULT_STEPS[scheduler] if steps is None else steps
    if not 1 <= steps <= 1000:
        raise DiffFitError(f"--steps must be between 1 and 1000 (got {steps}).")
    if scheduler == "dpm-solver":
        return DPMSolverSampler(steps)
    return ReferenceSampler(scheduler, steps)


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
        with torch.autocast(
            x.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
        ):
            if guided:
                out = model.forward_with_cfg(torch.cat([x, x]), t_batch, y, cfg_scale, cfg_channels)[: len(x)]
            else:
                out = model(x, t_batch, y)
        return out.float()

    return denoise


@torch.inference_mode()
def sample_latents(
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
        raise DiffFitError(
            "The ddpm and ddim schedulers need a model with a learned variance; use dpm-solver."
        )
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


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8 on the CPU, the reference sample_ddp.py way."""
    return (
        torch.clamp(127.5 * images.float() + 128.0, 0, 255).permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8)
    )


# -- images ---------------------------------------------------------------------------------------


def parse_classes(
    specs: Sequence[str], class_names: Sequence[str] | None, num_classes: int
) -> list[int] | None:
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
            raise DiffFitError(
                f"Class index {key} is out of range; this model has classes 0..{num_classes - 1}."
            )
        elif class_names:
            shown = ", ".join(class_names[:20]) + (
                f", ... ({len(class_names) - 20} more)" if len(class_names) > 20 else ""
            )
            raise DiffFitError(
                f"Unknown class {spec!r}; valid classes: {shown}.", hint="Give a name or an index."
            )
        else:
            raise DiffFitError(
                f"Unknown class {spec!r}: this model has no class names; give an index 0..{num_classes - 1}."
            )
    return out


def resolve_labels(num_classes: int, classes: Sequence[int] | None, indices: Sequence[int]) -> list[int]:
    """Sample i gets classes[i % len(classes)]; by default the classes in turn."""
    classes = list(range(num_classes)) if not classes else [int(c) for c in classes]
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise DiffFitError(
            f"Class index {bad[0]} is out of range; this model has classes 0..{num_classes - 1}."
        )
    return [classes[i % len(classes)] for i in indices]


def generate_batches(
    base: Base,
    indices: Sequence[int],
    *,
    classes: Sequence[int] | None = None,
    cfg_scale: float = 4.0,
    cfg_channels: int | str = 3,
    scheduler: str = "ddpm",
    steps: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yield (sample indices, uint8 images (B, H, W, 3)) batch by batch, so callers can write as they go.

    `dtype` float32 is the exact reference numerics; bfloat16 / float16 run model and decoder under
    autocast. Moves `base.model` to `device`.
    """
    if batch_size < 1:
        raise DiffFitError(f"--batch-size must be at least 1 (got {batch_size}).")
    indices = [int(i) for i in indices]
    model = base.model.to(device).eval()
    labels_all = resolve_labels(model.config.num_classes, classes, indices)
    sampler = make_sampler(scheduler, steps)
    autocast_dtype = None if dtype == torch.float32 else dtype
    vae = base.vae(device, torch.float32)
    from rich.progress import TextColumn

    with make_progress(TextColumn("{task.fields[rate]}"), enabled=progress) as bar:
        task = bar.add_task("Sampling", total=len(indices), rate="")
        start = time.perf_counter()
        for lo in range(0, len(indices), batch_size):
            batch = indices[lo : lo + batch_size]
            labels = torch.tensor(labels_all[lo : lo + batch_size], device=device)
            latents = sample_latents(
                model,
                labels,
                sample_generators(seed, batch),
                cfg_scale=cfg_scale,
                cfg_channels=cfg_channels,
                scheduler=sampler,
                autocast_dtype=autocast_dtype,
            )
            with (
                torch.inference_mode(),
                torch.autocast(
                    torch.device(device).type,
                    dtype=autocast_dtype or torch.float32,
                    enabled=autocast_dtype is not None,
                ),
            ):
                images = to_uint8(vae.decode(latents))
            done = lo + len(batch)
            bar.update(task, advance=len(batch), rate=f"{done / (time.perf_counter() - start):.2f} img/s")
            yield batch, images


def generate(base: Base, n: int, **options) -> torch.Tensor:
    """n images as uint8 (n, H, W, 3): samples 0..n-1 of `generate_batches` (same options)."""
    if n < 1:
        raise DiffFitError(f"-n must be at least 1 (got {n}).")
    return torch.cat([images for _, images in generate_batches(base, range(n), **options)])


# -- writers --------------------------------------------------------------------------------------


def _as_numpy(images: torch.Tensor | np.ndarray) -> np.ndarray:
    array = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"expected uint8 images (N, H, W, 3), got {array.dtype} {array.shape}")
    return array


def save_pngs(images: torch.Tensor | np.ndarray, folder: str | Path, start: int = 0) -> list[Path]:
    """images[i] -> folder/{start + i:06d}.png, each written atomically (eval-fid reads them later)."""
    from PIL import Image

    folder = Path(folder)
    paths = []
    for i, image in enumerate(_as_numpy(images)):
        path = folder / f"{start + i:06d}.png"
        with atomic_path(path) as tmp:
            Image.fromarray(image).save(tmp, format="PNG")
        paths.append(path)
    return paths


def save_grid(images: torch.Tensor | np.ndarray, path: str | Path) -> Path:
    """A near-square grid, ceil(sqrt(n)) columns, row-major, unused cells black."""
    from PIL import Image

    array = _as_numpy(images)
    n, h, w, _ = array.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    for i, image in enumerate(array):
        r, c = divmod(i, cols)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = image
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")
    return path


def save_npz(images: torch.Tensor | np.ndarray, path: str | Path) -> Path:
    """`arr_0` = N x H x W x 3 uint8, the layout OpenAI's ADM evaluator reads."""
    array = _as_numpy(images)
    path = Path(path)
    with (
        atomic_path(path) as tmp,
        open(tmp, "wb") as f,
    ):  # a file object: np.savez would append ".npz" to a name
        np.savez(f, arr_0=array)
    return path


def load_pngs(paths: Sequence[str | Path]) -> np.ndarray:
    """PNG files -> uint8 (N, H, W, 3), filled into one preallocated array (50k images fit once)."""
    from PIL import Image

    out = None
    for i, path in enumerate(paths):
        image = np.asarray(Image.open(path).convert("RGB"))
        if out is None:
            out = np.empty((len(paths), *image.shape), dtype=np.uint8)
        out[i] = image
    return out


# -- a whole run into a folder --------------------------------------------------------------------


def shard(n: int, rank: int, world: int) -> range:
    """The contiguous block of sample indices process `rank` of `world` generates."""
    size = math.ceil(n / world)
    return range(min(n, rank * size), min(n, (rank + 1) * size))


def sample_to_folder(
    base: Base, folder: str | Path, n: int, *, npz: bool = False, state=None, progress: bool = True, **options
) -> dict:
    """Samples 0..n-1 -> folder/000000.png ..., grid.png (first 64) and, with npz, samples.npz.

    `state` (an accelerate PartialState) shards the indices over processes; each writes its own
    PNGs and the main process gathers them into the grid and the npz. Returns a summary dict.
    """
    if n < 1:
        raise DiffFitError(f"-n must be at least 1 (got {n}).")
    folder = Path(folder)
    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    is_main = rank == 0
    if is_main:
        folder.mkdir(parents=True, exist_ok=True)
        # Numbered PNGs left by an earlier, larger run would mix into this run's folder (and its FID).
        for stale in folder.glob("[0-9][0-9][0-9][0-9][0-9][0-9].png"):
            if int(stale.stem) >= n:
                stale.unlink()
    if state is not None:
        state.wait_for_everyone()
    start = time.perf_counter()
    for batch, images in generate_batches(
        base, shard(n, rank, world), progress=progress and is_main, **options
    ):
        save_pngs(images, folder, start=batch[0])
    if state is not None:
        state.wait_for_everyone()
    seconds = time.perf_counter() - start
    summary = {
        "dir": str(folder),
        "images": n,
        "seconds": round(seconds, 3),
        "images_per_second": round(n / seconds, 3),
    }
    if not is_main:
        return summary
    pngs = [folder / f"{i:06d}.png" for i in range(n)]
    summary["grid"] = str(save_grid(load_pngs(pngs[:GRID_MAX]), folder / "grid.png"))
    if npz:
        summary["npz"] = str(save_npz(load_pngs(pngs), folder / "samples.npz"))
    return summary


# -- sources --------------------------------------------------------------------------------------


def source_name(source: str) -> str:
    """A folder name for a source: the file stem (the parent's name for fit's adapter.safetensors)."""
    path = Path(source)
    if path.exists():
        name = path.parent.name if path.is_file() and path.stem in ("adapter", "model") else path.stem
        name = name or path.resolve().name
    else:  # a base spec such as "DiT-XL/2-256" or "random:DiT-S/2"
        name = source
    return re.sub(r"[^\w.-]+", "-", name).strip("-") or "samples"


def unique_names(sources: Sequence[str]) -> list[str]:
    names: list[str] = []
    for source in sources:
        name, k = source_name(source), 2
        while name in names:
            name, k = f"{source_name(source)}-{k}", k + 1
        names.append(name)
    return names


def iter_sources(
    sources: Sequence[str],
    *,
    base: str | None = None,
    vae: str | None = None,
    force_base: bool = False,
    device: str | torch.device = "cpu",
) -> Iterator[tuple[str, Base, AdapterMeta | None, list[str] | None]]:
    """(name, base on `device`, adapter meta or None, class names) per source, in order.

    Consecutive adapters of the same base share one loaded base: the next adapter's tensors are
    swapped in (milliseconds) instead of reloading the base.
    """
    from difffit_cli.engine.adapter import (
        AdapterSwapper,
        is_adapter_file,
        load_adapter_base,
        load_source,
        read_adapter,
    )

    key, loaded, swapper = None, None, None
    for source, name in zip(sources, unique_names(sources), strict=True):
        if not is_adapter_file(source):
            key, swapper = None, None
            loaded, _ = load_source(source, base=base, vae=vae, force_base=force_base)
            loaded.model.to(device)
            yield name, loaded, None, loaded.class_names
            continue
        tensors, meta = read_adapter(source)
        this_key = (base or meta.base_spec, meta.base_fingerprint, vae or meta.vae_spec)
        if this_key != key:
            loaded = load_adapter_base(source, meta, base=base, vae=vae, force_base=force_base)
            loaded.model.to(device)  # before swapping, so the swapper's saved base tensors live there too
            key, swapper = this_key, AdapterSwapper(loaded)
        swapper.apply(tensors, meta)
        yield name, loaded, meta, meta.class_names
