"""Knowing when to stop: the validation loss, in-training FID/KID and CLIP score, the best adapter.

- The held-out set and its latents are `engine.training.held_out`'s.
- The validation loss is the family's own loss (DiT's and PixArt's hybrid loss, unweighted whatever
  --snr-gamma / --p2-gamma say, so runs compare; SD3's and FLUX's rectified flow) of every held-out image at
  VAL_TIMESTEPS fixed noise levels, spread evenly over the schedule, with fixed noise drawn from its own
  seed: the same weights always give the same number, bit for bit. Text-to-image images are conditioned on
  their cached caption embeddings and keep their bucket's shape.
- Evaluation samples in memory: DiT `--eval-n` images (DDIM, cfg 1.5: a tracking signal cheaper than the
  paper's 250-step protocol; `difffit eval-fid` gives the final number); a text-to-image base the held-out
  captions or `--eval-prompts`, at the run's preview settings. FID/KID compare them with `--eval-reference`
  or the held-out images (statistics extracted once before training, cached by content); the CLIP score
  (`--eval-metrics clip`) scores each sample against its prompt as the Inception network reads it.
- `--keep-best` writes best/adapter.safetensors whenever the chosen metric improves (clip: higher is
  better); the record travels in each checkpoint's state.json, so a resumed run keeps the same best.

Every process takes a share of the work (`shared_work`: whole batches, the numbers back in batch order), so
several processes give the one-process numbers; the main process logs them and keeps the best. It runs
with the weights the loop puts in (the EMA with --ema).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import torch

from difffit.engine.data.batches import step_seed, to_device
from difffit.engine.data.images import ImageFolder
from difffit.engine.devices import one_builder_first
from difffit.engine.evaluation.clip_score import DEFAULT_CLIP_MODEL, ClipScorer, ScoredAsRead
from difffit.engine.evaluation.image_sets import CroppedImages, ModelSamples
from difffit.engine.evaluation.inception import LazyExtractor, extract_features, resolve_inception_weights
from difffit.engine.evaluation.metrics import Statistics, compute_metrics, open_input, reference_statistics
from difffit.engine.evaluation.sample import SamplingOptions, draw_noise, read_prompts, sample_generators
from difffit.engine.models.diffusion import GaussianDiffusion
from difffit.engine.models.flow_matching import FlowMatching
from difffit.engine.training.checkpoints import list_checkpoints
from difffit.engine.training.conditions import preview_options
from difffit.engine.training.held_out import VAL_SEED, Group, held_out_groups, split_validation
from difffit.engine.training.shared_work import SingleProcess, map_batches
from difffit.engine.training.state import Run
from difffit.engine.training.step import denoiser

if TYPE_CHECKING:
    from accelerate import Accelerator

    from difffit.engine.models.family import ModelCall

__all__ = ["VAL_SEED", "Validation", "split_validation", "validation_loss", "held_out_loss"]

VAL_TIMESTEPS = 4  # per held-out image; with N images the N * 4 timesteps tile the schedule evenly
EVAL_SAMPLING = {"cfg_scale": 1.5, "scheduler": "ddim", "steps": 50}  # DiT's
DIT_EVAL_N = 1000
KID_SUBSET_SIZE = 1000
HIGHER_IS_BETTER = ("clip",)


class Validation:
    """What the loop calls every --val-every / --eval-every steps; holds the best-so-far record."""

    def __init__(self, run: Run, val: ImageFolder | None, save_best: Callable[[int], Path | None], progress: bool):
        config, device = run.config, run.accelerator.device
        self.val_every, self.eval_every, self.steps = config.val_every, config.eval_every, config.steps
        self.keep_best, self.save_best = config.keep_best, save_best
        self.metrics = config.evaluation_metrics() if config.eval_every else ()
        self.has_val = val is not None  # known to every process, so all of them agree on due()
        self.best: dict | None = None  # {"metric", "value", "step"}
        self.groups: list[Group] = []
        self.prompts = self.reference = self.extractor = None
        self.diffusion = run.family.diffusion(run.base, config.timestep_sampling)
        if val is not None:
            with one_builder_first(run.accelerator):  # process 0 caches the held-out latents, the others open them
                val, self.groups = held_out_groups(run, val, progress)
        if not config.eval_every:
            return
        if run.family.conditioning == "text":
            self.prompts = read_prompts(config.eval_prompts) if config.eval_prompts else list(val.captions)
        self.count = config.eval_n or (len(self.prompts) if self.prompts else DIT_EVAL_N)
        if "fid" in self.metrics:
            self.extractor = LazyExtractor(resolve_inception_weights(config.inception_weights), device, ("2048",))
        if "fid" in self.metrics and run.main:  # the main process compares; every process makes samples
            reference = (
                open_input(config.eval_reference, role="reference", limit=None, need_features=False)
                if config.eval_reference
                else CroppedImages(val, run.resolution)
            )
            if not isinstance(reference, Statistics):
                reference = reference_statistics(
                    reference, self.extractor, keep_features=True, batch_size=64, progress=progress
                )[0]
            self.reference = reference

    def due(self, step: int) -> bool:
        return self.val_due(step) or bool(self.eval_every and step % self.eval_every == 0)

    def val_due(self, step: int) -> bool:
        return self.has_val and ((self.val_every and step % self.val_every == 0) or step == self.steps)

    def evaluate(self, run: Run, step: int, log: TextIO | None) -> dict:
        """Validation loss and/or FID at `step` with the weights in the model now: logged, and the best kept."""
        record: dict = {"step": step}
        model = run.accelerator.unwrap_model(run.model).eval()
        if self.val_due(step):
            record["val_loss"] = held_out_loss(
                run.family.forward(model, run.base),
                self.diffusion,
                self.groups,
                run.config.seed,
                run.config.batch_size,
                run.accelerator.device,
                run.autocast_dtype,
                run.accelerator,
            )
        if self.eval_every and step % self.eval_every == 0:
            record |= self._sample_metrics(run)
        model.train()
        if run.main:
            log.write(json.dumps(record) + "\n")
            log.flush()
            if run.config.log_with:
                run.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
            self._keep_best(record)
        run.accelerator.wait_for_everyone()
        return record

    def _sample_metrics(self, run: Run) -> dict[str, float]:
        """FID (and KID) and/or the CLIP score of samples of the model as it is now (on the main process; {} on
        the others): each sample made once, batch k on process k mod P."""
        config, device = run.config, run.accelerator.device
        if self.prompts is None:  # DiT
            options = SamplingOptions(
                **EVAL_SAMPLING, seed=config.seed, batch_size=config.batch_size, mixed_precision=run.sampling_precision
            )
            extra = {}
        else:
            options = preview_options(run, config.batch_size)
            extra = {"prompts": self.prompts, "embeddings": run.batches.conditions.embeddings}
        scorer = ClipScorer(config.clip_model or DEFAULT_CLIP_MODEL, device) if "clip" in self.metrics else None

        def measure(batch: range) -> dict:
            samples = ModelSamples(run.base, self.count, options, device, progress=False, indices=batch, **extra)
            if scorer is not None:  # this batch's sums alone, so the batches add up in order on any process count
                samples = ScoredAsRead(samples, scorer)
            part = {}
            if "fid" in self.metrics:
                part = {
                    name: value.cpu()
                    for name, value in extract_features(
                        samples,
                        self.extractor.get(),
                        batch_size=config.batch_size,
                        description="Inception features",
                        progress=False,
                    ).items()
                }
            else:
                for _ in samples.batches(config.batch_size):
                    pass
            if scorer is not None:
                part["clip"] = scorer.take_sums()
            return part

        parts = map_batches(self.count, config.batch_size, measure, run.accelerator)
        if not run.main:
            return {}
        values = {}
        if "fid" in self.metrics:
            features = {name: torch.cat([part[name] for part in parts]) for name in parts[0] if name != "clip"}
            generated = Statistics.from_features(features, self.extractor.identity, keep_features=True)
            kid = self.reference.features is not None
            computed = compute_metrics(
                ("fid", "kid") if kid else ("fid",),
                generated,
                self.reference,
                kid_subset_size=min(KID_SUBSET_SIZE, generated.count, self.reference.count),
                device=device,
            )
            values = {"fid": computed["fid"]} | ({"kid": computed["kid_mean"]} if kid else {})
        if scorer is not None:
            for part in parts:  # in batch order
                scorer.add_sums(*part["clip"])
            values["clip"] = scorer.score()
        return values

    def _keep_best(self, record: dict) -> None:
        value = record.get(self.keep_best) if self.keep_best else None
        sign = -1 if self.keep_best in HIGHER_IS_BETTER else 1
        if value is not None and (self.best is None or sign * value < sign * self.best["value"]):
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
def validation_loss(
    model: torch.nn.Module,
    x0: torch.Tensor,
    labels: torch.Tensor,
    seed: int,
    batch_size: int,
    autocast_dtype: torch.dtype | None = None,
) -> float:
    """DiT's validation loss of latents `x0` of classes `labels` (one shape): `held_out_loss` of one group."""
    return held_out_loss(
        model,
        GaussianDiffusion(),
        [Group(x0, labels)],
        seed,
        batch_size,
        next(model.parameters()).device,
        autocast_dtype,
    )


