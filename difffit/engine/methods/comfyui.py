"""`difffit merge --format comfyui`: one small .safetensors that ComfyUI's "Load LoRA" node applies exactly.

ComfyUI holds PixArt, SD3 and FLUX in their original (native) layouts, not diffusers': the file's keys are
`diffusion_model.<native name>`, which ComfyUI's LoRA loader maps onto its model as they are. The layout
tables below are difffit's own description of those layouts (tests check them against ComfyUI's tables and
loader). Where ComfyUI fuses several diffusers projections into one tensor (q, k and v into `qkv`; FLUX's
single blocks also fuse the MLP input into `linear1`; PixArt's cross-attention k and v into `kv_linear`),
the parts are stacked along the output rows in the native order, so their deltas become one delta of the
fused tensor. diffusers' `AdaLayerNormContinuous` (FLUX's and SD3's final norm, SD3's last text-stream
norm) emits (scale, shift) where the native layout has (shift, scale): its rows are swapped.

What each trained tensor becomes (ComfyUI's patch types):
- a bias: `<module>.diff_b` = merged bias - base bias, where the merged bias is gamma * b' on a projection
  with gamma (b' the trained bias);
- a norm scale: `<tensor>.diff` = trained - base. PixArt's modulation tables (`scale_shift_table`, per block
  and final) cannot be written: ComfyUI's ModelPatcher patches only tensors of leaf modules, and the tables
  belong to the blocks themselves, so ComfyUI would load such a key and silently leave the table as it was.
  A PixArt adapter whose tables changed (difffit, bitfit) is refused; its LoRA adapters export;
- gamma: ComfyUI's DoRA path. A zero rank-1 `lora_up`/`lora_down` pair (no weight change) plus
  `.dora_scale` = gamma * (||W_row|| + eps), one value per output row, fp32 from the base's own weights.
  ComfyUI patches in fp32 and rescales each row by dora_scale / (||W_row|| + eps), eps =
  torch.finfo(float32).eps, which is gamma * W;
- LoRA: ordinary `lora_up`/`lora_down`/`alpha`. A LoRA on parts of a fused tensor becomes one LoRA of the
  fused tensor, rank the sum of the parts' ranks: `lora_down` stacks the parts' A, `lora_up` holds each
  part's B in its own rows and columns (zeros elsewhere), so up @ down is exactly the parts' B A stacked.

ComfyUI's strength s gives W + s * (W_merged - W) for every patched tensor (diff: W + s * diff; DoRA:
W + s * (gamma W - W)), so 0.5 is halfway between base and adapted weights: gamma halfway to 1, bias and
table deltas halved. The DoRA scale fixes the rows' norms of the base it was computed from: the file
records that base's fingerprint, and a different base (another checkpoint, a quantised copy) gets gamma
times that base's rows only approximately (docs/comfyui-and-diffusers.md measures an fp8 base).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from difffit.engine.errors import DiffFitError
from difffit.engine.io import atomic_path
from difffit.engine.methods.adapter import AdapterMeta, AdapterSwapper, expected_shapes
from difffit.engine.methods.baselines import lora_layers
from difffit.engine.models.scaled_linear import has_gamma

if TYPE_CHECKING:
    from difffit.engine.models.bases import Base

PREFIX = "diffusion_model."
METADATA_KEY = "difffit.comfyui"  # not "difffit": that key marks an adapter file
EPS = torch.finfo(torch.float32).eps  # what ComfyUI adds to each row norm: it patches weights in float32
SUFFIX = ".safetensors"


@dataclass(frozen=True)
class Native:
    """One tensor (or Linear) of the native layout and the diffusers ones it is made of, stacked along dim 0."""

    name: str  # a Linear's module name, or a parameter's name
    parts: tuple[str, ...]  # diffusers module (or parameter) names, in the native row order
    linear: bool = True
    patched: bool = True  # False: ComfyUI loads a patch of it but never applies it (a non-leaf module's tensor)


# Native name -> diffusers names inside one block (Linears), and single tensors (norm scales, tables).
FLUX_JOINT = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.proj": ("attn.to_add_out",),
    "img_mod.lin": ("norm1.linear",),
    "txt_mod.lin": ("norm1_context.linear",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
}
FLUX_JOINT_TENSORS = {
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
}
FLUX_SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation.lin": ("norm.linear",),
}
FLUX_SINGLE_TENSORS = {"norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"}
FLUX_TOP = {
    "img_in": ("x_embedder",),
    "txt_in": ("context_embedder",),
    "time_in.in_layer": ("time_text_embed.timestep_embedder.linear_1",),
    "time_in.out_layer": ("time_text_embed.timestep_embedder.linear_2",),
    "guidance_in.in_layer": ("time_text_embed.guidance_embedder.linear_1",),
    "guidance_in.out_layer": ("time_text_embed.guidance_embedder.linear_2",),
    "vector_in.in_layer": ("time_text_embed.text_embedder.linear_1",),
    "vector_in.out_layer": ("time_text_embed.text_embedder.linear_2",),
    "final_layer.adaLN_modulation.1": ("norm_out.linear",),
    "final_layer.linear": ("proj_out",),
}

SD3_JOINT = {
    "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
    "x_block.attn.proj": ("attn.to_out.0",),
    "context_block.attn.proj": ("attn.to_add_out",),
    "x_block.attn2.proj": ("attn2.to_out.0",),
    "x_block.adaLN_modulation.1": ("norm1.linear",),
    "context_block.adaLN_modulation.1": ("norm1_context.linear",),
    "x_block.mlp.fc1": ("ff.net.0.proj",),
    "x_block.mlp.fc2": ("ff.net.2",),
    "context_block.mlp.fc1": ("ff_context.net.0.proj",),
    "context_block.mlp.fc2": ("ff_context.net.2",),
}
SD3_JOINT_TENSORS = {
    "x_block.attn.ln_q.weight": "attn.norm_q.weight",
    "x_block.attn.ln_k.weight": "attn.norm_k.weight",
    "context_block.attn.ln_q.weight": "attn.norm_added_q.weight",
    "context_block.attn.ln_k.weight": "attn.norm_added_k.weight",
    "x_block.attn2.ln_q.weight": "attn2.norm_q.weight",
    "x_block.attn2.ln_k.weight": "attn2.norm_k.weight",
}
SD3_TOP = {
    "x_embedder.proj": ("pos_embed.proj",),
    "context_embedder": ("context_embedder",),
    "t_embedder.mlp.0": ("time_text_embed.timestep_embedder.linear_1",),
    "t_embedder.mlp.2": ("time_text_embed.timestep_embedder.linear_2",),
    "y_embedder.mlp.0": ("time_text_embed.text_embedder.linear_1",),
    "y_embedder.mlp.2": ("time_text_embed.text_embedder.linear_2",),
    "final_layer.adaLN_modulation.1": ("norm_out.linear",),
    "final_layer.linear": ("proj_out",),
}

PIXART_BLOCK = {
    "attn.qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"),
    "attn.proj": ("attn1.to_out.0",),
    "cross_attn.q_linear": ("attn2.to_q",),
    "cross_attn.kv_linear": ("attn2.to_k", "attn2.to_v"),
    "cross_attn.proj": ("attn2.to_out.0",),
    "mlp.fc1": ("ff.net.0.proj",),
    "mlp.fc2": ("ff.net.2",),
}
PIXART_BLOCK_TENSORS = {"scale_shift_table": "scale_shift_table"}
PIXART_TOP = {
    "x_embedder.proj": ("pos_embed.proj",),
    "t_block.1": ("adaln_single.linear",),
    "t_embedder.mlp.0": ("adaln_single.emb.timestep_embedder.linear_1",),
    "t_embedder.mlp.2": ("adaln_single.emb.timestep_embedder.linear_2",),
    "csize_embedder.mlp.0": ("adaln_single.emb.resolution_embedder.linear_1",),
    "csize_embedder.mlp.2": ("adaln_single.emb.resolution_embedder.linear_2",),
    "ar_embedder.mlp.0": ("adaln_single.emb.aspect_ratio_embedder.linear_1",),
    "ar_embedder.mlp.2": ("adaln_single.emb.aspect_ratio_embedder.linear_2",),
    "y_embedder.y_proj.fc1": ("caption_projection.linear_1",),
    "y_embedder.y_proj.fc2": ("caption_projection.linear_2",),
    "final_layer.linear": ("proj_out",),
}
PIXART_TOP_TENSORS = {"final_layer.scale_shift_table": "scale_shift_table"}

# family -> (top-level Linears, top-level tensors, [(diffusers block list, native block list, Linears, tensors)])
UNPATCHED = {"pixart"}  # families whose native tensors outside Linears ComfyUI never patches (see the docstring)
LAYOUTS = {
    "flux": (
        FLUX_TOP,
        {},
        [
            ("transformer_blocks", "double_blocks", FLUX_JOINT, FLUX_JOINT_TENSORS),
            ("single_transformer_blocks", "single_blocks", FLUX_SINGLE, FLUX_SINGLE_TENSORS),
        ],
    ),
    "sd3": (SD3_TOP, {}, [("transformer_blocks", "joint_blocks", SD3_JOINT, SD3_JOINT_TENSORS)]),
    "pixart": (PIXART_TOP, PIXART_TOP_TENSORS, [("transformer_blocks", "blocks", PIXART_BLOCK, PIXART_BLOCK_TENSORS)]),
}


def native_layout(family: str, model: nn.Module) -> list[Native]:
    """Every native tensor of `model` (a diffusers transformer of `family`) that difffit can write, with the
    diffusers names it is made of; entries whose parts the model lacks (SD3's second attention outside its
    dual-attention blocks, its last block's text outputs, FLUX.1-schnell's guidance embedder) are left out."""
    top, top_tensors, block_lists = LAYOUTS[family]
    patched = family not in UNPATCHED
    entries = [Native(n, parts) for n, parts in top.items()]
    entries += [Native(n, (part,), linear=False, patched=patched) for n, part in top_tensors.items()]
    for diffusers_list, native_list, linears, tensors in block_lists:
        for i in range(len(getattr(model, diffusers_list))):
            src, dst = f"{diffusers_list}.{i}.", f"{native_list}.{i}."
            entries += [Native(dst + n, tuple(src + p for p in parts)) for n, parts in linears.items()]
            entries += [Native(dst + n, (src + part,), linear=False, patched=patched) for n, part in tensors.items()]
    present = {name for name, _ in model.named_modules()} | {name for name, _ in model.named_parameters()}
    return [e for e in entries if all(p in present for p in e.parts)]


def swaps_halves(model: nn.Module, linear: str) -> bool:
    """diffusers' AdaLayerNormContinuous projects to (scale, shift); the native layouts hold (shift, scale)."""
    owner = model.get_submodule(linear.rpartition(".")[0])
    return type(owner).__name__ == "AdaLayerNormContinuous"


