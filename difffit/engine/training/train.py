"""fit(): an image folder and a base in, an adapter out.

`fit` reads as an outline of named phases (accelerator, base, data, trainable state, resume, loop,
finish); `train_loop` is the one flat training loop. Randomness and batch splitting live in
`engine.data.batches` (every draw is a function of (seed, step, process), so a resumed run equals an
uninterrupted one); checkpoint files in `engine.training.checkpoints`.

Multi-GPU: `accelerate launch -m difffit fit ...`; process 0 writes every file.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.progress import TextColumn

from difffit.engine.data.batches import Batches, BucketOrder, DataOrder, Split, item_repeats, step_seed
from difffit.engine.data.buckets import bucketed_latents, show_buckets
from difffit.engine.data.hf_datasets import HF_PREFIX, open_data
from difffit.engine.data.images import report_skipped, require_images, without_unreadable_classes
from difffit.engine.data.latents import usable_latents
from difffit.engine.devices import make_accelerator, one_builder_first, tf32_matmuls
from difffit.engine.errors import DiffFitError
from difffit.engine.evaluation.sample import generate
from difffit.engine.evaluation.sample_folder import save_grid
from difffit.engine.io import atomic_path, run_lock
from difffit.engine.methods.adapter import make_meta, save_adapter
from difffit.engine.methods.trainable import (
    cast_frozen_matrices,
    parse_gamma_blocks,
    prepare_model,
    trainable_parameters,
)
from difffit.engine.models.bases import Base
from difffit.engine.models.families import family_of, resolve_base
from difffit.engine.models.family import BaseSpec, Family
from difffit.engine.models.fp8 import quantize_frozen_linears
from difffit.engine.models.resolution import move_to_resolution
from difffit.engine.models.speed import (
    attention_backend,
    choose_attention_backend,
    compile_blocks,
    make_optimizer,
    resolve_compile,
)
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
    apply_family_defaults,
    check_options,
    check_text_tokens,
    prepare_conditions,
    preview_inputs,
    preview_options,
    text_summary,
    with_captions,
)
from difffit.engine.training.config import FitConfig, FitResult
from difffit.engine.training.held_out import held_out_prompts, split_validation
from difffit.engine.training.loss_plot import write_loss_plot
from difffit.engine.training.recipes import write_toml
from difffit.engine.training.resume import RUN_KEY, check_same_run, run_identity
from difffit.engine.training.signals import StopFlag
from difffit.engine.training.state import Run
from difffit.engine.training.step import (
    LossMeter,
    denoiser,
    step_generator,
    swapped_in,
    update_ema,
)
from difffit.engine.training.trackers import log_preview
from difffit.engine.training.validation import Validation

MEMORY_HINT = ("--grad-checkpointing recomputes activations; --mixed-precision bf16 halves the frozen weights, and "
               "fp8 (on an FP8 GPU) halves them again.")


def fit(config: FitConfig, *, base: Base | None = None, progress: bool = True) -> FitResult:
    """Train an adapter as `config` says. `base`: an already loaded base (changed in place), else
    `config.base` is loaded. A `config.resolution` other than the base's moves the base there first."""
    config.validate()
    out_dir = config.out_dir()
    check_run_folder(out_dir, config.data)
    # -- accelerator, data, base at the run's resolution; then the lock on --out ---------------------
    accelerator, precision = make_accelerator(config.device, config.mixed_precision, config.log_with, out_dir)
    # a global batch the processes cannot share equally is refused before anything is read or written
    Split(config.batch_size, config.grad_accum, accelerator.process_index, accelerator.num_processes)
    with contextlib.ExitStack() as held:
        held.enter_context(tf32_matmuls(accelerator.device.type == "cuda"))
        # bad options for the base's family, bad data, then a bad base, fail before --out is touched
        spec = resolve_base(config.base) if base is None else None
        family = family_of(base) if base is not None else spec.family
        check_options(config, family)
        apply_family_defaults(config, family)
        data = open_data(config.data, config.image_column, config.label_column, config.caption_column)
        folder = with_captions(data, config, family)
        if family.conditioning != "text":
            folder, val_folder = split_validation(config, folder)
            config.check_data(folder)
        base, base_config, pos_embed = _load_base_at_resolution(config, base, family, spec)
        family.check_ready(base)
        check_text_tokens(config, family, base)
        if family.conditioning == "text":  # held out per bucket shape, which the base's patch and VAE decide
            folder, val_folder = split_validation(config, folder, family, base)
            config.check_data(folder)
        config.check_architecture(family.config_of(base.model), family)  # before the method's modules exist
        if accelerator.is_main_process:
            held.enter_context(run_lock(out_dir))
        checkpoints = list_checkpoints(out_dir)
        if done := nothing_to_resume(config, out_dir, checkpoints):
            return done
        if accelerator.is_main_process:
            claim_run_folder(out_dir)
        run = Run(config, out_dir, accelerator, precision, base, pos_embed, folder, [], True)
        run.held_out_prompts = held_out_prompts(config, val_folder) if family.conditioning == "text" else []
        _prepare_data(run, progress and run.main)
        # -- trainable state, resume ------------------------------------------------------------------
        _prepare_trainable_state(run)
        run.identity = run_identity(_resolved_config(run), run.folder, run.base.fingerprint, run.base.vae_spec,
                                    [b.summary() for b in run.buckets] if run.buckets else None)
        start_step, elapsed_before = _resume(run, checkpoints)
        if run.main:
            _write_run_record(run, start_step)
        if config.log_with:
            accelerator.init_trackers("difffit", config=_tracker_config(run) if run.main else None)
        training = {"steps": start_step, "batch_size": config.batch_size, "lr": config.learning_rate(),
                    "seed": config.seed, "method": config.method, "images": len(run.folder), "ema": config.ema,
                    **config.loss_weighting(), **text_summary(run),
                    **({"buckets": [b.summary() for b in run.buckets]} if run.buckets else {})}
        if val_folder is not None or config.eval_every:
            run.validation = Validation(run, val_folder, lambda step: _write_adapter(
                run, base_config, training | {"steps": step}, "best/adapter.safetensors"), progress and run.main)
            run.validation.restore(out_dir, start_step)
        # -- the loop, then the finish -----------------------------------------------------------------
        if start_step == 0:
            _preview(run, 0)
        outcome = train_loop(run, start_step, elapsed_before, progress and run.main)
        if outcome.step > start_step or not checkpoints:
            _checkpoint(run, outcome.step, elapsed_before + outcome.elapsed)
        if not outcome.stop_signal and config.sample_every and outcome.step > start_step:
            _preview(run, outcome.step)
        adapter = _write_adapter(run, base_config, training | {
            "steps": outcome.step, "last_loss": outcome.loss, "elapsed_s": round(elapsed_before + outcome.elapsed, 3)})
        if run.main:
            write_loss_plot(run.out_dir / "log.jsonl", run.out_dir / "loss.png")
        if config.log_with:
            accelerator.end_training()
    return FitResult(
        out_dir=out_dir, adapter=adapter, step=outcome.step, start_step=start_step, steps=config.steps,
        loss=outcome.loss, images=len(run.folder), classes=len(run.class_names), skipped=len(run.folder.skipped),
        trainable_params=sum(p.numel() for p in run.params.values()), elapsed_s=round(outcome.elapsed, 3),
        img_per_s=round(outcome.rate, 3) if outcome.rate else None, interrupted=outcome.stop_signal is not None,
        stop_signal=outcome.stop_signal,
        cache=run.cache, buckets=training.get("buckets"),
        **(run.validation.result() if run.validation else {}))


