"""The training loop: an image folder and a base in, an adapter out.

Exactness on resume comes from one rule: every random draw of optimizer step s on process r is a
function of (seed, s, r). The data order is a per-epoch permutation seeded by (seed, epoch); the
flips, latent noise, timesteps and diffusion noise come from a generator seeded by (seed, s, r);
the global torch RNG (the model's label dropout) is re-seeded from the same triple each step. So a
checkpoint needs only the step, the trained tensors, the EMA and the optimizer state, and a run
resumed from step 20 computes exactly what an uninterrupted run computes.

Multi-GPU: `accelerate launch -m difffit_cli fit ...`. `--batch-size` is the global batch of one
optimizer step; each of P processes takes its own slice of it (batch / (P * grad_accum) per
micro-step), so results do not depend on how many GPUs ran them (up to reduction order).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from difffit_cli.engine.baselines import MethodSettings, parse_lora_targets
from difffit_cli.engine.devices import AUTOCAST_DTYPES, DEVICES, resolve_device
from difffit_cli.engine.errors import DiffFitError
from difffit_cli.engine.io import atomic_path
from difffit_cli.engine.progress import make_progress, stderr_console

if TYPE_CHECKING:
    from difffit_cli.engine.bases import Base

MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
NUM_TRAIN_TIMESTEPS = 1000
PREVIEW_IMAGES = 8
PREVIEW_STEPS = 25  # DDIM steps: previews must stay cheap next to training
CHECKPOINT = re.compile(r"^step-(\d{7})$")


@dataclass
class FitConfig:
    """Every option of `difffit fit`. None means "decided at run time" (from the base, method or data)."""

    data: str | None = None
    base: str | None = None
    vae: str | None = None  # default: the base's VAE
    method: str = "difffit"
    out: str | None = None  # default: runs/<data folder name>-<method>
    steps: int = 24000  # total optimizer steps of the run (a resumed run trains up to this)
    batch_size: int = 32  # global batch per optimizer step (all processes, all accumulation steps)
    lr: float | None = None  # default: 1e-3 for difffit and bitfit, 1e-4 for full
    seed: int = 0
    resolution: int | None = None  # default: the base's resolution
    num_heads: int | None = None  # only for a base of non-standard width that does not record it
    mixed_precision: str = "auto"  # auto = bf16 on CUDA, no on CPU
    device: str = "auto"
    save_every: int = 1000
    sample_every: int = 2000  # 0 = no preview grids
    resume: bool = False
    gamma_blocks: str | None = None  # default: the first half of the blocks
    ema: bool = True
    ema_decay: float = 0.9999
    cache_latents: bool = True
    cache_dir: str | None = None
    grad_checkpointing: bool = False
    compile: bool = False
    keep: int = 2
    log_every: int = 1
    warmup: int = 0
    grad_accum: int = 1
    adapter_dtype: str = "fp16"
    log_with: str | None = None
    num_workers: int | None = None  # image-loading processes; default min(8, CPUs)
    pos_embed: str | None = None  # when resolution differs from the base: "trick" (default) or "plain"
    # Method settings (engine/baselines.py MethodSettings has the defaults and where they come from).
    gamma_placement: str = "branch"  # difffit: "branch" or "branch+attn"
    rank: int = 8  # lora
    lora_alpha: float | None = None  # lora; default = rank
    lora_targets: str | None = None  # lora; default "qkv,proj"
    adapter_dim: int = 64  # adapter-parallel, adapter-sequential
    prompt_tokens: int = 8  # vpt-deep

    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (1e-4 if self.method == "full" else 1e-3)

    def method_settings(self) -> MethodSettings:
        return MethodSettings(gamma_placement=self.gamma_placement, rank=self.rank, lora_alpha=self.lora_alpha,
                              lora_targets=parse_lora_targets(self.lora_targets), adapter_dim=self.adapter_dim,
                              prompt_tokens=self.prompt_tokens).validate()


@dataclass
class FitResult:
    out_dir: Path
    adapter: Path | None
    step: int
    start_step: int
    steps: int
    loss: float | None
    images: int
    classes: int
    skipped: int
    trainable_params: int
    elapsed_s: float
    img_per_s: float | None
    interrupted: bool
    cache: str | None

    def to_dict(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()}


def default_out_dir(data: str | None, method: str) -> Path:
    name = Path(data).expanduser().resolve().name if data else "run"
    return Path("runs") / f"{name}-{method}"


# --------------------------------------------------------------------------------------------
# Randomness: everything is a function of (seed, step, rank)
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def list_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (a half-written one only ever exists under a .tmp- name)."""
    root = out_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT.match(p.name))]
    return sorted(c for c in found if (c[1] / "state.json").exists())


