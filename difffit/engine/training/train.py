"""fit(): an image folder and a base in, an adapter out.

`fit` reads as an outline of named phases (accelerator, inputs, data, trainable state: engine.training.setup,
each returning what it made; then resume, loop, finish); `train_loop` is the one flat training loop.
Randomness and batch splitting live in `engine.data.batches` (every draw is a function of (seed, step,
process), so a resumed run equals an uninterrupted one); checkpoint files in `engine.training.checkpoints`.

Multi-GPU: `accelerate launch -m difffit fit ...`; process 0 writes every file.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import torch
from rich.progress import TextColumn

from difffit.engine.data.batches import Split, step_seed
from difffit.engine.data.hf_datasets import HF_PREFIX
from difffit.engine.devices import make_accelerator, tf32_matmuls
from difffit.engine.errors import DiffFitError
from difffit.engine.evaluation.sample import generate
from difffit.engine.evaluation.sample_folder import save_grid
from difffit.engine.io import atomic_path, run_lock
from difffit.engine.methods.adapter import make_meta, save_adapter
from difffit.engine.models.bases import Base
from difffit.engine.models.families import family_of, resolve_base
from difffit.engine.models.speed import attention_backend, choose_attention_backend
from difffit.engine.progress import make_progress, say
from difffit.engine.training.checkpoints import (
    check_run_folder,
    claim_run_folder,
    list_checkpoints,
    nothing_to_resume,
    restore_newest,
    save_checkpoint,
    truncate_log,
)
from difffit.engine.training.conditions import (
    PREVIEW_IMAGES,
    check_options,
    preview_inputs,
    preview_options,
    text_summary,
    with_family_defaults,
)
from difffit.engine.training.config import FitConfig, FitResult
from difffit.engine.training.loss_plot import write_loss_plot
from difffit.engine.training.recipes import write_toml
from difffit.engine.training.resume import RUN_KEY, check_same_run, run_identity
from difffit.engine.training.setup import (
    MEMORY_HINT,
    Data,
    Inputs,
    Trainable,
    check_base_shapes,
    open_inputs,
    prepare_data,
    prepare_trainable_state,
)
from difffit.engine.training.signals import StopFlag
from difffit.engine.training.state import Run
from difffit.engine.training.step import LossMeter, denoiser, step_generator, swapped_in, update_ema
from difffit.engine.training.trackers import check_log_with, log_preview
from difffit.engine.training.validation import Validation

if TYPE_CHECKING:
    from accelerate import Accelerator

    from difffit.engine.data.images import ImageFolder


def fit(config: FitConfig, *, base: Base | None = None, progress: bool = True) -> FitResult:
    """Train an adapter as `config` says. `base`: an already loaded base (changed in place), else
    `config.base` is loaded. A `config.resolution` other than the base's moves the base there first."""
    config.validate()
    check_log_with(config.log_with)  # the tracker's package installed (and wandb offline without a network)
    check_base_shapes(config)
    out_dir = config.out_dir()
    check_run_folder(out_dir, config.data)
    accelerator, precision = make_accelerator(config.device, config.mixed_precision, config.log_with, out_dir)
    # a global batch the processes cannot share equally is refused before anything is read or written
    Split(config.batch_size, config.grad_accum, accelerator.process_index, accelerator.num_processes)
    with contextlib.ExitStack() as held:
        held.enter_context(tf32_matmuls(accelerator.device.type == "cuda"))
        # bad options for the base's family, bad data, then a bad base, fail before --out is touched
        spec = resolve_base(config.base) if base is None else None
        family = family_of(base) if base is not None else spec.family
        check_options(config, family)
        config = with_family_defaults(config, family)
        inputs = open_inputs(config, base, spec, family)
        if accelerator.is_main_process:
            held.enter_context(run_lock(out_dir))
        checkpoints = list_checkpoints(out_dir)
        if done := nothing_to_resume(config, out_dir, checkpoints):
            return done
        if accelerator.is_main_process:
            claim_run_folder(out_dir)
        progress = progress and accelerator.is_main_process
        data = prepare_data(config, accelerator, inputs, family, progress)
        trainable = prepare_trainable_state(config, accelerator, precision, inputs.base, family, data)
        run = _make_run(config, out_dir, accelerator, precision, inputs, data, trainable)
        return _train(run, inputs.val_folder, checkpoints, progress)