# -- phases -----------------------------------------------------------------------------------------


def _load_base_at_resolution(config: FitConfig, base: Base | None, family: Family,
                             spec: BaseSpec | None) -> tuple[Base, object, str]:
    """(base of `family` at the run's resolution, its config before any move, positional mode)."""
    if base is None:
        # --resolution sizes a random base; any other base keeps its own and is moved below.
        sized = spec.source == "random"
        base = family.load(spec, resolution=config.resolution if sized else None, vae=config.vae,
                           num_heads=config.num_heads)
    base_config, pos_embed = family.config_of(base.model), "standard"
    # A positional mode asks for a move (upscale-res sets one), and a move must go up: --to 32 on a 32 px base
    # is refused there, not trained at 32 px.
    moved = config.resolution is not None and (config.resolution != base.resolution or config.pos_embed)
    if family.fixed_size and moved:
        pos_embed = config.pos_embed or "trick"
        base = move_to_resolution(base, config.resolution, pos_embed)
    elif not family.fixed_size:  # a text-to-image transformer trains at any size as it is
        family.check_side(base, "--resolution", config.resolution)
    return base, base_config, pos_embed


def _prepare_data(run: Run, progress: bool) -> None:
    """Latents for every usable image (cached, or a VAE encoding them each step), square or in aspect-ratio
    buckets, and the class table plan."""
    config, base, device = run.config, run.base, run.accelerator.device
    split = Split(config.batch_size, config.grad_accum, run.accelerator.process_index, run.accelerator.num_processes)
    num_workers = config.num_workers if config.num_workers is not None else min(8, os.cpu_count() or 1)

    def latents_for(images, size):  # usable images, and their latents cropped to size (a side or a bucket)
        return usable_latents(images, size, base.vae_spec, base.vae, cache=config.cache_latents,
                              cache_dir=config.cache_dir, batch_size=split.per_process, device=device,
                              num_workers=num_workers, progress=progress)

    bucketed = config.bucketed(run.family)
    with one_builder_first(run.accelerator):  # process 0 encodes; the others wait, then open the finished cache
        if bucketed:
            folder, latents = bucketed_latents(run.folder, run.resolution, run.family.size_multiple(base),
                                               config.batch_size, latents_for, progress, run.family.largest_side(base))
        else:
            folder, latents = latents_for(run.folder, run.resolution)
    run.cache = None if latents.cache_path is None else str(latents.cache_path)
    if run.main:
        report_skipped(folder.skipped, len(run.folder.files))
    require_images(folder)
    run.folder = folder = without_unreadable_classes(folder, run.folder, announce=run.main)
    conditions = prepare_conditions(run, progress)  # labels, or caption embeddings (the encoder freed after)
    repeats = item_repeats(config.repeats, folder.labels, folder.class_names)
    if bucketed:
        run.buckets = latents.buckets
        if run.main:
            show_buckets(run.buckets, config.batch_size)
        order = BucketOrder([bucket.members for bucket in run.buckets], folder.labels, config.seed, repeats)
    else:
        order = DataOrder(folder.labels, config.seed, repeats, config.class_balance)
    run.batches = Batches(latents, conditions, split, order, device)


