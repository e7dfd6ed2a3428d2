"""Knowing when to stop: the held-out set, the validation loss, in-training FID/KID, the best adapter.

- The held-out set is `--val-fraction` of each class (`engine.data.batches.held_out`, fixed by the seed),
  or a separate `--val-data` folder or dataset with the training data's classes.
- The validation loss is the hybrid loss (unweighted, whatever --snr-gamma / --p2-gamma say, so runs
  compare) of every held-out image at VAL_TIMESTEPS fixed timesteps, spread evenly over the
  schedule, with fixed noise drawn from its own seed: the same weights always give the same number.
- FID/KID sample `--eval-n` images with the adapter in memory (DDIM, cfg 1.5: a tracking signal
  cheaper than the paper's 250-step protocol; `difffit eval-fid` gives the final number) and compare
  them with the reference statistics, extracted once before training and cached by content.
- `--keep-best` writes best/adapter.safetensors whenever the chosen metric improves; the record
  travels in each checkpoint's state.json, so a resumed run keeps the same best.

Every process takes a share of the work (`shared_work`: whole batches, the numbers back in batch order), so
several processes give the one-process numbers; the main process logs them and keeps the best. It runs
with the weights the loop puts in (the EMA with --ema).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from difffit.engine.data.batches import held_out, step_seed
from difffit.engine.data.hf_datasets import open_data
from difffit.engine.data.images import ImageFolder, require_images
from difffit.engine.data.latents import usable_latents
from difffit.engine.devices import one_builder_first
from difffit.engine.errors import DiffFitError
from difffit.engine.evaluation.image_sets import ModelSamples
from difffit.engine.evaluation.inception import LazyExtractor, extract_features, resolve_inception_weights
from difffit.engine.evaluation.metrics import Statistics, compute_metrics, open_input, reference_statistics
from difffit.engine.evaluation.sample import SamplingOptions, draw_noise, sample_generators
from difffit.engine.models.diffusion import GaussianDiffusion
from difffit.engine.progress import say
from difffit.engine.training.checkpoints import list_checkpoints
from difffit.engine.training.config import FitConfig
from difffit.engine.training.shared_work import SingleProcess, map_batches
from difffit.engine.training.state import Run
from difffit.engine.training.step import denoiser

VAL_TIMESTEPS = 4  # per held-out image; with N images the N * 4 timesteps tile the schedule evenly
VAL_SEED = 0x7A11  # the validation noise's own stream: independent of the training draws
EVAL_SAMPLING = {"cfg_scale": 1.5, "scheduler": "ddim", "steps": 50}
KID_SUBSET_SIZE = 1000


def split_validation(config: FitConfig, folder: ImageFolder) -> tuple[ImageFolder, ImageFolder | None]:
    """(training items, held-out items or None). Also checks, before any work, that FID can run offline."""
    if config.eval_every:
        resolve_inception_weights(config.inception_weights)  # missing offline: one sentence, now
    if config.val_data:
        val = open_data(config.val_data, config.image_column, config.label_column)
        index = {name: i for i, name in enumerate(folder.class_names)}
        if len(folder.class_names) == len(val.class_names) == 1:  # two flat folders: named after themselves
            index = {val.class_names[0]: 0}
        unknown = sorted({val.class_names[label] for label in val.labels} - set(index))
        if unknown:
            raise DiffFitError(f"--val-data {config.val_data} has classes the training data lacks: "
                               f"{', '.join(unknown[:10])}.", hint="Validate on the training data's classes.")
        labels = [index[val.class_names[label]] for label in val.labels]
        return folder, replace(val, labels=labels, class_names=folder.class_names, skipped=[])
    if not config.val_fraction:
        return folder, None
    chosen = held_out(folder.labels, config.val_fraction, config.seed)
    if not chosen:
        raise DiffFitError(f"--val-fraction {config.val_fraction} holds out no image of {config.data} "
                           f"({len(folder)} images in {len(folder.class_names)} classes).",
                           hint="Use a larger fraction, or --val-data DIR.")
    kept = sorted(set(range(len(folder))) - set(chosen))
    return replace(folder.take(kept), skipped=folder.skipped), folder.take(chosen)


class Validation:
    """What the loop calls every --val-every / --eval-every steps; holds the best-so-far record."""

    def __init__(self, run: Run, val: ImageFolder | None, save_best: Callable[[int], object], progress: bool):
        config, device = run.config, run.accelerator.device
        self.val_every, self.eval_every, self.steps = config.val_every, config.eval_every, config.steps
        self.keep_best, self.save_best = config.keep_best, save_best
        self.has_val = val is not None  # known to every process, so all of them agree on due()
        self.best: dict | None = None  # {"metric", "value", "step"}
        self.x0 = self.labels = self.reference = self.extractor = None
        if val is not None:
            with one_builder_first(run.accelerator):  # process 0 caches the held-out latents, the others open them
                self.x0, self.labels = _held_out_latents(run, val, progress)
        if config.eval_every:
            self.extractor = LazyExtractor(resolve_inception_weights(config.inception_weights), device, ("2048",))
        if config.eval_every and run.main:
            reference = open_input(config.eval_reference, role="reference", limit=None, need_features=False)
            if not isinstance(reference, Statistics):
                reference = reference_statistics(reference, self.extractor, keep_features=True, batch_size=64,
                                                 progress=progress)[0]
            self.reference = reference

    def due(self, step: int) -> bool:
        return self.val_due(step) or bool(self.eval_every and step % self.eval_every == 0)

    def val_due(self, step: int) -> bool:
        return self.has_val and ((self.val_every and step % self.val_every == 0) or step == self.steps)

    def evaluate(self, run: Run, step: int, log) -> dict:
        """Validation loss and/or FID at `step` with the weights in the model now: logged, and the best kept."""
        record: dict = {"step": step}
        model = run.accelerator.unwrap_model(run.model).eval()
        if self.val_due(step):
            record["val_loss"] = validation_loss(model, self.x0, self.labels, run.config.seed,
                                                 run.config.batch_size, run.autocast_dtype, run.accelerator)
        if self.eval_every and step % self.eval_every == 0:
            record |= self._fid(run)
        model.train()
        if run.main:
            log.write(json.dumps(record) + "\n")
            log.flush()
            if run.config.log_with:
                run.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
            self._keep_best(record)
        run.accelerator.wait_for_everyone()
        return record

    def _fid(self, run: Run) -> dict[str, float]:
        config = run.config
        options = SamplingOptions(**EVAL_SAMPLING, seed=config.seed, batch_size=config.batch_size,
                                  mixed_precision=run.sampling_precision)

        def features(batch: range) -> dict[str, torch.Tensor]:
            samples = ModelSamples(run.base, config.eval_n, options, run.accelerator.device, progress=False,
                                   indices=batch)
            return {name: value.cpu() for name, value in extract_features(
                samples, self.extractor.get(), batch_size=config.batch_size, description="Inception features",
                progress=False).items()}

        parts = map_batches(config.eval_n, config.batch_size, features, run.accelerator)
        if not run.main:
            return {}
        gathered = {name: torch.cat([part[name] for part in parts]) for name in parts[0]}
        generated = Statistics.from_features(gathered, self.extractor.identity, keep_features=True)
        kid = self.reference.features is not None
        values = compute_metrics(("fid", "kid") if kid else ("fid",), generated, self.reference,
                                 kid_subset_size=min(KID_SUBSET_SIZE, generated.count, self.reference.count),
                                 device=run.accelerator.device)
        return {"fid": values["fid"]} | ({"kid": values["kid_mean"]} if kid else {})

    def _keep_best(self, record: dict) -> None:
        value = record.get(self.keep_best) if self.keep_best else None
        if value is not None and (self.best is None or value < self.best["value"]):
            self.best = {"metric": self.keep_best, "value": value, "step": record["step"]}
            self.save_best(record["step"])

    # -- resume -------------------------------------------------------------------------------------

    def state(self) -> dict:
        """What a checkpoint's state.json keeps of validation: the best-so-far record."""
        return {"best": self.best} if self.best else {}

    def restore(self, out_dir: Path, step: int) -> None:
        """The best-so-far record of the checkpoint a run resumed from (step 0: a new run)."""
        path = dict(list_checkpoints(out_dir)).get(step)
        if path is not None:
            self.best = json.loads((path / "state.json").read_text()).get("best")

    def result(self) -> dict:
        """FitResult's best_step and best_metric."""
        return {"best_step": self.best["step"], "best_metric": self.best["value"]} if self.best else {}