def _stack(parts: list[torch.Tensor], swap: bool) -> torch.Tensor:
    out = torch.cat(parts)
    if swap:
        first, second = out.chunk(2)
        out = torch.cat([second, first])
    return out.contiguous()


def _plain(module: nn.Module) -> nn.Module:
    """The Linear under a peft LoRA layer (the module itself otherwise)."""
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


@torch.no_grad()
def comfyui_tensors(
    model: nn.Module,
    base_state: dict[str, torch.Tensor],
    trained: set[str],
    family: str,
    lora_dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """The ComfyUI file's tensors for `model` (its base with the adapter applied, gamma and LoRA unfolded);
    `base_state`: the base's own tensors by diffusers name; `trained`: the adapter's tensor names."""
    lora = dict(lora_layers(model))
    out, used = {}, set()
    for entry in native_layout(family, model):
        key = PREFIX + entry.name
        if not entry.linear:
            (part,) = entry.parts
            if part in trained:
                delta = (model.get_parameter(part).float() - base_state[part].float()).contiguous()
                if delta.any() and not entry.patched:
                    raise DiffFitError(
                        f"ComfyUI does not apply changes to {part} (its loader patches only the "
                        "tensors of leaf layers), and this adapter changed it.",
                        hint="Use difffit merge with --format diffusers instead.",
                    )
                if entry.patched:
                    stem = key.removesuffix(".weight")  # ComfyUI names a tensor by its module where it is a weight
                    out[stem + ".diff"] = delta
                used.add(part)
            continue
        modules = [model.get_submodule(p) for p in entry.parts]
        swap = swaps_halves(model, entry.parts[0])
        gammas = [_plain(m).gamma_.float() if has_gamma(_plain(m)) else None for m in modules]
        scaled = any(g is not None for g in gammas)
        factors = [1.0 if g is None else g for g in gammas]
        used |= {f"{p}.gamma_" for p, g in zip(entry.parts, gammas, strict=True) if g is not None}
        if scaled or any(f"{p}.bias" in trained for p in entry.parts):
            out[key + ".diff_b"] = _stack(
                [
                    _plain(m).bias.float() * f - base_state[f"{p}.bias"].float()
                    for m, f, p in zip(modules, factors, entry.parts, strict=True)
                ],
                swap,
            )
            used |= {f"{p}.bias" for p in entry.parts}
        if scaled and any(p in lora for p in entry.parts):  # one up/down pair per layer: DoRA's or LoRA's
            raise DiffFitError(
                f"{entry.parts[0]} holds both gamma and LoRA, which one ComfyUI file cannot express.",
                hint="Use difffit merge with --format diffusers instead.",
            )
        if scaled:
            out.update(_dora(key, entry.parts, factors, base_state, swap))
        if any(p in lora for p in entry.parts):
            out.update(_lora(key, [lora.get(p) for p in entry.parts], modules, swap, lora_dtype))
            used |= {f"{p}.lora_{ab}.default.weight" for p in entry.parts if p in lora for ab in "AB"}
    if missed := sorted(trained - used):
        raise DiffFitError(
            f"The adapter trains {missed[0]}, which has no place in ComfyUI's {family} layout.",
            hint="Merge with --format diffusers instead.",
        )
    return out


def _dora(key: str, parts: tuple[str, ...], gammas: list, base_state: dict, swap: bool) -> dict[str, torch.Tensor]:
    """gamma through ComfyUI's DoRA path: a zero rank-1 pair and dora_scale = gamma * (row norm of W + eps);
    `gammas`: each part's gamma (1.0 for a part without)."""
    weights = [base_state[f"{p}.weight"].float() for p in parts]
    norms = [w.reshape(w.shape[0], -1).norm(dim=1) + EPS for w in weights]
    scale = [n * g for n, g in zip(norms, gammas, strict=True)]
    rows, inputs = sum(w.shape[0] for w in weights), weights[0].shape[1]
    return {
        key + ".dora_scale": _stack(scale, swap)[:, None],  # (rows, 1): ComfyUI's per-output-row shape
        key + ".lora_up.weight": torch.zeros(rows, 1, dtype=torch.float16),
        key + ".lora_down.weight": torch.zeros(1, inputs, dtype=torch.float16),
    }


def _lora(key: str, layers: list, modules: list[nn.Module], swap: bool, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The parts' LoRA as one LoRA of the fused tensor: down = the A's stacked, up = each B in its own rows
    and columns; alpha = scaling * rank, since ComfyUI multiplies by alpha / rank."""
    scalings = {layer.scaling["default"] for layer in layers if layer is not None}
    common = max(scalings)
    downs, ups = [], []
    for layer, module in zip(layers, modules, strict=True):
        rows = _plain(module).out_features
        if layer is None:
            ups.append((torch.zeros(rows, 0), rows))
            continue
        downs.append(layer.lora_A["default"].weight.float())
        ups.append((layer.lora_B["default"].weight.float() * (layer.scaling["default"] / common), rows))
    rank = sum(d.shape[0] for d in downs)
    blocks, column = [], 0
    for b, rows in ups:
        block = torch.zeros(rows, rank)
        block[:, column : column + b.shape[1]] = b
        blocks.append(block)
        column += b.shape[1]
    dtype = dtype if len(scalings) == 1 else torch.float32  # one scaling: the stored factors as they are
    return {
        key + ".lora_up.weight": _stack(blocks, swap).to(dtype),
        key + ".lora_down.weight": torch.cat(downs).to(dtype).contiguous(),
        key + ".alpha": torch.tensor(common * rank, dtype=torch.float32),
    }


def comfyui_problem(meta: AdapterMeta) -> str | None:
    """Why an adapter has no exact ComfyUI file (a sentence), or None. A PixArt adapter of a method that trains
    the modulation tables is refused when its tables changed, which only writing the file finds out."""
    if meta.family not in LAYOUTS:
        title = meta.model_family.title
        return f"ComfyUI has no class-conditional {title} model, so a {title} adapter has no ComfyUI file"
    if meta.method == "full":
        return "a full adapter changes every weight, so its ComfyUI file would be the size of the model"
    return None


def comfyui_offered(meta: AdapterMeta) -> bool:
    """Whether `merge` lists (and `push` writes) a ComfyUI file for this adapter: no problem, and on PixArt no
    trained modulation table (a trained table has changed)."""
    if comfyui_problem(meta):
        return False
    tables = getattr(meta.model_family, "tables", ())
    return meta.family not in UNPATCHED or not any(name.endswith(tables) for name in expected_shapes(meta))


def check_comfyui_adapter(meta: AdapterMeta) -> None:
    """Refuse, in one sentence, what a ComfyUI LoRA file cannot hold."""
    if problem := comfyui_problem(meta):
        formats = "original or diffusers" if meta.family not in LAYOUTS else "diffusers"
        raise DiffFitError(
            problem[0].upper() + problem[1:] + ".", hint=f"Use difffit merge with --format {formats} instead."
        )


def write_comfyui(base: Base, tensors: dict[str, torch.Tensor], meta: AdapterMeta, path: Path) -> None:
    """Apply the adapter's `tensors` to `base` (a loaded, fingerprint-checked base: nothing applied yet) and
    write the ComfyUI file to `path` atomically; the base's tensors are put back afterwards."""
    from safetensors.torch import save_file

    check_comfyui_adapter(meta)
    model = base.model
    base_state = dict(model.state_dict())  # the base's own tensors (references: the swapper replaces, never writes)
    swapper = AdapterSwapper(base)
    swapper.apply(tensors, meta)
    try:
        lora_dtype = torch.float16 if meta.dtype == "fp16" else torch.float32
        state = comfyui_tensors(model, base_state, set(expected_shapes(meta)), meta.family, lora_dtype)
    finally:
        swapper.restore()
    record = {
        "base": meta.base_spec,
        "base_fingerprint": base.fingerprint,
        "family": meta.family,
        "architecture": meta.architecture,
        "method": meta.method,
        "adapter_base_fingerprint": meta.base_fingerprint,
    }
    with atomic_path(path) as tmp:
        # One metadata key: safetensors writes its metadata map in no fixed order, so one key keeps the bytes fixed.
        save_file(state, str(tmp), metadata={METADATA_KEY: json.dumps(record)})


def check_comfyui_out(out: str | Path) -> None:
    if not str(out).endswith(SUFFIX):
        raise DiffFitError(
            f"--out {out} must end in {SUFFIX}: ComfyUI lists the .safetensors files of models/loras.",
            hint=f"Write --out {Path(out).stem}{SUFFIX}.",
        )