def _prepare_trainable_state(run: Run) -> None:
    """Freeze and unfreeze as the method says; optimizer and EMA over the trained tensors only."""
    config, model, family = run.config, run.base.model, run.family
    gamma_blocks = parse_gamma_blocks(config.gamma_blocks, family.depth(model)) if config.method == "difffit" else None
    torch.manual_seed(step_seed(config.seed, 0xADD))  # the added modules' init (LoRA A, adapters, prompts)
    prepare_model(model, config.method, gamma_blocks, len(run.folder.class_names), new_classes=run.new_classes,
                  settings=config.method_settings)
    run.base_state = {n: p.detach().clone() for n, p in trainable_parameters(model).items()}
    device = run.accelerator.device
    # float8 matmuls, quantized from the weights as loaded and before the move: the device never holds the bf16 copy
    if run.precision == "fp8" and not quantize_frozen_linears(model, keep=family.fp8_keep()):
        raise DiffFitError(f"--method {config.method} trains every weight matrix, so fp8 has nothing frozen to "
                           "speed up.", hint="Use --mixed-precision bf16.")
    if run.autocast_dtype is not None:
        cast_frozen_matrices(model, run.autocast_dtype)  # same matmuls as autocast, half the weight memory
    family.set_gradient_checkpointing(model, config.grad_checkpointing)
    try:
        model.to(device).train()
    except torch.OutOfMemoryError:
        raise DiffFitError(f"The {family.title} model does not fit in the memory of {device} "
                           f"(--mixed-precision {run.precision}).", hint=MEMORY_HINT) from None
    if resolve_compile(config.compile, device):
        # One graph per block shape, fixed batch: no recompiles; with several bucket shapes, torch's automatic
        # dynamic shapes instead of one static graph per bucket (past its recompile limit, eager).
        dynamic = None if run.buckets and len(run.buckets) > 1 else False
        for blocks in family.block_lists:  # FLUX: its joint blocks and its single blocks
            compile_blocks(model, blocks=blocks, dynamic=dynamic)
    run.params = trainable_parameters(model)
    optimizer = make_optimizer(run.params.values(), config.learning_rate(), device)
    run.model, run.optimizer = run.accelerator.prepare(model, optimizer)
    run.ema = {n: p.detach().float().clone() for n, p in run.params.items()} if config.ema else {}


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
                hint="Resume with the same class folders, or start a new run with another --out.")
        check_same_run(state.get(RUN_KEY), run.identity, str(run.out_dir / "checkpoints"))

    step, state = restore_newest(checkpoints, run.params, run.ema, run.optimizer, check=same_run)
    if not state and run.main:
        say(f"No checkpoint in {run.out_dir / 'checkpoints'}; starting from step 0.")
    return step, state.get("elapsed_s", 0.0)


