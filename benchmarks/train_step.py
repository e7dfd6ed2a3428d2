"""Training-step time and peak memory of difffit, bitfit and full fine-tuning on the same base and batch.

    python benchmarks/train_step.py                                   # CPU: DiT-S/2, latent 32, batch 8
    python benchmarks/train_step.py --device cuda --config DiT-XL/2 --batch 32 --precision bf16

One training step = the hybrid loss (forward), backward, AdamW step: what `difffit fit` does per step.
Each method runs in its own subprocess, so peak memory (CUDA: max allocated; CPU: max RSS) is that
method's alone. Prints one JSON object with per-method median step times and memory, and the ratios
difffit/full and bitfit/full (goals: step time <= 0.7 on CPU, <= 0.5 on a GPU; GPU memory <= 0.5).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from difffit_cli.engine.devices import autocast_dtype
from difffit_cli.engine.dit import config_for

METHODS = ("difffit", "bitfit", "full")


def measure(args: argparse.Namespace) -> dict:
    """Time one method (in this process)."""
    from difffit_cli.engine.diffusion import GaussianDiffusion
    from difffit_cli.engine.dit import DiT
    from difffit_cli.engine.methods import cast_frozen_matrices, prepare_model, trainable_parameters

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.manual_seed(0)
    model = DiT(config_for(args.config, input_size=args.latent, num_classes=1000))
    prepare_model(model, args.method)
    dtype = autocast_dtype(args.precision)
    if dtype is not None:  # as `difffit fit` does under mixed precision
        cast_frozen_matrices(model, dtype)
    model.to(device).train()
    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(list(params.values()), lr=1e-4, weight_decay=0.0)
    diffusion = GaussianDiffusion()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn((args.batch, 4, args.latent, args.latent), generator=g).to(device)
    noise = torch.randn(x0.shape, generator=g).to(device)
    t = torch.randint(0, 1000, (args.batch,), generator=g).to(device)
    y = torch.randint(0, 1000, (args.batch,), generator=g).to(device)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            losses = diffusion.training_losses(lambda xt, ts: model(xt, ts, y).float(), x0, t, noise)
        losses["loss"].mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = []
    for i in range(args.warmup + args.repeats):
        if cuda and i == args.warmup:
            torch.cuda.reset_peak_memory_stats()
        sync()
        start = time.perf_counter()
        step()
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    # CPU: the process's peak resident memory (Linux reports KiB).
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak = torch.cuda.max_memory_allocated() if cuda else rss
    return {"step_s": statistics.median(times), "peak_mem_mb": round(peak / 2**20, 1),
            "trainable_params": sum(p.numel() for p in params.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="DiT-S/2")
    parser.add_argument("--latent", type=int, default=32, help="latent size (256 px with the SD VAE = 32)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="no", choices=("no", "bf16", "fp16"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)  # internal: one method
    args = parser.parse_args()
    if args.method:
        print(json.dumps(measure(args)))
        return
    results = {}
    for method in METHODS:
        command = [sys.executable, __file__, *sys.argv[1:], "--method", method]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[method] = json.loads(out.strip().splitlines()[-1])
    report = {
        "config": args.config, "latent": args.latent, "batch": args.batch, "device": args.device,
        "precision": args.precision, "threads": args.threads or torch.get_num_threads(),
        "torch": torch.__version__, **results,
    }
    if args.device.startswith("cuda"):
        report["gpu"] = torch.cuda.get_device_name(0)
    forward = forward_flops(config_for(args.config, input_size=args.latent))
    peak = PEAK_BF16_FLOPS.get(report.get("gpu", "").split()[-1] if "gpu" in report else "", None)
    for method, result in results.items():
        result["img_per_s"] = round(args.batch / result["step_s"], 2)
        # Required FLOPs per image: forward + input gradients (2x forward); full adds weight gradients (3x).
        needed = (3 if method == "full" else 2) * forward
        result["tflops_per_s"] = round(needed * result["img_per_s"] / 1e12, 2)
        if peak and args.precision == "bf16":
            result["mfu"] = round(needed * result["img_per_s"] / peak, 3)
    for method in ("difffit", "bitfit"):
        mine, full = results[method], results["full"]
        report[f"{method}/full_step_time"] = round(mine["step_s"] / full["step_s"], 3)
        report[f"{method}/full_peak_mem"] = round(mine["peak_mem_mb"] / full["peak_mem_mb"], 3)
    print(json.dumps(report, indent=2))


# Dense bf16 tensor-core peak of the SXM parts, by the last word of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "HBM3": 989.4e12, "A100-SXM4-80GB": 312e12}


def forward_flops(cfg) -> float:
    """FLOPs (2 per multiply-add) of one image's forward pass; DiT-XL/2 at 256 px: ~2 x 118.6 G."""
    d, tokens = cfg.hidden_size, (cfg.input_size // cfg.patch_size) ** 2
    patch = cfg.patch_size**2
    block = tokens * (4 + 2 * cfg.mlp_ratio) * d * d + 2 * tokens * tokens * d + 6 * d * d
    embed = tokens * patch * cfg.in_channels * d + 256 * d + d * d
    final = tokens * d * patch * cfg.out_channels + 2 * d * d
    return 2.0 * (cfg.depth * block + embed + final)


if __name__ == "__main__":
    main()
