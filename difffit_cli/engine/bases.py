"""Resolve a `--base` spec to a DiT with the reference numerics, its VAE and its metadata.

Specs, tried in this order:
  random:DiT-S/2          a standard config, reference init, seeded (sized by resolution / num_classes)
  tiny                    the base bundled under difffit_cli/assets/tiny (when this build has one)
  DiT-XL/2-256, -512      aliases of the hub pipelines facebook/DiT-XL-2-256 / -512
  a local file            original layout: .pt/.pth (weights-only pickle) or .safetensors; a bare
                          state dict or a training checkpoint holding "ema" (preferred) or "model"
  a local folder          diffusers layout: a pipeline (model_index.json) or a transformer (config.json)
  owner/name              a hub repo in diffusers layout, through huggingface_hub's cache

Every format is converted to the original key layout and run by engine/dit.py, never by diffusers'
model: diffusers' DiT differs numerically from the reference (timestep frequencies, norm eps).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from difffit_cli.engine.dit import (
    DIT_CONFIGS,
    HEADS_BY_WIDTH,
    DiT,
    DiTConfig,
    config_for,
    sincos_pos_embed_2d,
)
from difffit_cli.engine.errors import DiffFitError
from difffit_cli.engine.hub import HUB_ID, error_summary, hub_snapshot, split_hub_id
from difffit_cli.engine.vae import DEFAULT_VAE, Autoencoder, load_vae, vae_geometry

log = logging.getLogger("difffit")

ALIASES = {"DiT-XL/2-256": "facebook/DiT-XL-2-256", "DiT-XL/2-512": "facebook/DiT-XL-2-512"}
RANDOM_PREFIX = "random:"
TINY_BASE = Path(__file__).resolve().parents[1] / "assets" / "tiny.safetensors"
# Optional JSON metadata in our own .safetensors bases (merged models, the bundled tiny base).
METADATA_CLASS_NAMES = "difffit.class_names"
METADATA_VAE = "difffit.vae"
METADATA_POS_EMBED_SCALE = "difffit.pos_embed_scale"
METADATA_NUM_HEADS = "difffit.num_heads"  # only needed for non-standard widths (e.g. a tiny base)
GAMMA_SUFFIXES = (".gamma_attn", ".gamma_mlp")
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
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


@dataclass
class _Weights:
    """What a loader found: an original-layout state dict and any metadata that came with it."""

    state: dict[str, torch.Tensor]
    source_format: str
    class_names: list[str] | None = None
    vae_spec: str | None = None
    num_heads: int | None = None
    pos_embed_scale: float | None = None


def load_base(
    spec: str,
    *,
    resolution: int | None = None,
    num_classes: int | None = None,
    num_heads: int | None = None,
    vae: str | None = None,
) -> Base:
    """Load any base spec (see the module docstring) as a `Base`.

    `resolution` (pixels) and `num_classes` size random bases; for other bases `resolution` is checked
    against the weights and `num_classes` is ignored (a method resizes the class table). `num_heads`
    is needed only for non-standard widths. `vae` overrides the base's own VAE.
    """
    spec = str(spec)
    if spec.startswith(RANDOM_PREFIX):
        return _random_base(spec, resolution, num_classes, vae)
    weights = _find_weights(spec)
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
# Spec resolution
# --------------------------------------------------------------------------------------------


def _find_weights(spec: str) -> _Weights:
    if spec == "tiny":
        if not TINY_BASE.exists():
            raise DiffFitError(
                f"The tiny base is not bundled in this build of difffit (nothing at {TINY_BASE}); "
                "use a random: base such as random:DiT-S/2, or a real base such as DiT-XL/2-256."
            )
        weights = _load_local(TINY_BASE)
        weights.source_format = "bundled"
        return weights
    if spec in ALIASES:
        return _load_hub(ALIASES[spec], what=f"the base {spec} (hub repo {ALIASES[spec]})")
    if spec.startswith("DiT-"):
        raise DiffFitError(f"Unknown base alias {spec!r}; known aliases: {', '.join(ALIASES)}.")
    path = Path(spec).expanduser()
    if path.exists():
        return _load_local(path)
    if spec.lower().endswith(WEIGHT_SUFFIXES) or not HUB_ID.match(spec):
        raise DiffFitError(f"No such file or folder: {spec}.")
    repo_id, _ = split_hub_id(spec)
    return _load_hub(repo_id, what=f"the base {spec} (no such local path, so read as a hub repo id)")


def _random_base(spec: str, resolution: int | None, num_classes: int | None, vae: str | None) -> Base:
    name = spec[len(RANDOM_PREFIX):]
    vae_spec = vae or DEFAULT_VAE
    factor, channels = vae_geometry(vae_spec)
    resolution = resolution or 256
    try:
        config = config_for(name, input_size=resolution // factor, num_classes=num_classes or 1000,
                            in_channels=channels)
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


# --------------------------------------------------------------------------------------------
# Original layout
# --------------------------------------------------------------------------------------------


def config_from_state_dict(
    state: Mapping[str, torch.Tensor], num_heads: int | None = None, *, source: str = "The state dict"
) -> DiTConfig:
    """Read the architecture off an original-layout state dict's shapes (meta tensors are fine)."""
    required = ("x_embedder.proj.weight", "pos_embed", "y_embedder.embedding_table.weight",
                "t_embedder.mlp.0.weight", "blocks.0.mlp.fc1.weight", "final_layer.linear.weight")
    missing = [k for k in required if k not in state]
    if missing:
        seen = ", ".join(list(state)[:3]) or "none"
        raise DiffFitError(
            f"{source} does not look like a DiT checkpoint: missing {', '.join(missing[:3])} "
            f"(its keys: {seen}, ...)."
        )
    hidden, in_channels, patch, _ = state["x_embedder.proj.weight"].shape
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    if num_heads is None:
        if hidden not in HEADS_BY_WIDTH:
            raise DiffFitError(
                f"{source} has width {hidden}, not a standard DiT width "
                f"({', '.join(map(str, HEADS_BY_WIDTH))}), so its number of attention heads is unknown; "
                "pass --num-heads."
            )
        num_heads = HEADS_BY_WIDTH[hidden]
    if hidden % num_heads:
        raise DiffFitError(f"{source}: width {hidden} is not divisible by {num_heads} attention heads.")
    out_channels = state["final_layer.linear.weight"].shape[0] // (patch * patch)
    if out_channels not in (in_channels, 2 * in_channels):
        raise DiffFitError(
            f"{source}: {out_channels} output channels for {in_channels} input channels is not a DiT."
        )
    pos_embed = state["pos_embed"]
    tokens = pos_embed.shape[-2]
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise DiffFitError(f"{source}: pos_embed holds {tokens} positions, not a square token grid.")
    return DiTConfig(
        input_size=grid * patch,
        patch_size=patch,
        in_channels=in_channels,
        hidden_size=hidden,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
        num_classes=state["y_embedder.embedding_table.weight"].shape[0] - 1,  # the last row is the null label
        learn_sigma=out_channels == 2 * in_channels,
        pos_embed_scale=_pos_embed_scale(pos_embed),
    )


