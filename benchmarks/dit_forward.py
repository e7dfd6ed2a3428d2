"""Forward+backward time of our DiT against diffusers' DiTTransformer2DModel on the same weights,
interleaved over repeats.

    python benchmarks/dit_forward.py                # CPU, DiT-S/2, latent 32, batch 8, fp32
    python benchmarks/dit_forward.py --device cuda --config DiT-XL/2 --batch 32 --precision bf16 --compile on

Prints one JSON object: per model the median, min and max seconds per step, and ours/diffusers
repeat by repeat (goal <= 0.8 on the GPU). Both run in eval mode (no label dropout) with gradients
on, so they do identical work; with --compile on both are compiled block by block (same
conditions). `max_abs_diff` shows how far diffusers' numerics (timestep frequencies, norm eps) sit
from ours.
"""

from __future__ import annotations

import argparse

import torch
from _timing import emit, environment, interleave, paired_ratio, small_mode, spread, timer

from difffit.engine.devices import autocast_dtype


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    small = small_mode()
    parser.add_argument("--config", default="DiT-S/2")
    parser.add_argument("--latent", type=int, default=8 if small else 32)
    parser.add_argument("--batch", type=int, default=2 if small else 8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="no", choices=("no", "bf16", "fp16"))
    parser.add_argument("--compile", default="off", choices=("off", "on"))
    parser.add_argument("--repeats", type=int, default=3 if small else 7)
    parser.add_argument("--warmup", type=int, default=1 if small else 2)
    args = parser.parse_args()

    from diffusers import DiTTransformer2DModel

    from difffit.engine.models.diffusers_layout import original_to_diffusers
    from difffit.engine.models.dit import DiT, config_for
    from difffit.engine.models.speed import compile_blocks

    device = torch.device(args.device)
    config = config_for(args.config, input_size=args.latent, num_classes=1000)
    torch.manual_seed(0)
    ours = DiT(config)
    # Reference init zeroes the adaLN and final layers; fill them so both models compute something real.
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if name != "pos_embed" and not param.any():
                param.normal_(std=0.02)
    state, kwargs = original_to_diffusers(ours.state_dict(), config)
    theirs = DiTTransformer2DModel(**kwargs)
    theirs.load_state_dict(state, strict=True)
    ours, theirs = ours.to(device).eval(), theirs.to(device).eval()

    x = torch.randn(args.batch, config.in_channels, args.latent, args.latent, device=device)
    t = torch.randint(0, 1000, (args.batch,), device=device)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    with torch.no_grad():
        diff = (ours(x, t, y) - theirs(x, t, y).sample).abs().max().item()
    if args.compile == "on":
        compile_blocks(ours)
        compile_blocks(theirs, blocks="transformer_blocks")
    dtype = autocast_dtype(args.precision)

    def step(model) -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(x, t, y)
        out = out if isinstance(out, torch.Tensor) else out.sample
        out.float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    times = interleave(
        {"ours": timer(lambda: step(ours), device), "diffusers": timer(lambda: step(theirs), device)},
        args.repeats,
        warmup=args.warmup,
    )
    emit(
        {
            "benchmark": "dit_forward_backward",
            **environment(device),
            "config": config.name,
            "latent": args.latent,
            "batch": args.batch,
            "precision": args.precision,
            "compile": args.compile,
            "repeats": args.repeats,
            "ours_s": spread(times["ours"]),
            "diffusers_s": spread(times["diffusers"]),
            "ours/diffusers": paired_ratio(times["ours"], times["diffusers"]),
            "max_abs_diff": diff,
        }
    )


if __name__ == "__main__":
    main()
