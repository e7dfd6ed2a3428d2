"""Run: what the phases of one fit made, shared by the loop, its outputs and validation's evaluations."""

from __future__ import annotations

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

if TYPE_CHECKING:
    from accelerate import Accelerator


@dataclass(frozen=True)
class Run:
    """What the setup phases of one fit made (engine.training.setup), built once before the loop: settings,
    the process group, the data, the model and its trained state. The tensors change in place as it trains;
    the fields do not."""

    config: FitConfig
    out_dir: Path
    accelerator: Accelerator
    precision: str  # "no", "fp16", "bf16" or "fp8"
    base: Base  # or another family's base (engine.models.families)
    base_config: dict  # the base's config before any move to another resolution: what the adapter records
    pos_embed: str  # "standard", or the mode the base was moved to a new resolution with
    resolved: dict  # the options as resolved (config.toml): paths absolute, defaults decided
    # the data
    folder: ImageFolder  # the usable training items
    batches: Batches
    buckets: list[Bucket] | None  # with --buckets auto: the aspect-ratio buckets of the training data
    cache: str | None  # the latents' cache file
    class_names: list[str]  # the class table trained
    new_classes: bool  # DiT: whether the class table is new
    preview_prompts: list[str]  # text-to-image: what previews show
    # the trainable state
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    params: dict[str, torch.nn.Parameter]
    base_state: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    identity: dict  # what defines the run (engine.training.resume)

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