def _resolved_config(run: Run) -> dict:
    config = run.config
    data = config.data if config.data.startswith(HF_PREFIX) else str(Path(config.data).expanduser().resolve())
    resolved = config.options() | {
        "data": data, "base": run.base.spec, "out": str(run.out_dir),
        "lr": config.learning_rate(), "resolution": run.resolution, "mixed_precision": run.precision}
    resolved.pop("resume")
    return resolved


def _write_run_record(run: Run, start_step: int) -> None:
    run.out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(run.out_dir / "config.toml") as tmp:
        tmp.write_text(write_toml(_resolved_config(run), header="Resolved configuration of this run (difffit fit)."))
    truncate_log(run.out_dir / "log.jsonl", start_step)


def _tracker_config(run: Run) -> dict:
    # Trackers take scalars and strings: a per-class [repeats] table goes as its text.
    return {k: str(v) if isinstance(v, dict) else v for k, v in _resolved_config(run).items() if v is not None}


# -- the loop ---------------------------------------------------------------------------------------


@dataclass
class Outcome:
    step: int
    loss: float | None
    rate: float | None  # images per second after the first (slow) step
    elapsed: float
    stop_signal: str | None  # "SIGINT" or "SIGTERM" when a signal stopped the run early


def train_loop(run: Run, start_step: int, elapsed_before: float, progress: bool) -> Outcome:
    """Optimizer steps from `start_step` to `config.steps`: log, checkpoint and preview on schedule."""
    config, accelerator, optimizer, model = run.config, run.accelerator, run.optimizer, run.model
    device, world = accelerator.device, accelerator.num_processes
    # DiT's: linear betas over 1000 steps; SD3's and FLUX's: rectified flow at --timestep-sampling's draws
    diffusion = run.family.diffusion(run.base, config.timestep_sampling)
    mse_weights = diffusion.mse_weights(config.snr_gamma, config.p2_gamma)
    scaler = torch.amp.GradScaler(device.type, enabled=run.precision == "fp16")
    per_process, lr = run.batches.split.per_process, config.learning_rate()
    step, loss_value, smoothed, rate, stop_signal = start_step, None, None, None, None
    meter = LossMeter(device, config.log_every)  # loss sums stay on the device between log lines
    t_start = t_log = time.perf_counter()
    t_first, step_log = None, step  # rates ignore the slow first step
    bar = make_progress(TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]}"), enabled=progress)
    # flash or cuDNN attention, whichever measures faster here (CUDA, where the family says its shape; else SDPA's)
    shape = run.family.attention_shape(run.base.model)
    backend = choose_attention_backend(device, batch=per_process, **shape) if shape else None
    forward = run.family.forward(model, run.base)
    try:
        # The log opens after the signal handlers are in place: a run whose log exists can always be stopped.
        with bar, StopFlag() as stop, attention_backend(backend), \
                (run.out_dir / "log.jsonl").open("a") if run.main else contextlib.nullcontext() as log:
            task = bar.add_task("Training", total=config.steps, completed=start_step, loss="-", rate="")
            while step < config.steps:
                # Every draw is of the global batch, each process keeping its slice's rows (engine.data.batches)
                torch.manual_seed(step_seed(config.seed, step, 1))  # any randomness inside the model
                g = torch.Generator().manual_seed(step_seed(config.seed, step, 2))  # flips, latent noise, dropout
                for group in optimizer.param_groups:
                    group["lr"] = lr * min(1.0, (step + 1) / config.warmup) if config.warmup else lr
                for micro in range(config.grad_accum):
                    x0, y = run.batches.micro_batch(step, micro, g)
                    if micro == 0:  # the global batch's timesteps and noise, on the device
                        ts, noises = diffusion.draw(step_generator(device, config.seed, step), config.batch_size,
                                                    x0.shape[1:])
                    t, noise = ts[run.batches.split.rows(micro)], noises[run.batches.split.rows(micro)]
                    sync = micro == config.grad_accum - 1
                    with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                        losses = diffusion.training_losses(denoiser(forward, y, run.autocast_dtype), x0, t, noise,
                                                           mse_weights)
                        loss = losses["loss"].mean()
                        accelerator.backward(scaler.scale(loss / config.grad_accum))
                    meter.add(loss, losses["mse"].mean(), losses["vb"].mean())
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                update_ema(run.ema, run.params, step, run.config.ema_decay)
                step += 1
                now = time.perf_counter()
                t_first = t_first or now
                rate = config.batch_size * (step - start_step - 1) / (now - t_first) if now > t_first else None
                checkpoint_due = config.save_every and step % config.save_every == 0 and step < config.steps
                requested = stop.requested  # a host flag: no device sync
                # The one host sync. Collective under several processes: on schedule there, never on one's own.
                if meter.due(step, config.steps) or checkpoint_due or (requested and world == 1):
                    stats = meter.read(lambda v: accelerator.reduce(v, "mean") if world > 1 else v,
                                       extra=(float(requested),))
                    if not stats["finite"]:
                        kept = list_checkpoints(run.out_dir)
                        raise DiffFitError(
                            f"The loss became {stats['loss']} within the {stats['steps']} step(s) before step {step}; "
                            "training stopped" + (f" (the checkpoint of step {kept[-1][0]} is kept)." if kept else "."),
                            hint="Lower --lr, add --warmup, or use --mixed-precision bf16 or no instead of fp16.")
                    loss_value = stats["loss"]
                    smoothed = loss_value if smoothed is None else 0.95 * smoothed + 0.05 * loss_value
                    bar.update(task, loss=f"{smoothed:.4f}")
                    if run.main:
                        record = {"step": step, "loss": stats["loss"], "mse": stats["mse"], "vb": stats["vb"],
                                  "lr": optimizer.param_groups[0]["lr"],
                                  "img_per_s": round(config.batch_size * (step - step_log) / max(now - t_log, 1e-9), 3),
                                  "elapsed_s": round(elapsed_before + now - t_start, 3)}
                        log.write(json.dumps(record) + "\n")
                        log.flush()
                        t_log, step_log = now, step
                        if config.log_with:
                            accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
                    if stats["extra"][0] > 0:
                        stop_signal = stop.signal or "SIGTERM"  # or another process of the run was signalled
                        break
                bar.update(task, advance=1, rate=f"{rate:.1f} img/s" if rate else "")
                if run.validation and run.validation.due(step):  # before the checkpoint, which records the best
                    with swapped_in(run.params, run.ema):
                        run.validation.evaluate(run, step, log)
                if checkpoint_due:
                    _checkpoint(run, step, elapsed_before + now - t_start)
                if config.sample_every and step % config.sample_every == 0 and step < config.steps:
                    _preview(run, step)
    except torch.cuda.OutOfMemoryError:
        raise DiffFitError(
            f"CUDA ran out of memory with {per_process} images per micro-step on {device}.",
            hint=f"Try a smaller --batch-size or a larger --grad-accum. {MEMORY_HINT}") from None
    return Outcome(step, loss_value, rate, time.perf_counter() - t_start, stop_signal)


