"""The options of sampling and of evaluation with their defaults, the one place each is written.

No torch here, so `sample` and `eval-fid` read their defaults from this module without loading the
engine. SamplingOptions (evaluation/sample.py) is SamplingFields checked; `evaluate`
(evaluation/metrics.py) takes an EvalConfig.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from difffit.engine.evaluation.sample import SamplingOptions


@dataclass(frozen=True)
class SamplingFields:
    """How to sample, with the Python API's defaults; SamplingOptions is these, checked when made."""

    cfg_scale: float | None = 4.0  # None: the base's family's default (DiT 4.0, a pipeline's own)
    cfg_channels: str = "3"  # DiT: guide the first 3 latent channels (the reference) or "all"
    scheduler: str | None = "ddpm"  # DiT: one of SCHEDULERS; text families: their names; None: the default
    steps: int | None = None  # None: the scheduler's (DiT: DEFAULT_STEPS) or the pipeline's default
    seed: int = 0
    batch_size: int = 16
    mixed_precision: str = "no"  # no (exact fp32), fp16 or bf16 autocast
    device: str = "auto"
    compile: str = "off"  # auto (on CUDA), on or off: each DiT block compiled once, last batch padded
    negative_prompt: str = ""  # text families: the unconditional branch of guidance ("": the pipelines')
    width: int | None = None  # text families: image size in pixels (default: the base's resolution)
    height: int | None = None


DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"  # the CLIP most text-to-image papers score with

# `difffit sample`: the guidance, scheduler and steps of the base's family (DiT 4.0 and ddpm, a pipeline's own),
# each DiT block compiled on CUDA.
SAMPLE_DEFAULTS = SamplingFields(cfg_scale=None, scheduler=None, compile="auto")
# eval-fid's samples of an adapter or a base: guidance and scheduler left to the model's family, which is
# CLASS_FID_SAMPLING for a class-conditional model (the paper's FID protocol: ddpm, 250 steps, guidance 1.5)
# and the pipeline's own defaults for a text-to-image model.
FID_SAMPLING = SamplingFields(cfg_scale=None, scheduler=None)
CLASS_FID_SAMPLING = {"cfg_scale": 1.5, "scheduler": "ddpm"}


@dataclass(frozen=True)
class EvalConfig:
    """How `evaluate` compares GENERATED with REFERENCE: which metrics, on what, and how (eval-fid's options)."""

    metrics: str | tuple[str, ...] = "fid"  # comma-separated, or a tuple: fid, kid, isc, prc, clip
    num_samples: int | None = None  # a folder/npz: its first N images (default: all); a model: N samples (50,000)
    inception_weights: str | None = None  # a file, "random" (tests), or None: the torch hub cache
    batch_size: int = 64  # images per Inception (and CLIP) batch
    device: str = "auto"
    save_stats: str | os.PathLike | None = None  # also write the REFERENCE's statistics to this .npz
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    # When GENERATED is an adapter or a base: how it is sampled (None: FID_SAMPLING), with which classes,
    # on which base and VAE.
    sampling: SamplingOptions | None = None
    classes: Sequence[str] | None = None
    base: str | None = None
    vae: str | None = None
    force_base: bool = False
    clip_model: str | None = None  # the clip metric's CLIP model (default: DEFAULT_CLIP_MODEL)
    prompts: Sequence[str] | None = None  # a text-to-image model's prompts, sampled in turn
    overwrite: bool = False  # replace an existing --save-stats file
