"""A ComfyUI file (`difffit merge --format comfyui`) applied to an fp8 copy of its base: how far from exact?

    python benchmarks/comfyui_fp8.py                    # a scaled-down FLUX.1 (width 512, heads of 128), CPU
    python benchmarks/comfyui_fp8.py --width 1024 --layers 2

gamma reaches ComfyUI as a DoRA scale, gamma * (row norm of W + eps), computed from the base's full-precision
weights; ComfyUI divides it by the row norm of the weights it holds. On a float8_e4m3fn base those are the
rounded weights, so each row gets gamma * ||W|| / ||W_fp8|| instead of gamma, and ComfyUI rounds the patched
weight back to fp8 (stochastically). Contenders, each against the exact merged model in fp32:

- `fp8_merged`: the merged model cast to float8_e4m3fn (what fp8 costs with no adapter file at all);
- `comfyui_fp8_base`: the base cast to float8_e4m3fn in ComfyUI, the file applied by ComfyUI's own loader
  (`load_lora_for_models` + `patch_model`, its core from ../shared/comfyui or DIFFFIT_COMFYUI);
- `comfyui_fp32_base`: the same on the fp32 base (the exact case, for scale).

Reported: the relative error (Frobenius, over every weight the file's gamma patches) of the patched weights, and
of the transformer's output on random latents and text (diffusers' FluxTransformer2DModel fed the weights);
`dora_row_factor`: how far (||W|| + eps) / (||W_fp8|| + eps), the factor the fp8 base's rows get on top of
gamma, is from 1 (RMS and largest over those rows): the part of the error due to the scale having been
computed on the full-precision weights, the rest being fp8 rounding (twice: the base's, then ComfyUI's
stochastic rounding of the patched weight).
The adapter is a DiffFit adapter with every trained tensor moved by `--perturb` times a normal draw.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from _timing import emit, environment

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from comfyui_harness import apply_file, comfy_patcher, native_state, to_diffusers  # noqa: E402
from t2i_fixtures import FLOW_TEXT_WIDTH, make_tiny_flux  # noqa: E402

from difffit.engine.methods.adapter import make_meta, save_adapter  # noqa: E402
from difffit.engine.methods.merge import merge_adapter  # noqa: E402
from difffit.engine.methods.sources import load_source  # noqa: E402
from difffit.engine.methods.trainable import prepare_model, trainable_parameters  # noqa: E402
from difffit.engine.models.families import FLUX, load_base  # noqa: E402

FP8 = torch.float8_e4m3fn


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def weights_error(got: dict, want: dict, keys: list[str]) -> float:
    return (sum((got[k] - want[k]).pow(2).sum() for k in keys) / sum(want[k].pow(2).sum() for k in keys)).sqrt().item()


def row_factor(weight: torch.Tensor) -> torch.Tensor:
    """(||W_row|| + eps) / (||fp8(W)_row|| + eps): what ComfyUI's DoRA rescaling multiplies gamma by on an fp8 base."""
    eps = torch.finfo(torch.float32).eps
    return (weight.norm(dim=1) + eps) / (weight.to(FP8).float().norm(dim=1) + eps)


def output(model, state: dict, seed: int = 0) -> torch.Tensor:
    """The FLUX transformer's velocity on random latents and text, holding `state` (diffusers names)."""
    model.load_state_dict(state, strict=False)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 16, 16, generator=g)
    text = {
        "prompt_embeds": torch.randn(2, 8, FLOW_TEXT_WIDTH, generator=g),
        "pooled_prompt_embeds": torch.randn(2, 16, generator=g),
    }
    with torch.no_grad():
        return FLUX.forward(model, None)(x, torch.tensor([300.0, 800.0]), text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=512, help="transformer width (heads of 128, as FLUX.1's)")
    parser.add_argument("--layers", type=int, default=2, help="joint blocks, and as many single blocks")
    parser.add_argument("--perturb", type=float, default=0.05, help="std of the trained tensors' change")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = make_tiny_flux(
            tmp / "pipe",
            layers=args.layers,
            attention_head_dim=128,
            num_attention_heads=args.width // 128,
            axes_dims_rope=(16, 56, 56),
        )
        base = load_base(str(folder))
        before = {n: p.detach().clone() for n, p in base.model.named_parameters()}
        prepare_model(base.model, "difffit")
        with torch.no_grad():
            for p in trainable_parameters(base.model).values():
                p.add_(torch.randn_like(p) * args.perturb)
        save_adapter(tmp / "adapter.safetensors", base.model, before, make_meta(base, base.model, "difffit"), "fp32")
        merge_adapter(str(tmp / "adapter.safetensors"), tmp / "style.safetensors", fmt="comfyui")
        from safetensors.torch import load_file

        lora = load_file(tmp / "style.safetensors")
        merged_model, meta = load_source(str(tmp / "adapter.safetensors"))
        FLUX.fold_gamma(merged_model.model)
        merged = {k: v.float().clone() for k, v in merged_model.model.state_dict().items()}
        base_model = load_base(str(folder)).model
        base_state = {k: v.float().clone() for k, v in base_model.state_dict().items()}  # output() loads into it
        exact_native = native_state("flux", merged)
        exact_native_base = native_state("flux", base_state)
        patched_keys = sorted(
            {
                k.removeprefix("diffusion_model.").rsplit(".", 1)[0] + ".weight"
                for k in lora
                if k.endswith(".dora_scale")
            }
        )
        results = {}
        for name, dtype in (("comfyui_fp32_base", torch.float32), ("comfyui_fp8_base", FP8)):
            weights, not_loaded = apply_file(comfy_patcher("flux", base_model, base_state, dtype), lora, 1.0)
            assert not not_loaded, not_loaded
            results[name] = {
                "weights": weights_error(weights, exact_native, patched_keys),
                "output": to_diffusers("flux", weights, base_model),
            }
        fp8_merged = {k: v.to(FP8).float() for k, v in exact_native.items()}
        results["fp8_merged"] = {
            "weights": weights_error(fp8_merged, exact_native, patched_keys),
            "output": to_diffusers("flux", fp8_merged, base_model),
        }
        factor = torch.cat([row_factor(exact_native_base[k]) for k in patched_keys])
        exact_out = output(base_model, merged)
        base_out = output(base_model, base_state)
        for result in results.values():
            result["output"] = relative(output(base_model, result["output"]), exact_out)
    emit(
        {
            "benchmark": "comfyui_fp8",
            "model": f"FLUX-d{args.layers}+{args.layers}-w{args.width}",
            "perturb": args.perturb,
            "gamma_weights": len(patched_keys),
            "adapter_effect_on_output": relative(base_out, exact_out),
            "dora_row_factor": {
                "rms": (factor - 1).pow(2).mean().sqrt().item(),
                "max": (factor - 1).abs().max().item(),
            },
            "relative_error": {
                name: {"patched_weights": r["weights"], "transformer_output": r["output"]}
                for name, r in results.items()
            },
            "env": environment("cpu"),
        }
    )


if __name__ == "__main__":
    main()