@torch.no_grad()
def validation_loss(model, x0: torch.Tensor, labels: torch.Tensor, seed: int, batch_size: int,
                    autocast_dtype: torch.dtype | None = None, accelerator=None) -> float:
    """Mean hybrid loss of every (image, fixed timestep, fixed noise) pair: a function of the weights only.

    Pair j = i * VAL_TIMESTEPS + k of N images sits at timestep floor((j + 0.5) * T / (N * VAL_TIMESTEPS))
    after a fixed shuffle, so the timesteps tile the schedule; its noise comes from its own generator.
    `accelerator`: the run's processes share the batches (each process's number is the one-process one).
    """
    diffusion = GaussianDiffusion()
    device = next(model.parameters()).device
    pairs = len(x0) * VAL_TIMESTEPS
    order = torch.randperm(pairs, generator=torch.Generator().manual_seed(step_seed(seed, VAL_SEED)))
    timesteps = ((order.double() + 0.5) * diffusion.num_steps / pairs).long()

    def batch_sum(batch: range) -> float:
        j = torch.arange(batch.start, batch.stop)
        x, y = x0[j // VAL_TIMESTEPS].to(device), labels[j // VAL_TIMESTEPS].to(device)
        noise = draw_noise(sample_generators(step_seed(seed, VAL_SEED), j.tolist()), x.shape[1:], device)
        losses = diffusion.training_losses(denoiser(model, y, autocast_dtype), x, timesteps[j].to(device), noise)
        return losses["loss"].sum().item()

    total = 0.0
    for value in map_batches(pairs, batch_size, batch_sum, accelerator or SingleProcess()):
        total += value  # in batch order: the same sum on any number of processes
    return total / pairs


def _held_out_latents(run: Run, val: ImageFolder, progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out images' latents, drawn once (plain, fixed latent noise) and kept on the CPU."""
    config, base, device = run.config, run.base, run.accelerator.device
    val = val.keep_classes(run.folder.class_names)  # without the classes training dropped as unreadable
    val, latents = usable_latents(val, run.resolution, base.vae_spec, base.vae, cache=config.cache_latents,
                                  cache_dir=config.cache_dir, batch_size=config.batch_size, device=device,
                                  num_workers=0, progress=progress)
    for item, reason in val.skipped if run.main else ():
        say(f"skipped validation image {item}: {reason}")
    require_images(val)
    shape = (base.config.in_channels, base.config.input_size, base.config.input_size)
    parts = []
    for lo in range(0, len(val), config.batch_size):
        index = torch.arange(lo, min(lo + config.batch_size, len(val)))
        noise = draw_noise(sample_generators(step_seed(config.seed, VAL_SEED, 1), index.tolist()), shape, "cpu")
        parts.append(latents.draw(index, torch.zeros_like(index), noise, device).cpu())
    return torch.cat(parts), torch.tensor(val.labels)
