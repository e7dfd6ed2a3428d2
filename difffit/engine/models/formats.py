"""The original facebookresearch/DiT layout: reading checkpoint files, difffit's metadata in them, and
reading the architecture off a state dict's shapes.

`.pt` files are read with `torch.load(weights_only=True)` (plus `argparse.Namespace`, which the
reference's training checkpoints carry); nothing else is ever unpickled.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from difffit.engine.errors import DiffFitError
from difffit.engine.hub import WEIGHT_SUFFIXES, error_summary
from difffit.engine.models.dit import HEADS_BY_WIDTH, DiTConfig

# Optional JSON metadata in our own .safetensors bases (merged models, the bundled tiny base).
METADATA_CLASS_NAMES = "difffit.class_names"
METADATA_VAE = "difffit.vae"
METADATA_POS_EMBED_SCALE = "difffit.pos_embed_scale"
METADATA_NUM_HEADS = "difffit.num_heads"  # only needed for non-standard widths (e.g. a tiny base)
GAMMA_SUFFIXES = (".gamma_attn", ".gamma_mlp")
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on a header


@dataclass
class Weights:
    """What a loader found: an original-layout state dict and any metadata that came with it."""

    state: dict[str, torch.Tensor]
    source_format: str
    class_names: list[str] | None = None
    vae_spec: str | None = None
    num_heads: int | None = None
    pos_embed_scale: float | None = None


def config_from_state_dict(
    state: Mapping[str, torch.Tensor], num_heads: int | None = None, *, source: str = "The state dict"
) -> DiTConfig:
    """Read the architecture off an original-layout state dict's shapes (meta tensors are fine)."""
    required = (
        "x_embedder.proj.weight",
        "pos_embed",
        "y_embedder.embedding_table.weight",
        "t_embedder.mlp.0.weight",
        "blocks.0.mlp.fc1.weight",
        "final_layer.linear.weight",
    )
    missing = [k for k in required if k not in state]
    if missing:
        seen = ", ".join(list(state)[:3]) or "none"
        raise DiffFitError(
            f"{source} does not look like a DiT checkpoint: missing {', '.join(missing[:3])} (its keys: {seen}, ...)."
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
        raise DiffFitError(f"{source}: {out_channels} output channels for {in_channels} input channels is not a DiT.")
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
        pos_embed_scale=pos_embed_scale_of(pos_embed),
    )


def pos_embed_scale_of(pos_embed: torch.Tensor) -> float:
    """The grid scale of stored sin-cos positions: 1.0 standard, 2.0 for the resolution trick, ...

    Token 1 sits at column 1/scale; its first frequency is 1, stored as sin at index 0 and cos at
    index dim/4 (see sincos_pos_embed_2d), so the angle between them is 1/scale.
    """
    pe = pos_embed.reshape(-1, pos_embed.shape[-1])
    if pe.is_meta or pe.shape[0] < 2:
        return 1.0
    angle = math.atan2(float(pe[1, 0]), float(pe[1, pe.shape[1] // 4]))
    return round(1.0 / angle, 4) if angle > 1e-6 else 1.0


def read_original_file(path: Path) -> Weights:
    """An original-layout checkpoint file: .pt/.pth/.bin/.ckpt (weights-only pickle) or .safetensors."""
    if path.suffix.lower() == ".safetensors":
        state, metadata = read_safetensors(path)
    elif path.suffix.lower() in WEIGHT_SUFFIXES:
        state, metadata = read_torch(path), {}
    else:
        raise DiffFitError(f"{path} is not a checkpoint difffit reads (.pt, .pth, .bin, .ckpt or .safetensors).")
    if any(k.startswith("transformer_blocks.") for k in state):
        raise DiffFitError(
            f"{path} holds diffusers-layout weights; pass the folder that holds it with its config.json instead."
        )
    gamma = sorted(k for k in state if k.endswith(GAMMA_SUFFIXES))
    if gamma:
        raise DiffFitError(
            f"{path} holds DiffFit scale factors ({gamma[0]}, ...), so it is a training state, not a base; "
            "use its adapter, or `difffit merge` it into a base first."
        )
    return Weights(state, "original", **parse_metadata(metadata, path))


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    _, metadata = read_safetensors_header(path)  # a damaged file is worded the same by every reader
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, metadata
    except (SafetensorError, OSError) as e:
        raise damaged_file(path, error_summary(e)) from None


def read_safetensors_header(path: str | Path) -> tuple[dict[str, list[int]], dict[str, str]]:
    """(tensor shapes, __metadata__) of a .safetensors file, from its header alone.

    Read by hand (an 8-byte little-endian length, then that much JSON) rather than with safetensors'
    safe_open, so that a file whose tensor data is cut short still says what it is, and so that an adapter
    and a base that are damaged the same way get the same sentence.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(9)
            if len(head) < 9:
                raise damaged_file(path, f"truncated: {size} bytes")
            (length,) = struct.unpack("<Q", head[:8])
            if head[8:] != b"{" or length > MAX_HEADER_BYTES:
                raise DiffFitError(f"{path} is not a safetensors file.")
            if 8 + length > size:
                raise damaged_file(path, f"truncated inside its header: {size} bytes")
            header = json.loads(head[8:] + f.read(length - 1))
        metadata = header.pop("__metadata__", None) or {}
        shapes = {name: list(info["shape"]) for name, info in header.items()}
        end = 8 + length + max((info["data_offsets"][1] for info in header.values()), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):  # JSONDecodeError is a ValueError
        raise damaged_file(path, "its header is not valid") from None
    if end > size:
        raise damaged_file(path, f"truncated: its tensors end at byte {end:,}, the file has {size:,}")
    return shapes, metadata


def damaged_file(path: str | Path, why: str) -> DiffFitError:
    return DiffFitError(f"{path} is damaged ({why}); copy or download it again.")


def read_torch(path: Path) -> dict[str, torch.Tensor]:
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
        if "Unsupported operand" in str(e):  # bytes that are no pickle: torch's text would blame weights_only
            raise DiffFitError(
                f"{path} is not a readable PyTorch checkpoint (its pickle data is damaged); it may be truncated."
            ) from None
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
            f"{path} holds no state dict: expected a dict of tensors, or a training checkpoint with 'ema' or 'model'."
        )
    return strip_prefixes(obj)


def strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # DDP ("module.") and torch.compile ("_orig_mod.") wrappers prefix every key.
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def parse_metadata(metadata: Mapping[str, str], path: Path) -> dict:
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
        raise DiffFitError(f"{path} carries unreadable difffit metadata; re-create it with `difffit merge`.") from None
    return out
