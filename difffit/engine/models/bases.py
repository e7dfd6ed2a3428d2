"""Load a DiT `--base` (resolved by `families.resolve_base`) with the reference numerics, its VAE and metadata.

The DiT specs:
  random:DiT-S/2          a standard config, reference init, seeded (sized by resolution / num_classes)
  tiny                    the base bundled under difffit/assets/tiny (when this build has one)
  DiT-XL/2-256, -512      aliases of the hub pipelines facebook/DiT-XL-2-256 / -512
  a local file            original layout: .pt/.pth (weights-only pickle) or .safetensors; a bare
                          state dict or a training checkpoint holding "ema" (preferred) or "model"
  a local folder          diffusers layout: a pipeline (model_index.json) or a transformer (config.json)
  owner/name              a hub repo in diffusers layout, through huggingface_hub's cache

Every format is converted to the original key layout and run by engine/models/dit.py, never by diffusers'
model: diffusers' DiT differs numerically from the reference (timestep frequencies, norm eps).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from difffit.engine.errors import DiffFitError
from difffit.engine.hub import WEIGHT_SUFFIXES
from difffit.engine.models.diffusers_layout import load_diffusers_dir, load_hub
from difffit.engine.models.dit import (
    DIT_CONFIGS,
    DiT,
    DiTConfig,
    config_for,
    sincos_pos_embed_2d,
)
from difffit.engine.models.family import BaseSpec
from difffit.engine.models.formats import (
    GAMMA_SUFFIXES,
    Weights,
    config_from_state_dict,
    parse_metadata,
    pos_embed_scale_of,
    read_original_file,
    read_safetensors_header,
)
from difffit.engine.models.vae import DEFAULT_VAE, Autoencoder, load_vae, vae_geometry

ALIASES = {"DiT-XL/2-256": "facebook/DiT-XL-2-256", "DiT-XL/2-512": "facebook/DiT-XL-2-512"}
RANDOM_PREFIX = "random:"
TINY = "tiny"  # the base bundled with difffit
TINY_BASE = Path(__file__).resolve().parents[2] / "assets" / "tiny.safetensors"
FINGERPRINT_SAMPLES = 4096


@dataclass
class Base:
    """A loaded base: the DiT (CPU, fp32, eval mode) plus what is needed to use and identify it."""

    model: DiT
    spec: str
    source_format: str  # "original" | "diffusers" | "random" | "bundled"
    fingerprint: str
    vae_spec: str
    class_names: list[str] | None = None
    vae_factor: int = 8
    _vae: Autoencoder | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def config(self) -> DiTConfig:
        return self.model.config

    @property
    def resolution(self) -> int:
        return self.config.input_size * self.vae_factor

    def vae(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Autoencoder:
        """The base's autoencoder, loaded on first use (inspecting or running the DiT never needs it)."""
        if self._vae is None:
            vae = load_vae(self.vae_spec, device, dtype)
            if vae.latent_channels != self.config.in_channels:
                raise DiffFitError(
                    f"The VAE {self.vae_spec} makes {vae.latent_channels}-channel latents but the base "
                    f"{self.spec} expects {self.config.in_channels}; pass a matching --vae."
                )
            self._vae = vae
        return self._vae.to(device, dtype)


def load_dit_base(
    base: BaseSpec,
    *,
    resolution: int | None = None,
    num_classes: int | None = None,
    num_heads: int | None = None,
    vae: str | None = None,
) -> Base:
    """A resolved DiT spec (see the module docstring; `families.resolve_base` reads it) loaded as a `Base`.

    `resolution` (pixels) and `num_classes` size random bases; for other bases `resolution` is checked
    against the weights and `num_classes` is ignored (a method resizes the class table). `num_heads`
    is needed only for non-standard widths. `vae` overrides the base's own VAE.
    """
    spec = base.spec
    if base.source == "random":
        return _random_base(spec, resolution, num_classes, vae)
    weights = _find_weights(base)
    config = config_from_state_dict(weights.state, num_heads=num_heads or weights.num_heads, source=spec)
    if weights.pos_embed_scale is not None:
        config = DiTConfig(**{**config.to_dict(), "pos_embed_scale": weights.pos_embed_scale})
    model = _model_from_state(config, weights.state, spec)
    vae_spec = vae or weights.vae_spec or DEFAULT_VAE
    factor, _ = vae_geometry(vae_spec)
    if resolution is not None and resolution != config.input_size * factor:
        raise DiffFitError(
            f"The base {spec} works at {config.input_size * factor} px ({config.input_size}x"
            f"{config.input_size} latents with the VAE {vae_spec}), not {resolution} px; use "
            "`difffit upscale-res` to move it."
        )
    return Base(
        model=model,
        spec=spec,
        source_format=weights.source_format,
        fingerprint=state_dict_fingerprint(model.state_dict()),
        vae_spec=vae_spec,
        class_names=weights.class_names,
        vae_factor=factor,
    )


