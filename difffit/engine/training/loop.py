"""The training loop: optimizer steps from the start step to `--steps`, each one's loss logged on schedule,
with checkpoints, validation and previews due between them.

One flat loop with one host sync per log line (`LossMeter.read`), collective under several processes; a
SIGINT/SIGTERM ends it at the next step (`StopFlag`), after which `fit` writes what the run has.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

import torch
from rich.progress import TextColumn

from difffit.engine.data.batches import step_seed
from difffit.engine.errors import DiffFitError
from difffit.engine.models.speed import attention_backend, choose_attention_backend
from difffit.engine.progress import make_progress
from difffit.engine.training.checkpoints import list_checkpoints
from difffit.engine.training.outputs import write_checkpoint, write_preview
from difffit.engine.training.setup import MEMORY_HINT
from difffit.engine.training.signals import StopFlag
from difffit.engine.training.state import Run
from difffit.engine.training.step import LossMeter, denoiser, step_generator, swapped_in, update_ema
from difffit.engine.training.validation import Validation


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
                    write_checkpoint(run, validation, step, state.elapsed(now))
                if config.sample_every and step % config.sample_every == 0 and step < config.steps:
                    write_preview(run, step)
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
