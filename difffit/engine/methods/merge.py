"""`difffit merge`: fold an adapter into its base and write a standalone model.

- "original" (DiT): one .safetensors in the reference checkpoint layout, which `--base` accepts; class
  names, VAE and positional scale ride along as safetensors metadata (`difffit.*` keys).
- "diffusers": a pipeline folder that stock diffusers loads, written by the adapter's family: DiT's a
  DiTPipeline (transformer, vae, scheduler, model_index.json with id2label; DiTPipeline hard-codes the
  null label as 1000, so K < 1000 classes get a 1001-row table), PixArt's its own pipeline class with
  the merged transformer and the base's other components linked or copied as they are.
- "comfyui" (PixArt, SD3, FLUX; not `full`): one small .safetensors that ComfyUI's Load LoRA node applies
  exactly, in ComfyUI's native key layout (engine/methods/comfyui.py).
- "peft" (LoRA adapters only): a peft folder (adapter_model.safetensors, adapter_config.json) that
  `peft.PeftModel.from_pretrained(model, folder)` loads onto difffit's DiT or diffusers' PixArt
  transformer; DiT's new class table rides along as a peft `modules_to_save` entry, so the DiT must
  have the adapter's class count (`methods.resize_class_table(dit, K)`).

LoRA folds into the weights (W + (alpha / r) B A) and gamma does; adapters and VPT prompts add
computation no weight can absorb, so their adapters are refused here: sample from them instead.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from difffit.engine.errors import DiffFitError
from difffit.engine.io import atomic_path, check_output
from difffit.engine.methods.adapter import AdapterMeta, read_adapter, read_adapter_meta
from difffit.engine.methods.baselines import fold_lora, lora_config
from difffit.engine.methods.comfyui import check_comfyui_adapter, check_comfyui_out, comfyui_offered, write_comfyui
from difffit.engine.methods.sources import load_adapter_base, load_source, local_source
from difffit.engine.methods.trainable import FOLDABLE
from difffit.engine.models.diffusers_layout import DIFFUSERS_NULL_LABEL
from difffit.engine.models.dit import CLASS_TABLE, DiT
from difffit.engine.models.families import family_of
from difffit.engine.models.formats import (
    METADATA_CLASS_NAMES,
    METADATA_NUM_HEADS,
    METADATA_POS_EMBED_SCALE,
    METADATA_VAE,
)

FORMATS = ("original", "diffusers", "peft", "comfyui")
FILE_FORMATS = ("original", "comfyui")  # one file; the others write a folder


def merge_adapter(
    adapter: str,
    out: str | Path,
    *,
    base: str | None = None,
    fmt: str | None = None,
    force_base: bool = False,
    overwrite: bool = False,
) -> dict:
    """Apply `adapter` to its base, fold gamma and LoRA (or export LoRA for peft), write `out`; returns a
    summary for the CLI. `fmt`: one of the adapter's family's formats (default its first: DiT "original",
    PixArt "diffusers").

    An existing `out` is replaced only with `overwrite` (a folder only if difffit wrote it); an `out`
    that is, holds or sits in an input (the adapter, a local base) is refused either way.
    """
    if fmt is not None and fmt not in FORMATS:
        raise DiffFitError(f"Unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}.")
    adapter = local_source(adapter)
    meta = read_adapter_meta(adapter)  # also the one-sentence reason for a non-adapter (not tried as a base)
    family = meta.model_family
    fmt = fmt or family.merge_formats[0]
    folder = fmt not in FILE_FORMATS
    if fmt == "comfyui":
        check_comfyui_out(out)
        check_comfyui_adapter(meta)
    check_output(out, overwrite=overwrite, inputs=[adapter, *([base] if base else [])], folder=folder)
    _check_mergeable(adapter, meta, fmt)
    if fmt == "comfyui":
        tensors, meta = read_adapter(adapter)
        loaded = load_adapter_base(adapter, meta, base=base, force_base=force_base)
    else:
        loaded, meta = load_source(adapter, base=base, force_base=force_base)
    out = check_output(out, overwrite=overwrite, inputs=[adapter, loaded.spec], folder=folder)
    model = loaded.model
    if fmt == "comfyui":
        write_comfyui(loaded, tensors, meta, out)
    elif fmt == "peft":
        write_peft(model, out, meta)
    else:
        fold_lora(model)
        family.fold_gamma(model)
        if fmt == "original":
            write_original(model, out, class_names=loaded.class_names, vae_spec=loaded.vae_spec, meta=meta)
        else:
            family.write_pipeline(loaded, model, out)
    files = [f for f in out.rglob("*") if f.is_file()] if out.is_dir() else [out]
    classes = {}
    if family.class_table:  # DiTPipeline's null label is fixed at 1000
        classes = {
            "num_classes": meta.num_classes,
            "null_label": meta.num_classes if fmt == "original" else DIFFUSERS_NULL_LABEL,
        }
    return {
        "adapter": str(adapter),
        "base": meta.base_spec if base is None else base,
        "format": fmt,
        "out": str(out),
        "family": family.name,
        "architecture": meta.architecture,
        **classes,
        "resolution": meta.resolution,
        # The ComfyUI file keeps gamma apart (ComfyUI applies it, through its DoRA path, to this very base).
        **(
            {"gamma_blocks": meta.gamma_blocks, "base_fingerprint": loaded.fingerprint}
            if fmt == "comfyui"
            else {"gamma_blocks_folded": meta.gamma_blocks, "total_params": sum(p.numel() for p in model.parameters())}
        ),
        "bytes": sum(f.stat().st_size for f in files),
    }


def _check_mergeable(adapter: str, meta: AdapterMeta, fmt: str) -> None:
    """The adapter folds into its base, in a format its family offers (checked before the base is loaded)."""
    family = meta.model_family
    if fmt not in family.merge_formats:
        raise DiffFitError(
            f"--format {fmt} is not available for {family.title} adapters; choose {' or '.join(family.merge_formats)}."
        )
    if meta.method not in FOLDABLE:
        raise DiffFitError(
            f"A {meta.method} adapter adds layers that cannot be folded into the base weights; "
            f"sample from the adapter instead (difffit sample {adapter})."
        )
    if fmt == "peft" and meta.method != "lora":
        raise DiffFitError(f"--format peft exports LoRA adapters only, and {adapter} is a {meta.method} adapter.")
    if fmt == "diffusers" and (problem := family.pipeline_problem(meta)):
        raise DiffFitError(
            f"A {family.pipeline_name} cannot hold this model: {problem}.", hint="Merge with --format original instead."
        )


def write_original(
    model: DiT, path: Path, *, class_names: list[str] | None, vae_spec: str, meta: AdapterMeta | None = None
) -> None:
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
        metadata["difffit.merged_from"] = json.dumps(
            {"base": meta.base_spec, "method": meta.method, "training": meta.training}
        )
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)


def write_peft(model: nn.Module, folder: Path, meta: AdapterMeta) -> None:
    """A peft LoRA folder from `model` with the adapter applied (peft's key layout and config file)."""
    from safetensors.torch import save_file

    prefix = "base_model.model."  # what PeftModel.save_pretrained writes and from_pretrained expects
    state = {
        prefix + name.replace(".default.", "."): t.detach().float().cpu().contiguous()
        for name, t in model.state_dict().items()
        if ".lora_" in name
    }
    to_save = None
    if meta.new_class_table:
        to_save = ["y_embedder.embedding_table"]
        state[prefix + CLASS_TABLE] = model.y_embedder.embedding_table.weight.detach().float().cpu().contiguous()
    config = lora_config(meta.method_settings, modules_to_save=to_save, family=family_of(model))
    config.base_model_name_or_path = meta.base_spec
    with atomic_path(folder, kind="merge") as tmp:
        tmp.mkdir()
        save_file(state, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(str(tmp))


def merge_formats(meta: AdapterMeta) -> list[str]:
    """The --format values `merge` writes for this adapter (none for methods that cannot fold)."""
    if meta.method not in FOLDABLE:
        return []
    family = meta.model_family
    return [
        fmt
        for fmt in family.merge_formats
        if (fmt != "peft" or meta.method == "lora")
        and (fmt != "diffusers" or not family.pipeline_problem(meta))
        and (fmt != "comfyui" or comfyui_offered(meta))
    ]
