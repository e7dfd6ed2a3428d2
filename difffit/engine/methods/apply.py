"""`difffit.load_adapter` / `difffit.unload_adapter`: a text-to-image adapter on a stock diffusers pipeline.

    pipe = FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", torch_dtype=torch.bfloat16)
    difffit.load_adapter(pipe, "hf://me/flux-difffit-ramen")
    image = pipe("a bowl of ramen").images[0]
    difffit.unload_adapter(pipe)  # the base again, bit for bit

The adapter goes on the pipeline's transformer the way `difffit merge` builds a merged one: AdapterSwapper
sets the trained tensors (bias deltas, modulation tables, norms, gamma, LoRA A and B) in float32, then gamma
folds into the projections it scales (W' = diag(gamma) W, b' = gamma b) and LoRA into the weights it adapts
(peft's merge, W' = W + (alpha / r) B A), and every new tensor is rounded once to the dtype of the tensor it
replaces. The transformer is then a stock diffusers module (no gamma or peft layer) holding the merged
pipeline's weights bit for bit (merge computes in float32 too, and saves in the base file's dtype). Folding,
rather than keeping gamma as a scale and LoRA as peft layers, is what makes this exact in bf16 and fp16: a
runtime gamma in bf16 would be rounded to steps of 1/128 around 1. The price is memory: the replaced tensors
are kept (on their device, in their dtype) so that `unload_adapter` puts them back and the base is restored
bit for bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from difffit.engine.errors import DiffFitError
from difffit.engine.methods.adapter import AdapterMeta, AdapterSwapper, check_base_architecture, read_adapter
from difffit.engine.methods.baselines import fold_lora
from difffit.engine.methods.sources import check_fingerprint, local_source
from difffit.engine.models.bases import state_dict_fingerprint
from difffit.engine.models.families import FAMILIES, family_of
from difffit.engine.models.scaled_linear import fold_scaled_linears

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

APPLIED = "_difffit_adapter"  # the transformer's attribute holding (swapper, source) while an adapter is applied
FOLDS_INTO = (torch.float32, torch.bfloat16, torch.float16)  # the weight dtypes a fold computes from and rounds to
TEXT_FAMILIES = ", ".join(family.title for family in FAMILIES.values() if family.conditioning == "text")


@torch.no_grad()
def load_adapter(
    pipe_or_transformer: DiffusionPipeline | nn.Module, path: str | Path, *, force_base: bool = False
) -> AdapterMeta:
    """Apply a text-to-image difffit adapter (difffit, bitfit, full or lora; PixArt-α/Σ, SD3/3.5, FLUX.1) to a
    stock diffusers pipeline, or to its transformer, in place; returns the adapter's metadata.

    `path`: an adapter file, `hf://OWNER/NAME[/file]` or an adapter repo's `OWNER/NAME`. The transformer then
    holds exactly the weights `difffit merge` would write (gamma and LoRA folded, computed in float32, rounded
    once to the transformer's dtype). The transformer must be the base the adapter trained on: its weights'
    fingerprint is checked and a mismatch refused, unless `force_base=True`. A second adapter is refused:
    `unload_adapter` first, which restores the base bit for bit.
    """
    transformer = transformer_of(pipe_or_transformer)
    if (applied := getattr(transformer, APPLIED, None)) is not None:
        raise DiffFitError(
            f"This {type(transformer).__name__} already has the adapter {applied[1]} applied, and "
            "load_adapter applies one adapter at a time.",
            hint="Call difffit.unload_adapter(pipe) first.",
        )
    source = local_source(str(path))
    tensors, meta = read_adapter(source)
    spec = f"this {type(transformer).__name__}"
    check_target(transformer, spec, source, meta, force_base)
    swapper = AdapterSwapper(transformer, spec)
    try:
        swapper.apply(tensors, meta, dtype=torch.float32)
        fold_lora(transformer, swapper.replace)
        fold_scaled_linears(transformer, swapper.replace)
        swapper.cast_like_replaced()
    except Exception:
        swapper.restore()
        raise
    setattr(transformer, APPLIED, (swapper, source))
    return meta


def check_target(transformer: nn.Module, spec: str, source: str, meta: AdapterMeta, force_base: bool) -> None:
    """Refuse, in one sentence, a transformer the adapter does not apply to: another family, another
    architecture, quantized or float8 weights, or (unless `force_base`) other weights than the base's it trained on."""
    family = meta.model_family
    if family.conditioning != "text":
        raise DiffFitError(
            f"{source} is a {family.title} adapter, and load_adapter applies text-to-image adapters "
            f"({TEXT_FAMILIES}) to diffusers pipelines.",
            hint=f"Sample from it with `difffit sample {source}`, or write a DiTPipeline with "
            f"`difffit merge {source} --format diffusers`.",
        )
    try:
        own = family_of(transformer)
    except TypeError:
        own = None
    if own is not family:
        raise DiffFitError(
            f"{source} is a {family.title} adapter, and {spec} is not a {family.title} transformer.",
            hint=f"Load its base, {meta.base_spec}, with diffusers.",
        )
    try:  # the architecture first: a fingerprint mismatch would hide what differs
        check_base_architecture(meta, transformer, spec)
    except DiffFitError as wrong:
        raise DiffFitError(wrong.message, hint=f"Load its base, {meta.base_spec}, with diffusers.") from None
    stored = {p.dtype for p in transformer.parameters()} - set(FOLDS_INTO)
    if stored or getattr(transformer, "is_quantized", False):
        what = (
            f"{', '.join(sorted(str(dtype).removeprefix('torch.') for dtype in stored))} weights"
            if stored
            else "quantized weights"
        )
        raise DiffFitError(
            f"load_adapter folds the adapter into the transformer's weights, and {spec} holds {what}.",
            hint="Load the pipeline in bf16, fp16 or float32 and apply the adapter before quantizing, "
            "or quantize the pipeline `difffit merge` writes.",
        )
    check_fingerprint(
        source,
        meta,
        spec,
        state_dict_fingerprint(transformer.state_dict()),
        force_base=force_base,
        hint=f"Load the pipeline of {meta.base_spec}, in the dtype its weights are stored in, or pass "
        "force_base=True to apply it anyway.",
        forced="force_base=True",
    )


def unload_adapter(pipe_or_transformer: DiffusionPipeline | nn.Module) -> None:
    """Take off the adapter `load_adapter` applied: the transformer's own tensors and modules go back, so its
    state dict is the base's bit for bit, with nothing added. Without an applied adapter: nothing to do."""
    transformer = transformer_of(pipe_or_transformer)
    applied = getattr(transformer, APPLIED, None)
    if applied is not None:
        applied[0].restore()
        delattr(transformer, APPLIED)


def transformer_of(pipe_or_transformer: DiffusionPipeline | nn.Module) -> nn.Module:
    """A pipeline's transformer, or the transformer given; one sentence for anything else."""
    transformer = getattr(pipe_or_transformer, "transformer", pipe_or_transformer)
    if not isinstance(transformer, nn.Module):
        raise DiffFitError(
            f"load_adapter takes a diffusers pipeline or its transformer, not a {type(pipe_or_transformer).__name__}.",
            hint=f"Pass a {TEXT_FAMILIES} pipeline loaded with diffusers.",
        )
    return transformer
