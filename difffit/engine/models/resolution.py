"""Moving a base to another resolution, with DiffFit's positional-encoding trick.

A DiT at 512 px sees a 32x32 token grid instead of 16x16. With `mode="trick"` (the paper's), the
new grid's sin-cos positions are computed on the base grid's scale: coordinates 0, 0.5, ..., 15.5,
so every even position equals a position the base was trained with. `mode="plain"` uses the
standard positions of the new grid (what DiT-XL/2-512 was trained with).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
from torch import nn

from difffit.engine.errors import DiffFitError
from difffit.engine.models.dit import DiT, sincos_pos_embed_2d

if TYPE_CHECKING:
    from difffit.engine.models.bases import Base

PE_MODES = ("trick", "plain")


def set_resolution(model: DiT, latent_size: int, pos_embed_scale: float = 1.0) -> None:
    """Rebuild `model.pos_embed` for a `latent_size` input whose grid coordinates are divided by
    `pos_embed_scale`; every other weight is resolution-independent."""
    cfg = model.config
    grid = latent_size // cfg.patch_size
    like = model.pos_embed
    pos = sincos_pos_embed_2d(cfg.hidden_size, grid, scale=pos_embed_scale).unsqueeze(0)
    model.pos_embed = nn.Parameter(pos.to(device=like.device, dtype=like.dtype), requires_grad=False)
    model.config = dataclasses.replace(cfg, input_size=latent_size, pos_embed_scale=float(pos_embed_scale))


def target_latent_size(base: Base, resolution: int) -> int:
    """The latent size for `resolution` pixels, or a one-sentence error if the grid cannot hold it."""
    step = base.vae_factor * base.config.patch_size
    if resolution <= 0 or resolution % step:
        raise DiffFitError(
            f"{resolution} px does not fit {base.config.name}'s patch grid: the resolution must be a multiple "
            f"of {step} (VAE factor {base.vae_factor} x patch size {base.config.patch_size}).",
            hint=f"Try {(max(resolution, step) // step + 1) * step} px.",
        )
    return resolution // base.vae_factor


def check_upscale(base: Base, resolution: int) -> int:
    """The latent size for moving `base` up to `resolution` pixels, or a one-sentence error."""
    latent = target_latent_size(base, resolution)
    if latent <= base.config.input_size:
        raise DiffFitError(
            f"{resolution} px is not larger than the base's {base.resolution} px; a base only moves up in "
            "resolution (to train at the base's own size, use `difffit fit` without --resolution)."
        )
    return latent


def move_to_resolution(base: Base, resolution: int, mode: str = "trick") -> Base:
    """Move `base` (in place) to `resolution` pixels; only upward moves are supported.

    With "trick" the positional scale grows with the grid (2x the grid -> coordinates halved), on
    top of any scale the base already carries; with "plain" the standard grid is used.
    """
    if mode not in PE_MODES:
        raise DiffFitError(f"Unknown positional-embedding mode {mode!r}; choose one of: {', '.join(PE_MODES)}.")
    latent = check_upscale(base, resolution)
    cfg = base.config
    scale = cfg.pos_embed_scale * latent / cfg.input_size if mode == "trick" else 1.0
    with torch.no_grad():
        set_resolution(base.model, latent, scale)
    return base