def _make_run(
    config: FitConfig,
    out_dir: Path,
    accelerator: Accelerator,
    precision: str,
    inputs: Inputs,
    data: Data,
    trainable: Trainable,
) -> Run:
    """The Run the setup phases' results make, with the identity its checkpoints record."""
    base, conditioning = inputs.base, data.conditioning
    resolved = _resolved_config(config, base, out_dir, precision)
    identity = run_identity(
        resolved,
        data.folder,
        base.fingerprint,
        base.vae_spec,
        [b.summary() for b in data.buckets] if data.buckets else None,
    )
    return Run(
        config,
        out_dir,
        accelerator,
        precision,
        base,
        inputs.base_config,
        inputs.pos_embed,
        resolved,
        data.folder,
        data.batches,
        data.buckets,
        data.cache,
        conditioning.class_names,
        conditioning.new_classes,
        conditioning.preview_prompts,
        trainable.model,
        trainable.optimizer,
        trainable.params,
        trainable.base_state,
        trainable.ema,
        identity,
    )


def _train(run: Run, val_folder: ImageFolder | None, checkpoints: list[tuple[int, Path]], progress: bool) -> FitResult:
    """Resume, train, and write the adapter: the run's FitResult."""
    config, accelerator = run.config, run.accelerator
    start_step, elapsed_before = _resume(run, checkpoints)
    if run.main:
        _write_run_record(run, start_step)
    if config.log_with:
        accelerator.init_trackers("difffit", config=_tracker_config(run) if run.main else None)
    training = {
        "steps": start_step,
        "batch_size": config.batch_size,
        "lr": config.learning_rate(),
        "seed": config.seed,
        "method": config.method,
        "images": len(run.folder),
        "ema": config.ema,
        **config.loss_weighting(),
        **text_summary(run),
        **({"buckets": [b.summary() for b in run.buckets]} if run.buckets else {}),
    }
    validation = None
    if val_folder is not None or config.eval_every:
        validation = Validation(
            run,
            val_folder,
            lambda step: _write_adapter(run, training | {"steps": step}, "best/adapter.safetensors"),
            progress,
        )
        validation.restore(run.out_dir, start_step)
    # -- the loop, then the finish -----------------------------------------------------------------------
    if start_step == 0:
        _preview(run, 0)
    outcome = train_loop(run, validation, start_step, elapsed_before, progress)
    if outcome.step > start_step or not checkpoints:
        _checkpoint(run, validation, outcome.step, elapsed_before + outcome.elapsed)
    if not outcome.stop_signal and config.sample_every and outcome.step > start_step:
        _preview(run, outcome.step)
    adapter = _write_adapter(
        run,
        training
        | {"steps": outcome.step, "last_loss": outcome.loss, "elapsed_s": round(elapsed_before + outcome.elapsed, 3)},
    )
    if run.main:
        write_loss_plot(run.out_dir / "log.jsonl", run.out_dir / "loss.png")
    if config.log_with:
        accelerator.end_training()
    return FitResult(
        out_dir=run.out_dir,
        adapter=adapter,
        step=outcome.step,
        start_step=start_step,
        steps=config.steps,
        loss=outcome.loss,
        images=len(run.folder),
        classes=len(run.class_names),
        skipped=len(run.folder.skipped),
        trainable_params=sum(p.numel() for p in run.params.values()),
        elapsed_s=round(outcome.elapsed, 3),
        img_per_s=round(outcome.rate, 3) if outcome.rate else None,
        interrupted=outcome.stop_signal is not None,
        stop_signal=outcome.stop_signal,
        cache=run.cache,
        buckets=training.get("buckets"),
        **(validation.result() if validation else {}),
    )


