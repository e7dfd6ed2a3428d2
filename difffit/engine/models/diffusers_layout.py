"""The diffusers layout of DiT weights: key conversion both ways, and reading diffusers folders and hub repos.

diffusers' `DiTTransformer2DModel` holds the same weights in another layout: q/k/v apart, and the
timestep and label embedders copied into every block. difffit reads them into the original layout
and runs them with the reference numerics, never with diffusers' model.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import torch

from difffit.engine.errors import DiffFitError
from difffit.engine.hub import error_summary, hub_snapshot
from difffit.engine.io import atomic_path
from difffit.engine.models.dit import CLASS_TABLE, DiT, DiTConfig, sincos_pos_embed_2d
from difffit.engine.models.formats import GAMMA_SUFFIXES, Weights, read_safetensors, read_torch
from difffit.engine.models.vae import IDENTITY_VAE

log = logging.getLogger("difffit")

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
DIFFUSERS_NULL_LABEL = 1000  # DiTPipeline's hard-coded null class


def _rename(key: str, table: list[tuple[str, str]], reverse: bool = False) -> str:
    for diffusers_key, original_key in table:
        old, new = (original_key, diffusers_key) if reverse else (diffusers_key, original_key)
        if key.startswith(old):
            return new + key[len(old) :]
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
                "The diffusers checkpoint's per-block copies of %s differ (blocks %s vs block %d); using block %d's.",
                key,
                ", ".join(map(str, differ[:8])),
                found[0][0],
                found[0][0],
            )
        out[key] = first
    return out


def original_to_diffusers(state: Mapping[str, torch.Tensor], config: DiTConfig) -> tuple[dict[str, torch.Tensor], dict]:
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


def load_diffusers_dir(folder: Path, vae_spec: str | None) -> Weights:
    """A diffusers pipeline folder (model_index.json + transformer/) or a transformer folder."""
    class_names = None
    transformer = folder
    if (folder / "model_index.json").is_file():
        index = read_json(folder / "model_index.json")
        transformer = folder / "transformer"
        class_names = class_names_of(index.get("id2label"))
        if not (folder / "vae" / "config.json").is_file():
            vae_spec = None
    else:
        vae_spec = None
    config = read_json(transformer / "config.json")
    if config.get("_class_name") not in _DIFFUSERS_CLASSES or config.get("norm_type") != "ada_norm_zero":
        raise DiffFitError(
            f"{transformer} holds a diffusers {config.get('_class_name', 'model')}, not a DiT transformer "
            "(DiTTransformer2DModel with ada_norm_zero)."
        )
    state = diffusers_to_original(read_diffusers_weights(transformer))
    if "x_embedder.proj.weight" in state:
        # diffusers recomputes the standard sin-cos positions instead of storing them; so do we.
        hidden, patch = state["x_embedder.proj.weight"].shape[0], config.get("patch_size", 2)
        state["pos_embed"] = sincos_pos_embed_2d(hidden, config.get("sample_size", 32) // patch).unsqueeze(0)
    return Weights(state, "diffusers", class_names, vae_spec, num_heads=config.get("num_attention_heads"))


def read_diffusers_weights(transformer: Path) -> dict[str, torch.Tensor]:
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        if (transformer / name).is_file():
            path = transformer / name
            return read_safetensors(path)[0] if name.endswith(".safetensors") else read_torch(path)
    raise DiffFitError(
        f"{transformer} has no diffusion_pytorch_model.safetensors (or .bin); the download is incomplete."
    )


def load_hub(repo_id: str, what: str) -> Weights:
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
        raise DiffFitError(f"The hub repo {repo_id} is not a diffusers DiT pipeline or transformer (no config.json).")
    vae_spec = f"{repo_id}/vae" if (folder / "vae" / "config.json").is_file() else None
    loaded = load_diffusers_dir(folder, vae_spec=None)
    loaded.vae_spec = vae_spec
    return loaded


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DiffFitError(f"Could not read {path} ({error_summary(e)}).") from None


def class_names_of(id2label: Mapping[str, str] | None) -> list[str] | None:
    """DiTPipeline's id2label ({"0": "tench, Tinca tinca", ...}) as a list indexed by class id."""
    if not id2label:
        return None
    labels = {int(k): str(v) for k, v in id2label.items()}
    return [labels.get(i, str(i)) for i in range(max(labels) + 1)]