def _pos_embed_scale(pos_embed: torch.Tensor) -> float:
    """The grid scale of stored sin-cos positions: 1.0 standard, 2.0 for the resolution trick, ...

    Token 1 sits at column 1/scale; its first frequency is 1, stored as sin at index 0 and cos at
    index dim/4 (see sincos_pos_embed_2d), so the angle between them is 1/scale.
    """
    pe = pos_embed.reshape(-1, pos_embed.shape[-1])
    if pe.is_meta or pe.shape[0] < 2:
        return 1.0
    angle = math.atan2(float(pe[1, 0]), float(pe[1, pe.shape[1] // 4]))
    return round(1.0 / angle, 4) if angle > 1e-6 else 1.0


def _load_local(path: Path) -> _Weights:
    if path.is_dir():
        if (path / "model_index.json").is_file() or (path / "config.json").is_file():
            return _load_diffusers_dir(path, vae_spec=str((path / "vae").resolve()))
        files = [p for p in sorted(path.iterdir()) if p.name.lower().endswith(WEIGHT_SUFFIXES)]
        if len(files) != 1:
            raise DiffFitError(
                f"{path} is a folder but neither a diffusers pipeline (model_index.json) nor a transformer "
                "folder (config.json), nor a folder with a single checkpoint file; pass the checkpoint file."
            )
        path = files[0]
    if path.suffix.lower() == ".safetensors":
        state, metadata = _read_safetensors(path)
    elif path.suffix.lower() in WEIGHT_SUFFIXES:
        state, metadata = _read_torch(path), {}
    else:
        raise DiffFitError(
            f"{path} is not a checkpoint difffit reads (.pt, .pth, .bin, .ckpt or .safetensors)."
        )
    if any(k.startswith("transformer_blocks.") for k in state):
        raise DiffFitError(
            f"{path} holds diffusers-layout weights; pass the folder that holds it with its config.json "
            "instead."
        )
    gamma = sorted(k for k in state if k.endswith(GAMMA_SUFFIXES))
    if gamma:
        raise DiffFitError(
            f"{path} holds DiffFit scale factors ({gamma[0]}, ...), so it is a training state, not a base; "
            "use its adapter, or `difffit merge` it into a base first."
        )
    return _Weights(state, "original", **_parse_metadata(metadata, path))


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise DiffFitError(
            f"{path} is not a readable .safetensors file ({error_summary(e)}); it may be truncated, so "
            "copy or download it again."
        ) from None


def _read_torch(path: Path) -> dict[str, torch.Tensor]:
    with open(path, "rb") as f:
        magic = f.read(4)
    # torch.save writes a zip archive (or, before 1.6, a pickle stream starting with the PROTO opcode).
    if not (magic.startswith(b"PK\x03\x04") or magic.startswith(b"\x80")):
        raise DiffFitError(f"{path} is not a PyTorch checkpoint (it is neither a zip archive nor a pickle).")
    try:
        # The reference's training checkpoints carry their argparse.Namespace under "args".
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise DiffFitError(f"{path} is not a readable PyTorch checkpoint ({error_summary(e)}).") from None
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"Python objects ({found.group(1)})" if found else "Python code"
        raise DiffFitError(
            f"Refusing to unpickle {path}: it holds {what} besides tensors and difffit only reads "
            "weights-only checkpoints; re-save just its state dict (torch.save or safetensors)."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as e:
        raise DiffFitError(
            f"{path} is not a readable PyTorch checkpoint ({error_summary(e)}); it may be truncated."
        ) from None
    if isinstance(obj, dict):
        for key in ("ema", "model"):  # a training checkpoint: the EMA weights are the ones to sample from
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DiffFitError(
            f"{path} holds no state dict: expected a dict of tensors, or a training checkpoint with "
            "'ema' or 'model'."
        )
    return _strip_prefixes(obj)


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # DDP ("module.") and torch.compile ("_orig_mod.") wrappers prefix every key.
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _parse_metadata(metadata: Mapping[str, str], path: Path) -> dict:
    out: dict = {}
    try:
        if METADATA_CLASS_NAMES in metadata:
            names = json.loads(metadata[METADATA_CLASS_NAMES])
            out["class_names"] = [str(n) for n in names] if isinstance(names, list) else None
        if METADATA_VAE in metadata:
            out["vae_spec"] = metadata[METADATA_VAE]
        if METADATA_POS_EMBED_SCALE in metadata:
            out["pos_embed_scale"] = float(metadata[METADATA_POS_EMBED_SCALE])
        if METADATA_NUM_HEADS in metadata:
            out["num_heads"] = int(metadata[METADATA_NUM_HEADS])
    except ValueError:
        raise DiffFitError(
            f"{path} carries unreadable difffit metadata; re-create it with `difffit merge`."
        ) from None
    return out


# --------------------------------------------------------------------------------------------
# Diffusers layout
# --------------------------------------------------------------------------------------------

# (diffusers, original) key fragments. Inside transformer_blocks.N:
_BLOCK_KEYS = [
    ("norm1.linear.", "adaLN_modulation.1."),
    ("attn1.to_out.0.", "attn.proj."),
    ("ff.net.0.proj.", "mlp.fc1."),
    ("ff.net.2.", "mlp.fc2."),
]
# Copied into every diffusers block; one copy in the original layout.
_EMBEDDER_KEYS = [
    ("norm1.emb.timestep_embedder.linear_1.", "t_embedder.mlp.0."),
    ("norm1.emb.timestep_embedder.linear_2.", "t_embedder.mlp.2."),
    ("norm1.emb.class_embedder.embedding_table.", "y_embedder.embedding_table."),
]
_TOP_KEYS = [
    ("pos_embed.proj.", "x_embedder.proj."),
    ("proj_out_1.", "final_layer.adaLN_modulation.1."),
    ("proj_out_2.", "final_layer.linear."),
]
_DIFFUSERS_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")


def _rename(key: str, table: list[tuple[str, str]], reverse: bool = False) -> str:
    for diffusers_key, original_key in table:
        old, new = (original_key, diffusers_key) if reverse else (diffusers_key, original_key)
        if key.startswith(old):
            return new + key[len(old):]
    return key


def diffusers_to_original(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers DiTTransformer2DModel state dict in the original layout (without pos_embed, which
    diffusers does not store). q/k/v are joined into qkv; of the per-block embedder copies, block 0's
    is kept (diffusers' final layer uses block 0's too), with a warning if the copies differ."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    copies: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for key, value in state.items():
        m = re.match(r"transformer_blocks\.(\d+)\.(.+)", key)
        if m is None:
            out[_rename(key, _TOP_KEYS)] = value
            continue
        index, rest = int(m.group(1)), m.group(2)
        if q := re.match(r"attn1\.to_([qkv])\.(weight|bias)$", rest):
            qkv.setdefault(f"blocks.{index}.attn.qkv.{q.group(2)}", {})[q.group(1)] = value
        elif (renamed := _rename(rest, _EMBEDDER_KEYS)) != rest:
            copies.setdefault(renamed, []).append((index, value))
        else:
            out[f"blocks.{index}.{_rename(rest, _BLOCK_KEYS)}"] = value
    for key, parts in qkv.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]])  # the reference's fused row order
    for key, found in copies.items():
        found.sort(key=lambda pair: pair[0])
        first = found[0][1]
        differ = [i for i, v in found[1:] if not torch.equal(v, first)]
        if differ:
            log.warning(
                "The diffusers checkpoint's per-block copies of %s differ (blocks %s vs block %d); "
                "using block %d's.",
                key,
                ", ".join(map(str, differ[:8])),
                found[0][0],
                found[0][0],
            )
        out[key] = first
    return out


def original_to_diffusers(
    state: Mapping[str, torch.Tensor], config: DiTConfig
) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, constructor kwargs) for diffusers' DiTTransformer2DModel, loadable with strict keys.

    The embedders are copied into every block, as diffusers expects. norm_eps is set to the reference's
    1e-6 so diffusers runs closer to the reference (its timestep frequencies still differ slightly).
    """
    if any(k.endswith(GAMMA_SUFFIXES) for k in state):
        raise DiffFitError("The model still holds DiffFit scale factors; fold them into the weights first.")
    pos_embed = state.get("pos_embed")
    grid = config.input_size // config.patch_size
    if pos_embed is not None and not pos_embed.is_meta:
        standard = sincos_pos_embed_2d(config.hidden_size, grid).reshape(pos_embed.shape)
        if not torch.allclose(pos_embed.float(), standard, atol=1e-5):
            raise DiffFitError(
                "diffusers' DiT always computes standard sin-cos positions, but this model's pos_embed "
                "differs (the resolution trick?); write it in the original format instead."
            )
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == "pos_embed":
            continue
        if (renamed := _rename(key, _EMBEDDER_KEYS, reverse=True)) != key:
            for i in range(config.depth):
                out[f"transformer_blocks.{i}.{renamed}"] = value
        elif m := re.match(r"blocks\.(\d+)\.(.+)", key):
            index, rest = m.groups()
            if rest.startswith("attn.qkv."):
                for letter, part in zip("qkv", value.chunk(3), strict=True):
                    out[f"transformer_blocks.{index}.attn1.to_{letter}.{rest.rsplit('.', 1)[1]}"] = part
            else:
                out[f"transformer_blocks.{index}.{_rename(rest, _BLOCK_KEYS, reverse=True)}"] = value
        else:
            out[_rename(key, _TOP_KEYS, reverse=True)] = value
    kwargs = {
        "num_attention_heads": config.num_heads,
        "attention_head_dim": config.hidden_size // config.num_heads,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "num_layers": config.depth,
        "sample_size": config.input_size,
        "patch_size": config.patch_size,
        "num_embeds_ada_norm": config.num_classes,
        "activation_fn": "gelu-approximate",
        "attention_bias": True,
        "norm_type": "ada_norm_zero",
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,
    }
    return out, kwargs


def _load_diffusers_dir(folder: Path, vae_spec: str | None) -> _Weights:
    """A diffusers pipeline folder (model_index.json + transformer/) or a transformer folder."""
    class_names = None
    transformer = folder
    if (folder / "model_index.json").is_file():
        index = _read_json(folder / "model_index.json")
        transformer = folder / "transformer"
        class_names = _class_names(index.get("id2label"))
        if not (folder / "vae" / "config.json").is_file():
            vae_spec = None
    else:
        vae_spec = None
    config = _read_json(transformer / "config.json")
    if config.get("_class_name") not in _DIFFUSERS_CLASSES or config.get("norm_type") != "ada_norm_zero":
        raise DiffFitError(
            f"{transformer} holds a diffusers {config.get('_class_name', 'model')}, not a DiT transformer "
            "(DiTTransformer2DModel with ada_norm_zero)."
        )
    state = diffusers_to_original(_read_diffusers_weights(transformer))
    if "x_embedder.proj.weight" in state:
        # diffusers recomputes the standard sin-cos positions instead of storing them; so do we.
        hidden, patch = state["x_embedder.proj.weight"].shape[0], config.get("patch_size", 2)
        state["pos_embed"] = sincos_pos_embed_2d(hidden, config.get("sample_size", 32) // patch).unsqueeze(0)
    return _Weights(state, "diffusers", class_names, vae_spec, num_heads=config.get("num_attention_heads"))


def _read_diffusers_weights(transformer: Path) -> dict[str, torch.Tensor]:
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        if (transformer / name).is_file():
            path = transformer / name
            return _read_safetensors(path)[0] if name.endswith(".safetensors") else _read_torch(path)
    raise DiffFitError(
        f"{transformer} has no diffusion_pytorch_model.safetensors (or .bin); the download is incomplete."
    )


def _load_hub(repo_id: str, what: str) -> _Weights:
    """A diffusers repo through the hub cache: the transformer now, the VAE only when first used."""
    files = ["model_index.json", "config.json", "transformer/config.json", "vae/config.json", "scheduler/*"]
    instead = "pass --base a local checkpoint file or folder"
    weights = ["diffusion_pytorch_model.safetensors", "transformer/diffusion_pytorch_model.safetensors"]
    folder = hub_snapshot(repo_id, files + weights, what=what, instead=instead)
    transformer = folder / "transformer" if (folder / "model_index.json").is_file() else folder
    if not (transformer / "diffusion_pytorch_model.safetensors").is_file():  # older repos ship only .bin
        bins = [w.replace(".safetensors", ".bin") for w in weights]
        hub_snapshot(repo_id, bins, what=what, instead=instead)
    if not (transformer / "config.json").is_file():
        raise DiffFitError(
            f"The hub repo {repo_id} is not a diffusers DiT pipeline or transformer (no config.json)."
        )
    vae_spec = f"{repo_id}/vae" if (folder / "vae" / "config.json").is_file() else None
    loaded = _load_diffusers_dir(folder, vae_spec=None)
    loaded.vae_spec = vae_spec
    return loaded


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DiffFitError(f"Could not read {path} ({error_summary(e)}).") from None


def _class_names(id2label: Mapping[str, str] | None) -> list[str] | None:
    """DiTPipeline's id2label ({"0": "tench, Tinca tinca", ...}) as a list indexed by class id."""
    if not id2label:
        return None
    labels = {int(k): str(v) for k, v in id2label.items()}
    return [labels.get(i, str(i)) for i in range(max(labels) + 1)]


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
            digest.update(f"scale={_pos_embed_scale(tensor)};".encode())
            continue
        flat = tensor.reshape(-1)
        count = min(flat.numel(), FINGERPRINT_SAMPLES)
        index = torch.arange(count, device=flat.device) * (flat.numel() - 1) // max(count - 1, 1)
        digest.update(flat[index].to("cpu", torch.float32).numpy().tobytes())
    return digest.hexdigest()[:16]
