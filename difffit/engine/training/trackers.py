"""`fit --log-with tensorboard|wandb`: checking the tracker before a run, and sending preview grids.

Scalars go through `accelerator.log`; images through each accelerate tracker's `log_images`
(TensorBoard's `add_images`, wandb's `wandb.Image`). wandb is optional and runs offline when
downloads are off or its server cannot be reached, so a run never waits on the network.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from difffit.engine.errors import DiffFitError
from difffit.engine.hub import downloads_disabled, network_reachable

if TYPE_CHECKING:
    from accelerate import Accelerator

TRACKERS = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}
WANDB_HOST = "api.wandb.ai"
PREVIEW_KEY = "preview"


def check_log_with(name: str | None) -> None:
    """Refuse an unknown or missing tracker in one sentence, before any work; put wandb offline when
    there is no network (unless WANDB_MODE is set)."""
    if name is None:
        return
    if name not in TRACKERS:
        raise DiffFitError(f"Unknown --log-with {name!r}; choose {' or '.join(TRACKERS)}.")
    if not any(importlib.util.find_spec(module) for module in TRACKERS[name]):
        raise DiffFitError(
            f"--log-with {name} needs the {name} package, which is not installed.", hint=f"pip install {name}"
        )
    if name != "wandb" or "WANDB_MODE" in os.environ:
        return
    if downloads_disabled() or not network_reachable(WANDB_HOST, timeout=2.0):
        os.environ["WANDB_MODE"] = "offline"  # wandb reads it at init; `wandb sync` uploads the run later


def log_preview(accelerator: Accelerator, image: np.ndarray | str | Path, step: int) -> None:
    """Send one preview grid (an (H, W, 3) uint8 array, or the PNG save_grid wrote) to every tracker of
    `accelerator` that takes images."""
    if isinstance(image, str | Path):
        from PIL import Image

        with Image.open(image) as png:
            image = png.convert("RGB")
    grid = np.asarray(image, dtype=np.uint8)[None]  # a batch of one
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({PREVIEW_KEY: grid}, step=step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({PREVIEW_KEY: grid}, step=step)