# -- outputs ----------------------------------------------------------------------------------------


def _checkpoint(run: Run, step: int, elapsed: float) -> None:
    if run.main:
        state = {"elapsed_s": elapsed, "method": run.config.method, "seed": run.config.seed,
                 "class_names": run.class_names, "images": len(run.folder), RUN_KEY: run.identity,
                 **(run.validation.state() if run.validation else {})}
        save_checkpoint(run.out_dir, step, run.params, run.ema, run.optimizer, state, run.config.keep)
    run.accelerator.wait_for_everyone()


def _preview(run: Run, step: int) -> None:
    """A grid of the first classes from the EMA weights, fixed seed: samples/step-NNNNNNN.png."""
    if not (run.main and run.config.sample_every):
        return
    options = preview_options(run)
    with swapped_in(run.params, run.ema):
        images = generate(run.base, PREVIEW_IMAGES, options, **preview_inputs(run), device=run.accelerator.device,
                          progress=False)
    run.accelerator.unwrap_model(run.model).train()
    grid = save_grid(images, run.out_dir / "samples" / f"step-{step:07d}.png")
    write_loss_plot(run.out_dir / "log.jsonl", run.out_dir / "loss.png")
    if run.config.log_with:
        log_preview(run.accelerator, grid, step)


def _write_adapter(run: Run, base_config, training: dict, name: str = "adapter.safetensors") -> Path | None:
    if not run.main:
        return None
    path = run.out_dir / name
    model = run.accelerator.unwrap_model(run.model)
    meta = make_meta(run.base, model, run.config.method, settings=run.config.method_settings,
                     new_class_table=run.new_classes,
                     class_names=run.class_names, pos_embed=run.pos_embed, base_config=base_config, training=training)
    with swapped_in(run.params, run.ema):
        save_adapter(path, model, run.base_state, meta, run.config.adapter_dtype)
    return path