def _resume(run: Run, checkpoints: list[tuple[int, Path]]) -> tuple[int, float]:
    """(start step, seconds trained before) from the newest readable checkpoint; (0, 0) for a new run."""
    if not run.config.resume:
        return 0, 0.0

    def same_run(state: dict) -> None:
        trained_on = state.get("class_names")
        if trained_on is not None and trained_on != run.class_names:
            raise DiffFitError(
                f"The data's classes changed since the checkpoint: it was trained on [{', '.join(trained_on)}], "
                f"the data now has [{', '.join(run.class_names)}].",
                hint="Resume with the same class folders, or start a new run with another --out.",
            )
        check_same_run(state.get(RUN_KEY), run.identity, str(run.out_dir / "checkpoints"))

    step, state = restore_newest(checkpoints, run.params, run.ema, run.optimizer, check=same_run)
    if not state and run.main:
        say(f"No checkpoint in {run.out_dir / 'checkpoints'}; starting from step 0.")
    return step, state.get("elapsed_s", 0.0)


def _resolved_config(config: FitConfig, base: Base, out_dir: Path, precision: str) -> dict:
    """The run's options as resolved: paths absolute, the learning rate, resolution and precision decided."""
    data = config.data if config.data.startswith(HF_PREFIX) else str(Path(config.data).expanduser().resolve())
    resolved = config.options() | {
        "data": data,
        "base": base.spec,
        "out": str(out_dir),
        "lr": config.learning_rate(),
        "resolution": config.resolution or base.resolution,
        "mixed_precision": precision,
    }
    resolved.pop("resume")
    return resolved


def _write_run_record(run: Run, start_step: int) -> None:
    run.out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(run.out_dir / "config.toml") as tmp:
        tmp.write_text(write_toml(run.resolved, header="Resolved configuration of this run (difffit fit)."))
    truncate_log(run.out_dir / "log.jsonl", start_step)


def _tracker_config(run: Run) -> dict:
    # Trackers take scalars and strings: a per-class [repeats] table goes as its text.
    return {k: str(v) if isinstance(v, dict) else v for k, v in run.resolved.items() if v is not None}


# -- the loop ---------------------------------------------------------------------------------------


@dataclass
class Outcome:
    step: int
    loss: float | None
    rate: float | None  # images per second after the first (slow) step
    elapsed: float
    stop_signal: str | None  # "SIGINT" or "SIGTERM" when a signal stopped the run early


@dataclass
class LoopState:
    """What changes as the loop runs: the step, the loss as logged and smoothed, the clock, a stop."""

    step: int
    start_step: int
    elapsed_before: float  # seconds trained before this process started (a resumed run)
    t_start: float
    t_log: float  # when the last log line was written, and at which step
    step_log: int
    t_first: float | None = None  # the end of the first (slow) step: rates start there
    loss: float | None = None
    smoothed: float | None = None
    rate: float | None = None  # images per second
    stop_signal: str | None = None

    @classmethod
    def start(cls, step: int, elapsed_before: float) -> LoopState:
        now = time.perf_counter()
        return cls(step, step, elapsed_before, now, now, step)

    def advance(self, batch_size: int) -> float:
        """One optimizer step done: count it, update the rate; the time now."""
        self.step += 1
        now = time.perf_counter()
        self.t_first = self.t_first or now
        steps = self.step - self.start_step - 1
        self.rate = batch_size * steps / (now - self.t_first) if now > self.t_first else None
        return now

    def elapsed(self, now: float) -> float:
        """Seconds trained in all, the run's earlier processes included."""
        return self.elapsed_before + now - self.t_start


