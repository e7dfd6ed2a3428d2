"""`difffit merge`: fold an adapter into its base and write a standalone model.

- "original": one .safetensors in the reference checkpoint layout, which `--base` accepts; class
  names, VAE and positional scale ride along as safetensors metadata (`difffit.*` keys).
- "diffusers": a DiTPipeline folder (transformer, vae, scheduler, model_index.json with id2label)
  that stock `diffusers.DiTPipeline.from_pretrained` loads. DiTPipeline hard-codes the null label as
  1000, so a model with K < 1000 classes gets a 1001-row table: rows K..999 repeat the null row.
- "peft" (LoRA adapters only): a peft folder (adapter_model.safetensors, adapter_config.json) that
  `peft.PeftModel.from_pretrained(dit, folder)` loads onto difffit's DiT; a new class table rides
  along as a peft `modules_to_save` entry, so `dit` must have the adapter's class count
  (`methods.resize_class_table(dit, K)`).

LoRA folds into the weights (W + (alpha / r) B A) and gamma does; adapters and VPT prompts add
computation no weight can absorb, so their adapters are refused here: sample from them instead.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from difffit_cli.engine.errors import DiffFitError
from difffit_cli.engine.io import atomic_path, check_output
from difffit_cli.engine.methods.adapter import AdapterMeta, read_adapter_meta
from difffit_cli.engine.methods.baselines import fold_lora, lora_config
from difffit_cli.engine.methods.sources import load_source, local_source
from difffit_cli.engine.methods.trainable import CLASS_TABLE, FOLDABLE, fold_scale_factors
from difffit_cli.engine.models.diffusers_layout import original_to_diffusers
from difffit_cli.engine.models.dit import DiT, DiTConfig
from difffit_cli.engine.models.formats import (
    METADATA_CLASS_NAMES,
    METADATA_NUM_HEADS,
    METADATA_POS_EMBED_SCALE,
    METADATA_VAE,
)
from difffit_cli.engine.models.vae import IDENTITY_VAE

FORMATS = ("original", "diffusers", "peft")
DIFFUSERS_NULL_LABEL = 1000  # DiTPipeline's hard-coded null class


def merge_adapter(adapter: str, out: str | Path, *, base: str | None = None, fmt: str = "original",
                  force_base: bool = False, overwrite: bool = False) -> dict:
    """Apply `adapter` to its base, fold gamma and LoRA (or export LoRA for peft), write `out`; returns a
    summary for the CLI.

    An existing `out` is replaced only with `overwrite` (a folder only if difffit wrote it); an `out`
    that is, holds or sits in an input (the adapter, a local base) is refused either way.
    """
    if fmt not in FORMATS:
        raise DiffFitError(f"Unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}.")
    folder = fmt != "original"
    adapter = local_source(adapter)
    check_output(out, overwrite=overwrite, inputs=[adapter, *([base] if base else [])], folder=folder)
    meta = read_adapter_meta(adapter)  # also the one-sentence reason for a non-adapter (not tried as a base)
    if meta.method not in FOLDABLE:
        raise DiffFitError(f"A {meta.method} adapter adds layers that cannot be folded into the base weights; "
                           f"sample from the adapter instead (difffit sample {adapter}).")
    if fmt == "peft" and meta.method != "lora":
        raise DiffFitError(f"--format peft exports LoRA adapters only, and {adapter} is a {meta.method} adapter.")
    if fmt == "diffusers":  # refused before the base is loaded
        check_diffusers(meta.dit_config, meta.vae_spec)
    loaded, meta = load_source(adapter, base=base, force_base=force_base)
    out = check_output(out, overwrite=overwrite, inputs=[adapter, loaded.spec], folder=folder)
    model = loaded.model
    if fmt == "peft":
        write_peft(model, out, meta)
    else:
        fold_lora(model)
        fold_scale_factors(model)
        if fmt == "original":
            write_original(model, out, class_names=loaded.class_names, vae_spec=loaded.vae_spec, meta=meta)
        else:
            write_diffusers(model, out, class_names=loaded.class_names, vae=loaded.vae())
    files = [f for f in out.rglob("*") if f.is_file()] if out.is_dir() else [out]
    return {
        "adapter": str(adapter),
        "base": meta.base_spec if base is None else base,
        "format": fmt,
        "out": str(out),
        "architecture": model.config.name,
        "num_classes": model.config.num_classes,
        "null_label": model.config.num_classes if fmt == "original" else DIFFUSERS_NULL_LABEL,
        "resolution": meta.resolution,
        "gamma_blocks_folded": meta.gamma_blocks,
        "total_params": sum(p.numel() for p in model.parameters()),
        "bytes": sum(f.stat().st_size for f in files),
    }


def write_original(model: DiT, path: Path, *, class_names, vae_spec: str,
                   meta: AdapterMeta | None = None) -> None:
    """The model's state dict in the original layout, fp32, with difffit metadata that load_base reads."""
    from safetensors.torch import save_file

    if model.gamma_blocks:
        raise ValueError("fold_scale_factors before writing an original-layout checkpoint")
    state = {name: t.detach().float().cpu().contiguous() for name, t in model.state_dict().items()}
    metadata = {
        METADATA_VAE: vae_spec,
        METADATA_POS_EMBED_SCALE: repr(float(model.config.pos_embed_scale)),
        METADATA_CLASS_NAMES: json.dumps(class_names),
        # A non-standard width does not say its head count; always record it.
        METADATA_NUM_HEADS: str(model.config.num_heads),
    }
    if meta is not None:
        metadata["difffit.merged_from"] = json.dumps({"base": meta.base_spec, "method": meta.method,
                                                     "training": meta.training})
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)


