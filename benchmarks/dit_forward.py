"""Forward+backward time of our DiT against diffusers' DiTTransformer2DModel on the same weights.

    python benchmarks/dit_forward.py                # CPU, DiT-S/2, latent 32, batch 8, fp32
    python benchmarks/dit_forward.py --device cuda --config DiT-XL/2 --batch 32

Prints one JSON object: median seconds per step for each, and ratio = ours / diffusers (goal <= 1.0).
Both models run in eval mode (no label dropout) with gradients on, so they do identical work;
`max_abs_diff` shows how far diffusers' numerics (timestep frequencies, norm eps) sit from ours.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def time_step(model, args: tuple, repeats: int, warmup: int, sync) -> float:
    """Median seconds of forward + backward of a mean-square loss."""
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        out = model(*args)
        out = out if isinstance(out, torch.Tensor) else out.sample
        out.square().mean().backward()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="DiT-S/2")
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()

    from diffusers import DiTTransformer2DModel

    from difffit_cli.engine.diffusers_layout import original_to_diffusers
    from difffit_cli.engine.dit import DiT, config_for

    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
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
    ours_s = time_step(ours, (x, t, y), args.repeats, args.warmup, sync)
    theirs_s = time_step(theirs, (x, t, y), args.repeats, args.warmup, sync)
    print(json.dumps({
        "benchmark": "dit_forward_backward",
        "config": config.name,
        "latent": args.latent,
        "batch": args.batch,
        "dtype": "float32",
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "ours_s": round(ours_s, 4),
        "diffusers_s": round(theirs_s, 4),
        "ratio": round(ours_s / theirs_s, 3),
        "max_abs_diff": diff,
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
