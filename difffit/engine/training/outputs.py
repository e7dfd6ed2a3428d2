"""What a run writes while and after it trains: checkpoints, preview grids and the adapter (process 0 only;
every process waits for a checkpoint to be written)."""

from __future__ import annotations

from pathlib import Path

from difffit.engine.evaluation.sample import generate
from difffit.engine.evaluation.sample_folder import save_grid
from difffit.engine.methods.adapter import make_meta, save_adapter
from difffit.engine.training.checkpoints import save_checkpoint
from difffit.engine.training.conditions import PREVIEW_IMAGES, preview_inputs, preview_options
from difffit.engine.training.loss_plot import write_loss_plot
from difffit.engine.training.resume import RUN_KEY
from difffit.engine.training.state import Run
from difffit.engine.training.step import swapped_in
from difffit.engine.training.trackers import log_preview
from difffit.engine.training.validation import Validation


def write_checkpoint(run: Run, validation: Validation | None, step: int, elapsed: float) -> None:
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


def write_preview(run: Run, step: int) -> None:
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


def write_adapter(run: Run, training: dict, name: str = "adapter.safetensors") -> Path | None:
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