def save_checkpoint(out_dir: Path, step: int, params: dict[str, torch.Tensor], ema: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer, state: dict, keep: int) -> Path:
    from safetensors.torch import save_file

    path = out_dir / "checkpoints" / f"step-{step:07d}"
    tensors = {name: p.detach().float().cpu().contiguous() for name, p in params.items()}
    tensors.update({f"ema.{name}": e.detach().float().cpu().contiguous() for name, e in ema.items()})
    with atomic_path(path) as tmp:
        tmp.mkdir()
        save_file(tensors, str(tmp / "trained.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=1))
    for _, old in list_checkpoints(out_dir)[:-keep]:
        import shutil

        shutil.rmtree(old, ignore_errors=True)
    return path


def load_checkpoint(path: Path, params: dict[str, torch.nn.Parameter], ema: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer) -> dict:
    """Restore trained tensors, EMA and optimizer from `path`; returns its state.json."""
    from safetensors.torch import load_file

    state = json.loads((path / "state.json").read_text())
    tensors = load_file(str(path / "trained.safetensors"))
    expected = set(params) | {f"ema.{n}" for n in ema}
    if set(tensors) != expected or any(tensors[n].shape != p.shape for n, p in params.items()):
        raise DiffFitError(
            f"The checkpoint {path} was made for a different model or method than this run.",
            hint="Resume with the same --base, --method, --gamma-blocks and data, or choose a new --out.",
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])
        for name, e in ema.items():
            e.copy_(tensors[f"ema.{name}"])
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    return state


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def swapped_in(params: dict[str, torch.nn.Parameter], values: dict[str, torch.Tensor]):
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


class StopFlag:
    """Ctrl-C asks the loop to stop after the current step (a second Ctrl-C interrupts at once)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        stderr_console.print("[yellow]Stopping after this step (Ctrl-C again: abort, no save).[/yellow]")

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _make_accelerator(config: FitConfig, out_dir: Path):
    from accelerate import Accelerator

    if config.device not in DEVICES:
        raise DiffFitError(f"Unknown --device {config.device!r}; choose one of {', '.join(DEVICES)}.")
    if config.mixed_precision not in MIXED_PRECISION:
        raise DiffFitError(f"Unknown --mixed-precision {config.mixed_precision!r}; choose no, fp16 or bf16.")
    cuda = resolve_device(config.device).type == "cuda"
    precision = config.mixed_precision
    if precision == "auto":
        precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else ("fp16" if cuda else "no")
    if precision == "fp16" and not cuda:
        raise DiffFitError("--mixed-precision fp16 needs a CUDA GPU; use bf16 or no on the CPU.")
    if config.log_with is not None:
        import importlib.util

        if config.log_with != "tensorboard":
            raise DiffFitError(f"Unknown --log-with {config.log_with!r}; only tensorboard is supported.")
        if not any(importlib.util.find_spec(name) for name in ("tensorboard", "tensorboardX")):
            raise DiffFitError("--log-with tensorboard needs the tensorboard package.",
                               hint="pip install tensorboard")
    if cuda:
        # TF32 matmuls: ~2x faster fp32 parts on Ampere+, at precision far below the training noise.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # accelerate keeps one process-wide state; a second fit() in the same Python process with another
    # precision must start from a fresh one (the distributed PartialState is kept).
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=precision, cpu=not cuda, log_with=config.log_with,
                       project_dir=str(out_dir)), precision


def _check_config(config: FitConfig, base: Base | None) -> None:
    from difffit_cli.engine.difffit import METHODS

    if config.method not in METHODS:
        raise DiffFitError(f"Unknown --method {config.method!r}; choose one of {', '.join(METHODS)}.")
    if config.data is None:
        raise DiffFitError("No training data given.", hint="Pass a DATA folder or a --recipe with `data`.")
    if config.base is None and base is None:
        raise DiffFitError("No base model given.", hint="Pass --base, e.g. --base DiT-XL/2-256.")
    for name in ("steps", "batch_size", "keep", "log_every", "grad_accum"):
        if getattr(config, name) < 1:
            raise DiffFitError(f"--{name.replace('_', '-')} must be 1 or more (got {getattr(config, name)}).")
    for name in ("save_every", "sample_every", "warmup"):
        if getattr(config, name) < 0:
            raise DiffFitError(f"--{name.replace('_', '-')} must be 0 or more (got {getattr(config, name)}).")
    if not 0.0 <= config.ema_decay < 1.0:
        raise DiffFitError(f"--ema-decay must be in [0, 1) (got {config.ema_decay}).")
    config.method_settings()


def _report_skipped(skipped: list[tuple[Path, str]], total: int) -> None:
    for path, reason in skipped:
        stderr_console.print(f"skipped {path}: {reason}", highlight=False, markup=False)
    if skipped:
        stderr_console.print(f"[yellow]Skipped {len(skipped)} of {total} image files (named above).[/yellow]")


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines after `step` (written after the checkpoint a resumed run starts from)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            if json.loads(line)["step"] <= step:
                kept.append(line)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(f"{line}\n" for line in kept))


# --------------------------------------------------------------------------------------------
# fit
# --------------------------------------------------------------------------------------------


IMAGENET_WNID = re.compile(r"n\d{8}")


def same_classes(folder_names: list[str], base_num_classes: int, base_names: list[str] | None) -> bool:
    """Whether a dataset has the base's classes, so the base's class table is kept (not re-initialised).

    Same count, and the same names, or no names on the base, or ImageNet's sorted wnid folders
    (n01440764, ...) against a 1000-class base: their sorted order is the standard class order.
    """
    if len(folder_names) != base_num_classes:
        return False
    if base_names is None or list(base_names) == list(folder_names):
        return True
    return base_num_classes == 1000 and all(IMAGENET_WNID.fullmatch(name) for name in folder_names)


def fit(config: FitConfig, *, base: Base | None = None, progress: bool = True) -> FitResult:
    """Train an adapter as `config` says; see the module docstring for the guarantees.

    `base`: an already loaded base to train (its model is changed in place); by default
    `config.base` is loaded. `engine.resolution.move_to_resolution` moves it when `config.resolution`
    differs from its own.
    """
    from difffit_cli.engine import resolution as resolution_module
    from difffit_cli.engine.adapter import make_meta, save_adapter
    from difffit_cli.engine.bases import RANDOM_PREFIX, load_base
    from difffit_cli.engine.data import latent_cache, require_images, scan_image_folder
    from difffit_cli.engine.difffit import (
        cast_frozen_matrices,
        parse_gamma_blocks,
        prepare_model,
        trainable_parameters,
    )
    from difffit_cli.engine.diffusion import GaussianDiffusion
    from difffit_cli.engine.recipes import write_toml

    _check_config(config, base)
    out_dir = Path(config.out).expanduser() if config.out else default_out_dir(config.data, config.method)
    existing = list_checkpoints(out_dir)
    if existing and not config.resume:
        raise DiffFitError(f"{out_dir} already holds checkpoints of an earlier run.",
                           hint="Add --resume to continue it, or choose another --out.")
    accelerator, precision = _make_accelerator(config, out_dir)
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    progress = progress and main
    device = accelerator.device
    per_process, rest = divmod(config.batch_size, world * config.grad_accum)
    if rest or not per_process:
        raise DiffFitError(
            f"--batch-size {config.batch_size} does not split evenly over {world} process(es) x "
            f"--grad-accum {config.grad_accum}.", hint="Use a multiple of their product as the batch size.")

    # -- base, resolution, data ----------------------------------------------------------------
    folder = scan_image_folder(config.data)  # before the base: bad data fails fast
    if base is None:
        # --resolution sizes a random base; any other base keeps its own and is moved below.
        sized = config.base.startswith(RANDOM_PREFIX)
        base = load_base(config.base, resolution=config.resolution if sized else None, vae=config.vae,
                         num_heads=config.num_heads)
    base_config = base.config
    resolution = config.resolution or base.resolution
    pos_embed = "standard"
    if resolution != base.resolution:
        pos_embed = config.pos_embed or "trick"
        base = resolution_module.move_to_resolution(base, resolution, pos_embed)
    if resolution != base.config.input_size * base.vae_factor:
        raise DiffFitError(f"--resolution {resolution} does not match the base ({base.resolution} px).")

    num_workers = config.num_workers if config.num_workers is not None else min(8, os.cpu_count() or 1)
    cache = None
    if config.cache_latents:
        # The main process encodes; the others wait, then open the finished cache.
        for turn in (True, False):
            if main == turn:
                cache = latent_cache(folder, resolution, base.vae_spec, lambda: base.vae(device),
                                     config.cache_dir, per_process, device, num_workers, progress)
            accelerator.wait_for_everyone()
        bad = {folder.root / rel: reason for rel, reason in cache.bad.items()}
    else:
        from difffit_cli.engine.data import find_bad_images

        bad = find_bad_images(folder, resolution, num_workers, progress)
    total_files = len(folder.files)
    folder = folder.without(bad)
    if main:
        _report_skipped(folder.skipped, total_files)
    require_images(folder)
    labels_all = torch.tensor(folder.labels)
    rows = torch.from_numpy(cache.take(folder.files, folder.root)) if cache else None

    # -- model -----------------------------------------------------------------------------------
    model = base.model
    num_classes = len(folder.class_names)
    new_classes = not same_classes(folder.class_names, model.config.num_classes, base.class_names)
    # A kept table keeps the base's class names (e.g. ImageNet's labels for wnid folders).
    class_names = folder.class_names if new_classes or not base.class_names else list(base.class_names)
    gamma_blocks = None
    if config.method == "difffit":
        gamma_blocks = parse_gamma_blocks(config.gamma_blocks, model.config.depth)
    torch.manual_seed(step_seed(config.seed, 0xADD))  # the added modules' initialisation (LoRA A, adapters, prompts)
    settings = config.method_settings()
    prepare_model(model, config.method, gamma_blocks, num_classes, new_classes=new_classes, settings=settings)
    base_state = {n: p.detach().clone() for n, p in trainable_parameters(model).items()}
    autocast_dtype = AUTOCAST_DTYPES.get(precision)
    if autocast_dtype is not None:
        cast_frozen_matrices(model, autocast_dtype)  # same matmuls as autocast, half the weight memory
    model.set_gradient_checkpointing(config.grad_checkpointing)
    model.to(device).train()
    params = trainable_parameters(model)
    n_trainable = sum(p.numel() for p in params.values())
    lr = config.learning_rate()
    optimizer = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=0.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    forward = torch.compile(model) if config.compile else model
    ema = {n: p.detach().float().clone() for n, p in params.items()} if config.ema else {}
    diffusion = GaussianDiffusion(num_train_steps=NUM_TRAIN_TIMESTEPS)
    order = DataOrder(len(folder), config.seed)
    vae = None if cache else base.vae(device, torch.float32)
    latent_shape = (base.config.in_channels, base.config.input_size, base.config.input_size)

    # -- resume ----------------------------------------------------------------------------------
    start_step, elapsed_before = 0, 0.0
    if config.resume:
        for step_found, path in reversed(existing):
            try:
                state = load_checkpoint(path, params, ema, optimizer)
            except DiffFitError:
                raise
            except Exception as exc:  # a damaged checkpoint: fall back to the one before it
                stderr_console.print(f"[yellow]Checkpoint {path} is unreadable ({exc}); trying an older one.")
                continue
            start_step, elapsed_before = step_found, state.get("elapsed_s", 0.0)
            break
        else:
            if main:
                stderr_console.print(f"No checkpoint in {out_dir / 'checkpoints'}; starting from step 0.")
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        resolved = dataclasses.asdict(config) | {
            "data": str(Path(config.data).expanduser().resolve()), "base": base.spec, "out": str(out_dir),
            "lr": lr, "resolution": resolution, "mixed_precision": precision}
        resolved.pop("resume")
        with atomic_path(out_dir / "config.toml") as tmp:
            tmp.write_text(write_toml(resolved, header="Resolved configuration of this run (difffit fit)."))
        _truncate_log(out_dir / "log.jsonl", start_step)
    if config.log_with:
        accelerator.init_trackers("difffit", config={k: v for k, v in resolved.items() if v is not None}
                                  if main else None)

    unwrapped = accelerator.unwrap_model(model)
    training_summary = {"steps": start_step, "batch_size": config.batch_size, "lr": lr, "seed": config.seed,
                        "method": config.method, "images": len(folder), "ema": config.ema}

    def preview(step: int) -> None:
        if not (main and config.sample_every):
            return
        from difffit_cli.engine.sample import generate, save_grid

        with swapped_in(params, ema):
            images = generate(base, PREVIEW_IMAGES, classes=list(range(min(num_classes, PREVIEW_IMAGES))),
                              scheduler="ddim", steps=PREVIEW_STEPS, seed=config.seed,
                              batch_size=PREVIEW_IMAGES, device=device, dtype=autocast_dtype or torch.float32,
                              progress=False)
        unwrapped.train()
        save_grid(images, out_dir / "samples" / f"step-{step:07d}.png")

    def checkpoint(step: int, elapsed: float) -> None:
        if main:
            save_checkpoint(out_dir, step, params, ema, optimizer,
                            {"elapsed_s": elapsed, "method": config.method, "seed": config.seed}, config.keep)
        accelerator.wait_for_everyone()

    def write_adapter(step: int, loss: float | None) -> Path | None:
        if not main:
            return None
        path = out_dir / "adapter.safetensors"
        meta = make_meta(base, unwrapped, config.method, new_class_table=new_classes,
                         class_names=class_names, pos_embed=pos_embed, base_config=base_config,
                         training=training_summary | {"steps": step, "last_loss": loss}, settings=settings)
        with swapped_in(params, ema):
            save_adapter(path, unwrapped, base_state, meta, config.adapter_dtype)
        return path

    # -- the loop --------------------------------------------------------------------------------
    def micro_batch(step: int, micro: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents x0 and labels of micro-batch `micro` of `step` for this process."""
        start = step * config.batch_size + (micro * world + rank) * per_process
        index = order.take(start, per_process)
        flips = torch.randint(0, 2, (per_process,), generator=g)
        latent_noise = torch.randn((per_process, *latent_shape), generator=g)
        if cache is not None:
            from difffit_cli.engine.data import sample_latents

            cached = torch.from_numpy(np.ascontiguousarray(cache.rows[rows[index].numpy()]))
            x0 = sample_latents(cached.to(device), flips.to(device), latent_noise.to(device))
        else:
            from difffit_cli.engine.data import ImageDataset, to_model_range

            dataset = ImageDataset(folder.files, resolution)
            images = to_model_range(torch.stack([dataset[i][0] for i in index.tolist()])).to(device)
            images = torch.where(flips.to(device).view(-1, 1, 1, 1).bool(), images.flip(-1), images)
            mean, std = vae.encode(images)
            x0 = mean.float() + std.float() * latent_noise.to(device)
        return x0, labels_all[index].to(device)

    log_path = out_dir / "log.jsonl"
    step, loss_value, smoothed, rate = start_step, None, None, None
    t_start = time.perf_counter()
    t_first = None  # time after the first step of this process: rates ignore the slow first step
    interrupted = False
    from rich.progress import TextColumn

    bar = make_progress(TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]}"),
                        enabled=progress)
    try:
        if start_step == 0:
            preview(0)
        with bar, StopFlag() as stop, (log_path.open("a") if main else contextlib.nullcontext()) as log:
            task = bar.add_task("Training", total=config.steps, completed=start_step, loss="-", rate="")
            t_log, step_log = time.perf_counter(), step
            while step < config.steps:
                torch.manual_seed(step_seed(config.seed, step, rank, 1))  # the label dropout's RNG
                g = torch.Generator().manual_seed(step_seed(config.seed, step, rank, 2))
                for group in optimizer.param_groups:
                    group["lr"] = lr * min(1.0, (step + 1) / config.warmup) if config.warmup else lr
                sums = torch.zeros(4, device=device)
                for micro in range(config.grad_accum):
                    x0, y = micro_batch(step, micro, g)
                    t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (per_process,), generator=g).to(device)
                    noise = torch.randn(x0.shape, generator=g).to(device)
                    sync = micro == config.grad_accum - 1
                    with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                        losses = diffusion.training_losses(
                            lambda xt, ts, y=y: forward(xt, ts, y).float(), x0, t, noise)
                        loss = losses["loss"].mean()
                        accelerator.backward(loss / config.grad_accum)
                    sums[:3] += torch.stack([loss, losses["mse"].mean(), losses["vb"].mean()]).detach()
                sums[:3] /= config.grad_accum
                sums[3] = float(stop.requested)
                stats = accelerator.reduce(sums, "mean").tolist() if world > 1 else sums.tolist()
                if not all(math.isfinite(v) for v in stats[:3]):
                    kept = list_checkpoints(out_dir)
                    raise DiffFitError(
                        f"The loss became {stats[0]} at step {step + 1}; training stopped"
                        + (f" (the checkpoint of step {kept[-1][0]} is kept)." if kept else "."),
                        hint="Lower --lr, add --warmup, or use --mixed-precision bf16 or no instead of fp16.")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if ema:
                    decay = min(config.ema_decay, (1 + step) / (10 + step))  # warm-up for short runs
                    with torch.no_grad():
                        trained = [p.detach().float() for p in params.values()]
                        torch._foreach_lerp_(list(ema.values()), trained, 1 - decay)
                step += 1
                loss_value = stats[0]
                smoothed = loss_value if smoothed is None else 0.95 * smoothed + 0.05 * loss_value
                now = time.perf_counter()
                t_first = t_first or now
                done = step - start_step - 1  # steps after the first (slow) one
                rate = config.batch_size * done / (now - t_first) if now > t_first else None
                bar.update(task, advance=1, loss=f"{smoothed:.4f}", rate=f"{rate:.1f} img/s" if rate else "")
                if main and (step % config.log_every == 0 or step == config.steps):
                    interval_rate = config.batch_size * (step - step_log) / max(now - t_log, 1e-9)
                    record = {"step": step, "loss": stats[0], "mse": stats[1], "vb": stats[2],
                              "lr": optimizer.param_groups[0]["lr"], "img_per_s": round(interval_rate, 3),
                              "elapsed_s": round(elapsed_before + now - t_start, 3)}
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    t_log, step_log = now, step
                    if config.log_with:
                        accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
                if stats[3] > 0:
                    interrupted = True
                    break
                if config.save_every and step % config.save_every == 0 and step < config.steps:
                    checkpoint(step, elapsed_before + now - t_start)
                if config.sample_every and step % config.sample_every == 0 and step < config.steps:
                    preview(step)
    except torch.cuda.OutOfMemoryError:
        raise DiffFitError(
            f"CUDA ran out of memory with {per_process} images per micro-step on {device}.",
            hint="Try a smaller --batch-size or a larger --grad-accum, --grad-checkpointing, "
                 "or --mixed-precision bf16.") from None
    elapsed = time.perf_counter() - t_start
    if step > start_step or not existing:
        checkpoint(step, elapsed_before + elapsed)
    if not interrupted and config.sample_every and step > start_step:
        preview(step)
    adapter = write_adapter(step, loss_value)
    if config.log_with:
        accelerator.end_training()
    return FitResult(out_dir=out_dir, adapter=adapter, step=step, start_step=start_step, steps=config.steps,
                     loss=loss_value, images=len(folder), classes=num_classes, skipped=len(folder.skipped),
                     trainable_params=n_trainable, elapsed_s=round(elapsed, 3),
                     img_per_s=round(rate, 3) if rate else None, interrupted=interrupted,
                     cache=str(cache.path) if cache else None)