@torch.no_grad()
def held_out_loss(
    forward: ModelCall,
    diffusion: GaussianDiffusion | FlowMatching,
    groups: list[Group],
    seed: int,
    batch_size: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    accelerator: Accelerator | None = None,
) -> float:
    """Mean loss of every (image, fixed noise level, fixed noise) pair: a function of the weights only.

    `forward(x_t, t, conditions)` is the family's model call. Pair j = i * VAL_TIMESTEPS + k of the N images
    (the groups' in turn) sits at the fraction u_j = (order_j + 0.5) / (N * VAL_TIMESTEPS) of the schedule,
    `order` a fixed shuffle, so the noise levels tile it: timestep floor(u_j * T) (DDPM), or the training
    sigma there (rectified flow). Its noise comes from its own generator; batches never mix groups (shapes).
    `accelerator`: the run's processes share the batches (each process's number is the one-process one).
    """
    pairs = sum(len(group.x0) for group in groups) * VAL_TIMESTEPS
    order = torch.randperm(pairs, generator=torch.Generator().manual_seed(step_seed(seed, VAL_SEED)))
    if isinstance(diffusion, FlowMatching):
        levels = (order.double() + 0.5) / pairs  # FlowMatching's u in (0, 1)
    else:
        levels = ((order.double() + 0.5) * diffusion.num_steps / pairs).long()
    total, first = 0.0, 0
    for group in groups:

        def batch_sum(batch: range, group: Group = group, first: int = first) -> float:
            j = torch.arange(first + batch.start, first + batch.stop)
            x, y = group.take(j // VAL_TIMESTEPS - first // VAL_TIMESTEPS)
            x, y = x.to(device), to_device(y, device)
            noise = draw_noise(sample_generators(step_seed(seed, VAL_SEED), j.tolist()), x.shape[1:], device)
            losses = diffusion.training_losses(denoiser(forward, y, autocast_dtype), x, levels[j].to(device), noise)
            return losses["loss"].sum().item()

        for value in map_batches(len(group.x0) * VAL_TIMESTEPS, batch_size, batch_sum, accelerator or SingleProcess()):
            total += value  # in batch order: the same sum on any number of processes
        first += len(group.x0) * VAL_TIMESTEPS
    return total / pairs