def write_diffusers(model: DiT, folder: Path, *, class_names, vae) -> None:
    """A DiTPipeline folder; `vae` is the base's Autoencoder (a diffusers AutoencoderKL inside)."""
    from diffusers import DDIMScheduler, DiTTransformer2DModel

    config = model.config
    check_diffusers(config, vae.spec)
    autoencoder = vae.vae
    state = {name: t.detach().float().cpu() for name, t in model.state_dict().items()}
    state[CLASS_TABLE] = pad_class_table(state[CLASS_TABLE], DIFFUSERS_NULL_LABEL)
    padded_config = replace(config, num_classes=DIFFUSERS_NULL_LABEL)
    state, transformer_config = original_to_diffusers(state, padded_config)
    transformer = DiTTransformer2DModel(**transformer_config)
    transformer.load_state_dict(state, strict=True)
    # The schedule DiT was trained with (linear betas 1e-4..0.02, 1000 steps), as facebook/DiT-* ship.
    scheduler = DDIMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                              num_train_timesteps=1000, clip_sample=False)
    names = class_names or [str(i) for i in range(config.num_classes)]
    with atomic_path(folder, kind="merge") as tmp:
        tmp.mkdir()
        transformer.save_pretrained(tmp / "transformer")
        autoencoder.save_pretrained(tmp / "vae")
        scheduler.save_pretrained(tmp / "scheduler")
        index = _model_index(transformer, autoencoder, names)
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))


def write_peft(model: DiT, folder: Path, meta: AdapterMeta) -> None:
    """A peft LoRA folder from `model` with the adapter applied (peft's key layout and config file)."""
    from safetensors.torch import save_file

    prefix = "base_model.model."  # what PeftModel.save_pretrained writes and from_pretrained expects
    state = {prefix + name.replace(".default.", "."): t.detach().float().cpu().contiguous()
             for name, t in model.state_dict().items() if ".lora_" in name}
    to_save = None
    if meta.new_class_table:
        to_save = ["y_embedder.embedding_table"]
        state[prefix + CLASS_TABLE] = model.y_embedder.embedding_table.weight.detach().float().cpu().contiguous()
    config = lora_config(meta.method_settings, modules_to_save=to_save)
    config.base_model_name_or_path = meta.base_spec
    with atomic_path(folder, kind="merge") as tmp:
        tmp.mkdir()
        save_file(state, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(str(tmp))


def diffusers_problem(config: DiTConfig, vae_spec: str) -> str | None:
    """Why a model of `config` with the VAE `vae_spec` cannot become a DiTPipeline (None: it can)."""
    if config.num_classes > DIFFUSERS_NULL_LABEL:
        return f"it supports at most {DIFFUSERS_NULL_LABEL} classes (null label fixed at 1000), this model has " \
               f"{config.num_classes}"
    if config.mlp_ratio != 4.0:  # DiTTransformer2DModel has no MLP-width setting: its blocks are always 4x
        return f"diffusers' DiT supports only MLP ratio 4, this model has {config.mlp_ratio:g}"
    if vae_spec == IDENTITY_VAE:  # the one autoencoder that is not a diffusers AutoencoderKL
        return "its VAE is 'identity' (pixel space), and a pipeline needs a diffusers AutoencoderKL"
    return None


def check_diffusers(config: DiTConfig, vae_spec: str) -> None:
    if problem := diffusers_problem(config, vae_spec):
        raise DiffFitError(f"A DiTPipeline cannot hold this model: {problem}.",
                           hint="Merge with --format original instead.")


def merge_formats(meta: AdapterMeta) -> list[str]:
    """The --format values `merge` writes for this adapter (none for methods that cannot fold)."""
    if meta.method not in FOLDABLE:
        return []
    diffusers = [] if diffusers_problem(meta.dit_config, meta.vae_spec) else ["diffusers"]
    return ["original", *diffusers, *(["peft"] if meta.method == "lora" else [])]


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
