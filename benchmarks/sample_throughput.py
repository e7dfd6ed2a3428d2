"""Sampling throughput of the reference sampler on one device: images/s of a full DDPM run with guidance.

    python benchmarks/sample_throughput.py --device cuda --config DiT-XL/2 --latent 32 --batch 64 --precision bf16
    python benchmarks/sample_throughput.py                      # CPU smoke run: DiT-S/2, latent 8, 10 steps

Random reference-initialised weights (adaLN-Zero perturbed so the work is real); the transformer and
sampler only (the VAE decode is a fixed cost per image, not included). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from difffit_cli.engine.devices import autocast_dtype
from difffit_cli.engine.dit import DiT, config_for
from difffit_cli.engine.sample import sample_denoised, sample_generators


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="DiT-S/2")
    parser.add_argument("--latent", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--scheduler", default="ddpm", choices=("ddpm", "ddim", "dpm-solver"))
    parser.add_argument("--cfg-scale", type=float, default=1.5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="no", choices=("no", "bf16", "fp16"))
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    model = DiT(config_for(args.config, input_size=args.latent)).to(device).eval()
    autocast = autocast_dtype(args.precision)
    labels = torch.arange(args.batch, device=device) % model.config.num_classes

    def run(steps: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        sample_denoised(model, labels, sample_generators(0, range(args.batch)), cfg_scale=args.cfg_scale,
                       scheduler=args.scheduler, steps=steps, autocast_dtype=autocast)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    run(min(5, args.steps))  # warm-up
    seconds = run(args.steps)
    report = {"config": args.config, "latent": args.latent, "batch": args.batch, "scheduler": args.scheduler,
              "steps": args.steps, "cfg_scale": args.cfg_scale, "device": str(device), "precision": args.precision,
              "seconds": round(seconds, 3), "img_per_s": round(args.batch / seconds, 3),
              "hours_for_50k": round(50000 / (args.batch / seconds) / 3600, 2)}
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(0)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