def train_loop(
    run: Run, validation: Validation | None, start_step: int, elapsed_before: float, progress: bool
) -> Outcome:
    """Optimizer steps from `start_step` to `config.steps`: log, checkpoint, validate and preview on schedule."""
    config, accelerator = run.config, run.accelerator
    device, world = accelerator.device, accelerator.num_processes
    optimizer_step = _optimizer_step(run)
    meter = LossMeter(device, config.log_every)  # loss sums stay on the device between log lines
    state = LoopState.start(start_step, elapsed_before)
    bar = make_progress(TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]}"), enabled=progress)
    # flash or cuDNN attention, whichever measures faster here (CUDA, where the family says its shape; else SDPA's)
    shape = run.family.attention_shape(run.base.model)
    per_process = run.batches.split.per_process
    backend = choose_attention_backend(device, batch=per_process, **shape) if shape else None
    try:
        # The log opens after the signal handlers are in place: a run whose log exists can always be stopped.
        with (
            bar,
            StopFlag() as stop,
            attention_backend(backend),
            (run.out_dir / "log.jsonl").open("a") if run.main else contextlib.nullcontext() as log,
        ):
            task = bar.add_task("Training", total=config.steps, completed=start_step, loss="-", rate="")
            while state.step < config.steps:
                optimizer_step(state.step, meter)
                now = state.advance(config.batch_size)
                step = state.step
                checkpoint_due = config.save_every and step % config.save_every == 0 and step < config.steps
                requested = stop.requested  # a host flag: no device sync
                # The one host sync. Collective under several processes: on schedule there, never on one's own.
                if meter.due(step, config.steps) or checkpoint_due or (requested and world == 1):
                    stats = meter.read(
                        lambda v: accelerator.reduce(v, "mean") if world > 1 else v, extra=(float(requested),)
                    )
                    _log_step(run, state, stats, now, log)
                    bar.update(task, loss=f"{state.smoothed:.4f}")
                    if stats["extra"][0] > 0:
                        state.stop_signal = stop.signal or "SIGTERM"  # or another process of the run was signalled
                        break
                bar.update(task, advance=1, rate=f"{state.rate:.1f} img/s" if state.rate else "")
                if validation and validation.due(step):  # before the checkpoint, which records the best
                    with swapped_in(run.params, run.ema):
                        validation.evaluate(run, step, log)
                if checkpoint_due:
                    _checkpoint(run, validation, step, state.elapsed(now))
                if config.sample_every and step % config.sample_every == 0 and step < config.steps:
                    _preview(run, step)
    except torch.cuda.OutOfMemoryError:
        raise DiffFitError(
            f"CUDA ran out of memory with {per_process} images per micro-step on {device}.",
            hint=f"Try a smaller --batch-size or a larger --grad-accum. {MEMORY_HINT}",
        ) from None
    return Outcome(state.step, state.loss, state.rate, time.perf_counter() - state.t_start, state.stop_signal)


def _optimizer_step(run: Run) -> Callable[[int, LossMeter], None]:
    """The function that makes optimizer step `step` (its micro-steps' losses added to `meter`)."""
    config, accelerator, optimizer, model = run.config, run.accelerator, run.optimizer, run.model
    device, split, lr = accelerator.device, run.batches.split, config.learning_rate()
    # DiT's: linear betas over 1000 steps; SD3's and FLUX's: rectified flow at --timestep-sampling's draws
    diffusion = run.family.diffusion(run.base, config.timestep_sampling)
    mse_weights = diffusion.mse_weights(config.snr_gamma, config.p2_gamma)
    scaler = torch.amp.GradScaler(device.type, enabled=run.precision == "fp16")
    forward = run.family.forward(model, run.base)

    def optimizer_step(step: int, meter: LossMeter) -> None:
        # Every draw is of the global batch, each process keeping its slice's rows (engine.data.batches)
        torch.manual_seed(step_seed(config.seed, step, 1))  # any randomness inside the model
        g = torch.Generator().manual_seed(step_seed(config.seed, step, 2))  # flips, latent noise, dropout
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / config.warmup) if config.warmup else lr
        for micro in range(config.grad_accum):
            x0, y = run.batches.micro_batch(step, micro, g)
            if micro == 0:  # the global batch's timesteps and noise, on the device
                ts, noises = diffusion.draw(step_generator(device, config.seed, step), config.batch_size, x0.shape[1:])
            t, noise = ts[split.rows(micro)], noises[split.rows(micro)]
            sync = micro == config.grad_accum - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                losses = diffusion.training_losses(denoiser(forward, y, run.autocast_dtype), x0, t, noise, mse_weights)
                loss = losses["loss"].mean()
                accelerator.backward(scaler.scale(loss / config.grad_accum))
            meter.add(loss, losses["mse"].mean(), losses["vb"].mean())
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        update_ema(run.ema, run.params, step, config.ema_decay)

    return optimizer_step


