"""ComfyUI's real LoRA loader on tiny diffusers transformers, for tests (and benchmarks/comfyui_fp8.py).

ComfyUI's Python core sits in ../shared/comfyui (GPL-3.0, test data: never imported by the package; override
the place with DIFFFIT_COMFYUI). `comfy_patcher` builds ComfyUI's own model class (`comfy.supported_models`)
for a tiny transformer and loads its weights converted by ComfyUI's `convert_diffusers_mmdit`; `apply_file`
applies a LoRA file the way the "Load LoRA" node does (`load_lora_for_models`, then `patch_model`) and
returns the patched weights with the keys ComfyUI logged as not loaded.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

import torch

COMFYUI = Path(os.environ.get("DIFFFIT_COMFYUI", Path(__file__).resolve().parents[2] / "shared" / "comfyui"))
CLASSES = {"flux": "Flux", "sd3": "SD3", "pixart": "PixArtAlpha"}


def import_comfy():
    """ComfyUI's modules, imported on the CPU as its README in ../shared/comfyui says."""
    if str(COMFYUI) not in sys.path:
        sys.path.insert(0, str(COMFYUI))
    argv = sys.argv
    sys.argv = [argv[0], "--cpu"]  # ComfyUI reads its options from argv
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.lora
        import comfy.model_detection
        import comfy.model_management
        import comfy.model_patcher
        import comfy.sd
        import comfy.supported_models
        import comfy.utils
    finally:
        sys.argv = argv
    return comfy


@contextlib.contextmanager
def _pixart_width(comfy, width: int):
    """convert_diffusers_mmdit gives ComfyUI's PixArt table no width (it assumes PixArt-XL's 1152): give it the
    tiny model's, so the fused q/k/v offsets are the model's own."""
    table = comfy.utils.pixart_to_diffusers
    comfy.utils.pixart_to_diffusers = lambda config, output_prefix="": table(
        {**config, "hidden_size": width}, output_prefix
    )
    try:
        yield
    finally:
        comfy.utils.pixart_to_diffusers = table


def native_state(family: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers transformer state dict in ComfyUI's native layout, converted by ComfyUI itself."""
    comfy = import_comfy()
    state = {k: v.detach().clone().float() for k, v in state.items()}
    width = state["pos_embed.proj.weight"].shape[0] if family == "pixart" else 0
    with _pixart_width(comfy, width) if family == "pixart" else contextlib.nullcontext():
        return comfy.model_detection.convert_diffusers_mmdit(state, "")


def unet_config(family: str, transformer, native: dict[str, torch.Tensor]) -> dict:
    """ComfyUI's model config for the tiny transformer: what its detector reads off the weights, with the
    widths it assumes for the published models (FLUX's 3072, PixArt's 1152, ...) replaced by the tiny ones."""
    comfy = import_comfy()
    config = dict(transformer.config)
    detected = comfy.model_detection.detect_unet_config(native, "")
    width = config["num_attention_heads"] * config["attention_head_dim"]
    if family == "flux":
        return {
            **detected,
            "hidden_size": width,
            "num_heads": config["num_attention_heads"],
            "context_in_dim": config["joint_attention_dim"],
            "axes_dim": list(config["axes_dims_rope"]),
        }
    if family == "sd3":  # ComfyUI's MM-DiT is 64 * depth wide with depth heads of 64: the tiny SD3 is built so
        return detected
    return {
        **detected,
        "hidden_size": width,
        "num_heads": config["num_attention_heads"],
        "in_channels": config["in_channels"],
        "caption_channels": config["caption_channels"],
        "image_model": "pixart_alpha",
        "micro_condition": bool(config.get("use_additional_conditions")),
        "pred_sigma": config["out_channels"] == 2 * config["in_channels"],
    }


def comfy_patcher(
    family: str, transformer, state: dict[str, torch.Tensor] | None = None, dtype: torch.dtype = torch.float32
):
    """ComfyUI's ModelPatcher of its own model class for `transformer`, holding `state` (default: the
    transformer's weights) converted by ComfyUI, stored in `dtype` (float8_e4m3fn: an fp8 base)."""
    comfy = import_comfy()
    native = native_state(family, state if state is not None else transformer.state_dict())
    config = getattr(comfy.supported_models, CLASSES[family])(unet_config(family, transformer, native))
    config.set_inference_dtype(dtype, None if dtype == torch.float32 else torch.float32)
    model = config.get_model(native, "")
    model.load_model_weights({k: v.to(dtype) for k, v in native.items()}, "")
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


class _NotLoaded(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.keys: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        for marker in ("lora key not loaded: ", "NOT LOADED "):
            if message.startswith(marker):
                self.keys.append(message[len(marker) :])


def apply_file(patcher, lora: dict[str, torch.Tensor], strength: float) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Apply a LoRA state dict as ComfyUI's Load LoRA node does; (the patched diffusion model's weights, the
    keys ComfyUI logged as not loaded). The patcher itself is left unpatched."""
    comfy = import_comfy()
    handler, root = _NotLoaded(), logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(min(level, logging.WARNING) or logging.WARNING)  # ComfyUI warns on the root logger
    try:
        patched, _ = comfy.sd.load_lora_for_models(patcher, None, dict(lora), strength, 0)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    with torch.no_grad():  # as ComfyUI runs its graph (in inference mode)
        patched.patch_model()
    try:
        weights = {k: v.detach().float().clone() for k, v in patched.model.diffusion_model.state_dict().items()}
    finally:
        patched.unpatch_model()
    return weights, handler.keys


def to_diffusers(family: str, native: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """Native tensors back in `model`'s diffusers names, by difffit's layout (engine/methods/comfyui.py):
    fused tensors split by their parts' rows, (shift, scale) halves swapped back."""
    from difffit.engine.methods.comfyui import native_layout, swaps_halves

    out = {}
    for entry in native_layout(family, model):
        if not entry.linear:
            out[entry.parts[0]] = native[entry.name]
            continue
        rows = [model.get_submodule(p).weight.shape[0] for p in entry.parts]
        for suffix in ("weight", "bias"):
            tensor = native[f"{entry.name}.{suffix}"]
            if swaps_halves(model, entry.parts[0]):
                first, second = tensor.chunk(2)
                tensor = torch.cat([second, first])
            out.update({f"{p}.{suffix}": piece for p, piece in zip(entry.parts, tensor.split(rows), strict=True)})
    return out
