"""Run: what the phases of one fit share (train.py's phases and loop, validation's evaluations)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from difffit.engine.data.batches import Batches
from difffit.engine.data.buckets import Bucket
from difffit.engine.data.images import ImageFolder
from difffit.engine.devices import AUTOCAST_DTYPES
from difffit.engine.models.bases import Base
from difffit.engine.models.families import family_of
from difffit.engine.models.family import Family
from difffit.engine.training.config import FitConfig

if TYPE_CHECKING:  # validation.py uses Run; Run only holds a Validation
    from difffit.engine.training.validation import Validation


@dataclass
class Run:
    """What the phases of one fit share: settings, the process group, the model and its trained state."""

    config: FitConfig
    out_dir: Path
    accelerator: object
    precision: str  # "no", "fp16", "bf16" or "fp8"
    base: Base  # or another family's base (engine.models.families)
    pos_embed: str  # "standard", or the mode the base was moved to a new resolution with
    folder: ImageFolder
    class_names: list[str]
    new_classes: bool
    batches: Batches | None = None
    model: torch.nn.Module | None = None
    params: dict[str, torch.nn.Parameter] = dataclasses.field(default_factory=dict)
    base_state: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    ema: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    optimizer: torch.optim.Optimizer | None = None
    cache: str | None = None
    text_cache: str | None = None  # text-to-image: the caption embeddings' cache folder
    preview_prompts: list[str] = dataclasses.field(default_factory=list)  # text-to-image: what previews show
    # text-to-image: the held-out captions and --eval-prompts, encoded with the training captions
    held_out_prompts: list[str] = dataclasses.field(default_factory=list)
    validation: Validation | None = None
    buckets: list[Bucket] | None = None  # with --buckets auto: the aspect-ratio buckets of the training data
    identity: dict = dataclasses.field(default_factory=dict)  # what defines the run (engine.training.resume)

    @property
    def family(self) -> Family:
        return family_of(self.base)

    @property
    def resolution(self) -> int:
        """The image side it trains at: --resolution (a DiT base was moved there; a text-to-image transformer
        takes any size), else the base's own."""
        return self.config.resolution or self.base.resolution

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return AUTOCAST_DTYPES.get(self.precision)

    @property
    def sampling_precision(self) -> str:
        """The --mixed-precision previews and in-training FID sample with: the run's, except that under fp8
        the float8 matrices already sit in the model and the rest runs under bf16 autocast."""
        return "bf16" if self.precision == "fp8" else self.precision