def _log_step(run: Run, state: LoopState, stats: dict, now: float, log: TextIO | None) -> None:
    """Take a LossMeter reading: refuse a loss that is not finite, else keep it and write its log line."""
    step = state.step
    if not stats["finite"]:
        kept = list_checkpoints(run.out_dir)
        raise DiffFitError(
            f"The loss became {stats['loss']} within the {stats['steps']} step(s) before step {step}; "
            "training stopped" + (f" (the checkpoint of step {kept[-1][0]} is kept)." if kept else "."),
            hint="Lower --lr, add --warmup, or use --mixed-precision bf16 or no instead of fp16.",
        )
    state.loss = stats["loss"]
    state.smoothed = state.loss if state.smoothed is None else 0.95 * state.smoothed + 0.05 * state.loss
    if not run.main:
        return
    batch_size = run.config.batch_size
    record = {
        "step": step,
        "loss": stats["loss"],
        "mse": stats["mse"],
        "vb": stats["vb"],
        "lr": run.optimizer.param_groups[0]["lr"],
        "img_per_s": round(batch_size * (step - state.step_log) / max(now - state.t_log, 1e-9), 3),
        "elapsed_s": round(state.elapsed(now), 3),
    }
    log.write(json.dumps(record) + "\n")
    log.flush()
    state.t_log, state.step_log = now, step
    if run.config.log_with:
        run.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)


# -- outputs ----------------------------------------------------------------------------------------


def _checkpoint(run: Run, validation: Validation | None, step: int, elapsed: float) -> None:
    if run.main:
        state = {
            "elapsed_s": elapsed,
            "method": run.config.method,
            "seed": run.config.seed,
            "class_names": run.class_names,
            "images": len(run.folder),
            RUN_KEY: run.identity,
            **(validation.state() if validation else {}),
        }
        save_checkpoint(run.out_dir, step, run.params, run.ema, run.optimizer, state, run.config.keep)
    run.accelerator.wait_for_everyone()


def _preview(run: Run, step: int) -> None:
    """A grid of the first classes from the EMA weights, fixed seed: samples/step-NNNNNNN.png."""
    if not (run.main and run.config.sample_every):
        return
    options = preview_options(run)
    with swapped_in(run.params, run.ema):
        images = generate(
            run.base, PREVIEW_IMAGES, options, **preview_inputs(run), device=run.accelerator.device, progress=False
        )
    run.accelerator.unwrap_model(run.model).train()
    grid = save_grid(images, run.out_dir / "samples" / f"step-{step:07d}.png")
    write_loss_plot(run.out_dir / "log.jsonl", run.out_dir / "loss.png")
    if run.config.log_with:
        log_preview(run.accelerator, grid, step)


def _write_adapter(run: Run, training: dict, name: str = "adapter.safetensors") -> Path | None:
    if not run.main:
        return None
    path = run.out_dir / name
    model = run.accelerator.unwrap_model(run.model)
    meta = make_meta(
        run.base,
        model,
        run.config.method,
        settings=run.config.method_settings,
        new_class_table=run.new_classes,
        class_names=run.class_names,
        pos_embed=run.pos_embed,
        base_config=run.base_config,
        training=training,
    )
    with swapped_in(run.params, run.ema):
        save_adapter(path, model, run.base_state, meta, run.config.adapter_dtype)
    return path
