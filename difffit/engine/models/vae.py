"""The autoencoder between pixels and DiT latents.

An `Autoencoder` wraps a diffusers `AutoencoderKL` and speaks in *scaled* latents, the space DiT was
trained in: `encode` returns the scaled latent distribution, `decode` undoes the scaling. The
identity autoencoder ("identity") lets a DiT run in pixel space (tiny bases, tests).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from difffit.engine.errors import DiffFitError
from difffit.engine.hub import error_summary, hub_ref, hub_snapshot
from difffit.engine.io import check_readable
from difffit.engine.progress import library_bars_off

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
IDENTITY_VAE = "identity"  # pixel space: no autoencoder at all
# (factor, latent channels) of the two VAEs DiT was trained with, known without fetching their config.
_KNOWN_GEOMETRY = {DEFAULT_VAE: (8, 4), "stabilityai/sd-vae-ft-mse": (8, 4)}


class Autoencoder:
    """A diffusers AutoencoderKL working in scaled latents (latent = (mean - shift) * scaling_factor)."""

    def __init__(self, vae, spec: str):
        self.vae = vae.eval().requires_grad_(False)
        self.spec = spec
        config = vae.config
        self.factor: int = 2 ** (len(config.block_out_channels) - 1)
        self.latent_channels: int = config.latent_channels
        self.scaling_factor: float = config.scaling_factor
        # SD VAEs have no shift; later VAEs (SD3, Flux) centre their latents before scaling.
        self.shift_factor: float = getattr(config, "shift_factor", None) or 0.0

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, H, W) images in [-1, 1] -> (mean, std) of the scaled latent distribution."""
        param = next(self.vae.parameters())
        dist = self.vae.encode(images.to(param.device, param.dtype)).latent_dist
        return (dist.mean - self.shift_factor) * self.scaling_factor, dist.std * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in about [-1, 1] (not clamped)."""
        param = next(self.vae.parameters())
        latents = latents.to(param.device, param.dtype) / self.scaling_factor + self.shift_factor
        return self.vae.decode(latents).sample

    def to(self, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Autoencoder:
        # Skip no-op moves: diffusers warns on every dtype cast, and callers ask on every use.
        param, target = next(self.vae.parameters()), torch.device(device)
        same_device = param.device.type == target.type and target.index in (None, param.device.index)
        if not same_device or (dtype is not None and param.dtype != dtype):
            self.vae.to(device=device, dtype=dtype)
        return self


class IdentityAutoencoder(Autoencoder):
    """Pixel space: the "latents" are the images themselves (factor 1, 3 channels, no noise)."""

    def __init__(self):
        self.vae = None
        self.spec = IDENTITY_VAE
        self.factor = 1
        self.latent_channels = 3
        self.scaling_factor = 1.0
        self.shift_factor = 0.0

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return images, torch.zeros_like(images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def to(self, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> IdentityAutoencoder:
        return self


def load_vae(spec: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Autoencoder:
    """The VAE `spec` names: "identity", an AutoencoderKL folder (or a pipeline folder with vae/), or a hub id."""
    if spec == IDENTITY_VAE:
        return IdentityAutoencoder()
    folder = _vae_folder(spec)
    from diffusers import AutoencoderKL

    try:
        with library_bars_off():
            vae = AutoencoderKL.from_pretrained(folder, torch_dtype=dtype)
    except (OSError, ValueError, RuntimeError) as e:
        raise DiffFitError(f"Could not load the VAE {spec} from {folder}: {error_summary(e)}") from None
    return Autoencoder(vae, spec).to(device, dtype)


def vae_geometry(spec: str) -> tuple[int, int]:
    """(pixels per latent pixel, latent channels) of a VAE spec, reading only its config (no weights)."""
    if spec == IDENTITY_VAE:
        return 1, 3
    if spec in _KNOWN_GEOMETRY:
        return _KNOWN_GEOMETRY[spec]
    config = _read_vae_config(_vae_folder(spec, config_only=True), spec)
    return 2 ** (len(config["block_out_channels"]) - 1), config.get("latent_channels", 4)


def _vae_folder(spec: str, config_only: bool = False) -> Path:
    """The local folder holding an AutoencoderKL's config.json (and weights unless config_only)."""
    path = Path(spec).expanduser()
    check_readable(path, "VAE")
    if path.is_dir():
        if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
            path = path / "vae"  # a pipeline folder: use its VAE
        _read_vae_config(path, spec)
        return path
    ref = None if path.exists() else hub_ref(spec, subfolders=True)
    if ref is None:
        raise DiffFitError(
            f"VAE {spec!r} is neither 'identity', a diffusers AutoencoderKL folder, nor a hub id like {DEFAULT_VAE}."
        )
    repo_id, subfolder = ref.repo_id, ref.filename
    prefix = f"{subfolder}/" if subfolder else ""
    files = [f"{prefix}config.json"] if config_only else [f"{prefix}config.json", f"{prefix}*.safetensors"]
    instead = "pass --vae a local AutoencoderKL folder"
    snapshot = hub_snapshot(repo_id, files, what=f"the VAE {spec}", instead=instead)
    folder = snapshot / subfolder if subfolder else snapshot
    if not config_only and not any(folder.glob("*.safetensors")):  # older repos ship only .bin weights
        hub_snapshot(repo_id, [f"{prefix}*.bin"], what=f"the VAE {spec}", instead=instead)
    return folder


def _read_vae_config(folder: Path, spec: str) -> dict:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        raise DiffFitError(
            f"VAE {spec}: {folder} has no readable config.json; it is not a diffusers VAE folder."
        ) from None
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL" or "block_out_channels" not in config:
        raise DiffFitError(
            f"VAE {spec}: {folder} holds a {config.get('_class_name', 'model')} model, not an AutoencoderKL."
        )
    return config
