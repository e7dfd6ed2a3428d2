"""Sampling throughput of the reference sampler: eager against compiled, bf16 against fp8, interleaved.

    python benchmarks/sample_throughput.py --device cuda --config DiT-XL/2 --latent 32 --batch 64 \
        --precision bf16,fp8 --compile off,on --steps 25
    python benchmarks/sample_throughput.py                      # CPU: DiT-S/2, latent 8, 10 steps, fp32

Each repeat runs `--steps` DDPM steps with guidance on one batch; img/s is extrapolated to
`--report-steps` (250, the FID setting) because a run's time is linear in its step count. Random
reference-initialised weights (adaLN-Zero perturbed so the work is real); the transformer and
sampler only (the VAE decode is a fixed cost per image). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import time

import torch
from _timing import emit, environment, interleave, paired_ratio, small_mode, spread, timer

from difffit.engine.devices import autocast_dtype, fp8_support
from difffit.engine.evaluation.sample import sample_denoised, sample_generators
from difffit.engine.models.dit import DiT, config_for
from difffit.engine.models.fp8 import quantize_frozen_linears
from difffit.engine.models.speed import compile_blocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    small = small_mode()
    parser.add_argument("--config", default="DiT-S/2")
    parser.add_argument("--latent", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3 if small else 10, help="DDPM steps timed per repeat")
    parser.add_argument("--report-steps", type=int, default=250, help="img/s is given for runs of this many steps")
    parser.add_argument("--cfg-scale", type=float, default=1.5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="no", help="comma-separated: no, bf16, fp16, fp8")
    parser.add_argument("--compile", default="off", help="comma-separated: off, on")
    parser.add_argument("--repeats", type=int, default=3 if small else 5)
    parser.add_argument("--fp8-anywhere", action="store_true", help="fp8 without tensor cores (CPU smoke runs)")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: 675M values init in seconds on a GPU
        base = DiT(config_for(args.config, input_size=args.latent))
    with torch.no_grad():
        for name, p in base.named_parameters():
            if name != "pos_embed" and not p.any():
                p.normal_(std=0.02)
    base.requires_grad_(False).eval()
    labels = torch.arange(args.batch, device=device) % base.config.num_classes
    contenders, skipped, compile_s = {}, {}, {}
    for precision, compile_ in itertools.product(args.precision.split(","), args.compile.split(",")):
        name = f"{precision} compile-{compile_}"
        if precision == "fp8" and not args.fp8_anywhere and (reason := fp8_support(device)):
            skipped[name] = reason
            continue
        model = copy.deepcopy(base)  # copy before compiling: deepcopy drops compiled wrappers
        if precision == "fp8":
            quantize_frozen_linears(model, kernel=device.type == "cuda")
        model.to(device)
        if compile_ == "on":
            compile_blocks(model)
        dtype = torch.bfloat16 if precision == "fp8" else autocast_dtype(precision)

        def run(model=model, dtype=dtype) -> None:
            sample_denoised(
                model,
                labels,
                sample_generators(0, range(args.batch)),
                cfg_scale=args.cfg_scale,
                scheduler="ddpm",
                steps=args.steps,
                autocast_dtype=dtype,
            )

        start = time.perf_counter()
        timer(run, device)()  # the first run: compile (if on) and kernel selection
        compile_s[name] = round(time.perf_counter() - start, 2)
        contenders[name] = timer(run, device)
    times = interleave(contenders, args.repeats, warmup=0)
    results = {}
    for name, values in times.items():
        s = spread(values)
        img_s = args.batch / (s["median"] * args.report_steps / args.steps)
        results[name] = {
            "run_s": s,
            f"img_per_s_{args.report_steps}_steps": round(img_s, 3),
            "hours_for_50k": round(50000 / img_s / 3600, 2),
            "first_run_s": compile_s[name],
        }
    names = list(times)
    ratios = {f"{a} / {b} time": paired_ratio(times[a], times[b]) for a, b in itertools.combinations(names, 2)}
    emit(
        {
            "benchmark": "sample_throughput",
            **environment(device),
            "config": args.config,
            "latent": args.latent,
            "batch": args.batch,
            "scheduler": "ddpm",
            "steps_timed": args.steps,
            "cfg_scale": args.cfg_scale,
            "repeats": args.repeats,
            "contenders": results,
            "ratios": ratios,
            "skipped": skipped,
        }
    )


if __name__ == "__main__":
    main()
