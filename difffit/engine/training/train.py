"""fit(): an image folder and a base in, an adapter out.

`fit` reads as an outline of named phases (accelerator, inputs, data, trainable state: engine.training.setup,
each returning what it made; then resume, loop, finish). The one flat training loop is `engine.training.loop`;
checkpoints, previews and the adapter are written by `engine.training.outputs`. Randomness and batch
splitting live in `engine.data.batches` (every draw is a function of (seed, step, process), so a resumed run
equals an uninterrupted one); checkpoint files in `engine.training.checkpoints`.

Multi-GPU: `accelerate launch -m difffit fit ...`; process 0 writes every file.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

from difffit.engine.data.batches import Split
from difffit.engine.data.hf_datasets import HF_PREFIX
from difffit.engine.devices import make_accelerator, tf32_matmuls
from difffit.engine.errors import DiffFitError
from difffit.engine.io import atomic_path, run_lock
from difffit.engine.models.bases import Base
from difffit.engine.models.families import family_of, resolve_base
from difffit.engine.progress import say
from difffit.engine.training.checkpoints import (
    check_run_folder,
    claim_run_folder,
    list_checkpoints,
    nothing_to_resume,
    restore_newest,
    truncate_log,
)
from difffit.engine.training.conditions import check_options, text_summary, with_family_defaults
from difffit.engine.training.config import FitConfig, FitResult
from difffit.engine.training.loop import train_loop
from difffit.engine.training.loss_plot import write_loss_plot
from difffit.engine.training.outputs import write_adapter, write_checkpoint, write_preview
from difffit.engine.training.recipes import write_toml
from difffit.engine.training.resume import RUN_KEY, check_same_run, run_identity
from difffit.engine.training.setup import (
    Data,
    Inputs,
    Trainable,
    check_base_shapes,
    open_inputs,
    prepare_data,
    prepare_trainable_state,
)
from difffit.engine.training.state import Run
from difffit.engine.training.trackers import check_log_with
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
            lambda step: write_adapter(run, training | {"steps": step}, "best/adapter.safetensors"),
            progress,
        )
        validation.restore(run.out_dir, start_step)
    # -- the loop, then the finish -----------------------------------------------------------------------
    if start_step == 0:
        write_preview(run, 0)
    outcome = train_loop(run, validation, start_step, elapsed_before, progress)
    if outcome.step > start_step or not checkpoints:
        write_checkpoint(run, validation, outcome.step, elapsed_before + outcome.elapsed)
    if not outcome.stop_signal and config.sample_every and outcome.step > start_step:
        write_preview(run, outcome.step)
    adapter = write_adapter(
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