def dit_architecture(
    base: BaseSpec, *, resolution: int | None = None, vae: str | None = None, num_heads: int | None = None
) -> DiTConfig | None:
    """The architecture `load_dit_base(base)` gives, at `resolution` when given, read without building the model
    or reading weights where that is cheap: a random: name, the tiny base, a local .safetensors file (its
    header holds every shape). None otherwise, and for anything load_dit_base would refuse (it says why)."""
    try:
        if base.source == "random":
            factor, channels = vae_geometry(vae or DEFAULT_VAE)
            return config_for(
                base.spec[len(RANDOM_PREFIX) :], input_size=(resolution or 256) // factor, in_channels=channels
            )
        path = base.path
        if base.source not in ("bundled", "file") or path.suffix.lower() != ".safetensors" or not path.is_file():
            return None
        shapes, metadata = read_safetensors_header(path)
        recorded = parse_metadata(metadata, path)
        state = {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}
        config = config_from_state_dict(state, num_heads=num_heads or recorded.get("num_heads"), source=base.spec)
        if resolution is not None:
            factor, _ = vae_geometry(vae or recorded.get("vae_spec") or DEFAULT_VAE)
            config = replace(config, input_size=resolution // factor)
        return config
    except (DiffFitError, ValueError):
        return None


def describe_base(base: Base) -> dict:
    """The fields `difffit info --json` reports for a base."""
    config = base.config
    return {
        "kind": "base",
        "spec": base.spec,
        "source_format": base.source_format,
        "architecture": config.name,
        # Reference convention: every parameter, the frozen pos_embed included.
        "total_params": sum(p.numel() for p in base.model.parameters()),
        "num_classes": config.num_classes,
        "latent_size": config.input_size,
        "resolution": base.resolution,
        "in_channels": config.in_channels,
        "learn_sigma": config.learn_sigma,
        "patch_size": config.patch_size,
        "pos_embed_scale": config.pos_embed_scale,
        "fingerprint": base.fingerprint,
        "vae": base.vae_spec,
        "class_names": base.class_names,
    }


# --------------------------------------------------------------------------------------------
# Weights of a resolved spec
# --------------------------------------------------------------------------------------------


def _find_weights(base: BaseSpec) -> Weights:
    spec = base.spec
    if base.source == "bundled":
        if not TINY_BASE.exists():
            raise DiffFitError(
                f"The tiny base is not bundled in this build of difffit (nothing at {TINY_BASE}); "
                "use a random: base such as random:DiT-S/2, or a real base such as DiT-XL/2-256."
            )
        weights = _load_local(TINY_BASE)
        weights.source_format = "bundled"
        return weights
    if base.source == "alias":
        return load_hub(base.repo_id, what=f"the base {spec} (hub repo {base.repo_id})")
    if base.source in ("file", "folder"):
        return _load_local(base.path)
    return load_hub(base.repo_id, what=f"the base {spec} (no such local path, so read as a hub repo id)")


def _random_base(spec: str, resolution: int | None, num_classes: int | None, vae: str | None) -> Base:
    name = spec[len(RANDOM_PREFIX) :]
    vae_spec = vae or DEFAULT_VAE
    factor, channels = vae_geometry(vae_spec)
    resolution = resolution or 256
    try:
        config = config_for(
            name, input_size=resolution // factor, num_classes=num_classes or 1000, in_channels=channels
        )
    except ValueError as e:
        known = ", ".join(f"{RANDOM_PREFIX}{family}/{p}" for family in DIT_CONFIGS for p in (2, 4, 8))
        raise DiffFitError(f"Unknown random base {spec!r}; known: {known}.") from e
    if resolution % (factor * config.patch_size):
        raise DiffFitError(
            f"Resolution {resolution} px does not divide into {config.patch_size}-latent-pixel patches "
            f"with the VAE {vae_spec} (factor {factor}); use a multiple of {factor * config.patch_size}."
        )
    # The same spec always gives the same weights (and fingerprint), whatever the caller's RNG state.
    # initialize_weights() sets every parameter but pos_embed, so skip torch's default init (half the
    # time of a random DiT-XL/2) by allocating uninitialised memory and computing the positions here.
    with torch.device("meta"):
        model = DiT(config)
    model.to_empty(device="cpu")
    grid = config.input_size // config.patch_size
    model.pos_embed.data.copy_(sincos_pos_embed_2d(config.hidden_size, grid).unsqueeze(0))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model.initialize_weights()
    model.eval()
    return Base(model, spec, "random", state_dict_fingerprint(model.state_dict()), vae_spec, None, factor)


def _model_from_state(config: DiTConfig, state: dict[str, torch.Tensor], source: str) -> DiT:
    # Built on the meta device and filled by assignment: no 2.7 GB of throwaway random init.
    with torch.device("meta"):
        model = DiT(config)
    state = {k: v.to(torch.float32).contiguous() for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        problems = ([f"missing {', '.join(missing[:4])}"] if missing else []) + (
            [f"unexpected {', '.join(unexpected[:4])}"] if unexpected else []
        )
        raise DiffFitError(f"{source} does not match the {config.name} it looks like: {'; '.join(problems)}.")
    return model.eval()


def _load_local(path: Path) -> Weights:
    """A local file, or a folder: a diffusers pipeline or transformer, or one holding a single checkpoint."""
    if path.is_dir():
        if (path / "model_index.json").is_file() or (path / "config.json").is_file():
            return load_diffusers_dir(path, vae_spec=str((path / "vae").resolve()))
        files = [p for p in sorted(path.iterdir()) if p.name.lower().endswith(WEIGHT_SUFFIXES)]
        if len(files) != 1:
            raise DiffFitError(
                f"{path} is a folder but neither a diffusers pipeline (model_index.json) nor a transformer "
                "folder (config.json), nor a folder with a single checkpoint file; pass the checkpoint file."
            )
        path = files[0]
    return read_original_file(path)


# --------------------------------------------------------------------------------------------
# Fingerprint
# --------------------------------------------------------------------------------------------


def state_dict_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """A 16-hex-digit identity for a base's weights, in seconds even for 2.7 GB.

    Not a full hash (that reads every byte: a minute on a 2.7 GB model): it hashes every key and shape
    plus a fixed, evenly spaced sample of up to 4096 values per tensor, as float32 (so the same weights
    match whatever dtype or format they came in). Any training, fine-tuning or merge changes sampled
    values; a hand-edit of a few unsampled elements would go unnoticed, which is fine for telling
    bases apart, not for security. pos_embed enters through its shape and grid scale only, because
    formats that recompute it (diffusers) round its last bits differently. Gamma keys are not part of
    a base and are skipped.
    """
    digest = hashlib.sha256()
    for key in sorted(state):
        if key.endswith(GAMMA_SUFFIXES):
            continue
        tensor = state[key].detach()
        digest.update(f"{key}{tuple(tensor.shape)};".encode())
        if key == "pos_embed":
            digest.update(f"scale={pos_embed_scale_of(tensor)};".encode())
            continue
        flat = tensor.reshape(-1)
        count = min(flat.numel(), FINGERPRINT_SAMPLES)
        index = torch.arange(count, device=flat.device) * (flat.numel() - 1) // max(count - 1, 1)
        digest.update(flat[index].to("cpu", torch.float32).numpy().tobytes())
    return digest.hexdigest()[:16]