def dit_pipeline_problem(config: DiTConfig, vae_spec: str) -> str | None:
    """Why a model of `config` with the VAE `vae_spec` cannot become a DiTPipeline (None: it can)."""
    if config.num_classes > DIFFUSERS_NULL_LABEL:
        return (
            f"it supports at most {DIFFUSERS_NULL_LABEL} classes (null label fixed at 1000), this model has "
            f"{config.num_classes}"
        )
    if config.mlp_ratio != 4.0:  # DiTTransformer2DModel has no MLP-width setting: its blocks are always 4x
        return f"diffusers' DiT supports only MLP ratio 4, this model has {config.mlp_ratio:g}"
    if vae_spec == IDENTITY_VAE:  # the one autoencoder that is not a diffusers AutoencoderKL
        return "its VAE is 'identity' (pixel space), and a pipeline needs a diffusers AutoencoderKL"
    return None


def write_dit_pipeline(model: DiT, folder: Path, *, class_names, vae) -> None:
    """A DiTPipeline folder that stock `diffusers.DiTPipeline.from_pretrained` loads; `vae` is the base's
    Autoencoder (a diffusers AutoencoderKL inside). DiTPipeline hard-codes the null label as 1000, so a
    model with K < 1000 classes gets a 1001-row table: rows K..999 repeat the null row."""
    from diffusers import DDIMScheduler, DiTTransformer2DModel

    config = model.config
    if problem := dit_pipeline_problem(config, vae.spec):
        raise DiffFitError(
            f"A DiTPipeline cannot hold this model: {problem}.", hint="Merge with --format original instead."
        )
    autoencoder = vae.vae
    state = {name: t.detach().float().cpu() for name, t in model.state_dict().items()}
    state[CLASS_TABLE] = pad_class_table(state[CLASS_TABLE], DIFFUSERS_NULL_LABEL)
    padded_config = replace(config, num_classes=DIFFUSERS_NULL_LABEL)
    state, transformer_config = original_to_diffusers(state, padded_config)
    transformer = DiTTransformer2DModel(**transformer_config)
    transformer.load_state_dict(state, strict=True)
    # The schedule DiT was trained with (linear betas 1e-4..0.02, 1000 steps), as facebook/DiT-* ship.
    scheduler = DDIMScheduler(
        beta_start=0.0001, beta_end=0.02, beta_schedule="linear", num_train_timesteps=1000, clip_sample=False
    )
    names = class_names or [str(i) for i in range(config.num_classes)]
    with atomic_path(folder, kind="merge") as tmp:
        tmp.mkdir()
        transformer.save_pretrained(tmp / "transformer")
        autoencoder.save_pretrained(tmp / "vae")
        scheduler.save_pretrained(tmp / "scheduler")
        index = _model_index(transformer, autoencoder, names)
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))


def pad_class_table(table: torch.Tensor, null_label: int) -> torch.Tensor:
    """K+1 rows (null last) -> null_label+1 rows: the K class rows, then the null row repeated."""
    k = table.shape[0] - 1
    if k == null_label:
        return table
    null = table[k:]
    return torch.cat([table[:k], null.expand(null_label + 1 - k, -1)]).contiguous()


def _model_index(transformer, vae, class_names: list[str]) -> dict:
    import diffusers

    return {
        "_class_name": "DiTPipeline",
        "_diffusers_version": diffusers.__version__,
        "id2label": {str(i): name for i, name in enumerate(class_names)},
        "scheduler": ["diffusers", "DDIMScheduler"],
        "transformer": ["diffusers", type(transformer).__name__],
        "vae": ["diffusers", type(vae).__name__],
    }
