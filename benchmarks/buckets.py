"""Aspect-ratio buckets: what a bucketed PixArt step costs against a square one, eager and compiled, and
what the bucket schedule costs on the host.

    python benchmarks/buckets.py --device cuda                   # PixArt-α XL/2 at 512 px, bf16, DiffFit
    DIFFFIT_BENCH_SMALL=1 python benchmarks/buckets.py           # the same code path at toy sizes, CPU

Steps: the DiffFit step `difffit fit` runs (PixArt-α's configuration, random weights, frozen matrices in
bf16 under autocast, the hybrid loss through the family's forward, backward, AdamW) at each `--sizes`
bucket (default: 512 x 512 and two buckets of the same area, 736 x 352 and 1024 x 256), the buckets
interleaved step by step as a bucketed run alternates them. `--compile on` compiles each block as fit
does for a bucketed run (torch's automatic dynamic shapes: a static graph for the first shape, one
dynamic graph once a second comes); each size's first step (its compile included) is reported apart.
Per compile mode and size: tokens, img/s, step time (median, min, max), first-step seconds, and
img/s against the square, repeat by repeat.

Schedule: the host cost of `BucketOrder.take_batch` per step (a shuffled round of `--images` steps over
17 buckets, rebuilt once a round), and of planning `--images` image sizes into buckets.
"""

from __future__ import annotations

import argparse
import itertools
import time
from types import SimpleNamespace

import torch
from _timing import emit, environment, interleave, paired_ratio, small_mode, spread, timer
from pixart_train import CONFIGS  # the same PixArt-α 512 (and toy) configurations as the training benchmark

VAE_FACTOR = 8  # the public pipelines' VAEs


def build_step(args: argparse.Namespace, compiled: bool):
    """`step(width, height)`: one DiffFit optimizer step of args.batch images of that size (pixels)."""
    from difffit.engine.methods.trainable import cast_frozen_matrices, prepare_model, trainable_parameters
    from difffit.engine.models.diffusion import GaussianDiffusion
    from difffit.engine.models.families import PIXART
    from difffit.engine.models.speed import compile_blocks, make_optimizer
    from difffit.engine.training.step import step_generator

    device, config = torch.device(args.device), CONFIGS[args.config]
    dtype = torch.bfloat16 if args.precision == "bf16" else None
    torch.manual_seed(0)
    with torch.device(device):
        model = PIXART.empty_model(config)
    prepare_model(model, "difffit")
    if dtype is not None:
        cast_frozen_matrices(model, dtype)
    model.train()
    if compiled:
        compile_blocks(model, blocks=PIXART.block_lists[0], dynamic=None)  # as fit compiles a run of several buckets
    optimizer = make_optimizer(trainable_parameters(model).values(), 1e-4, device)
    diffusion, forward, counter = (
        GaussianDiffusion(),
        PIXART.forward(model, SimpleNamespace(vae_factor=VAE_FACTOR)),
        itertools.count(),
    )
    text = {
        "prompt_embeds": torch.randn((args.batch, args.tokens, config["caption_channels"]), device=device),
        "prompt_attention_mask": torch.ones((args.batch, args.tokens), dtype=torch.long, device=device),
    }

    def step(width: int, height: int) -> None:
        g = step_generator(device, 0, next(counter))
        shape = (4, height // VAE_FACTOR, width // VAE_FACTOR)
        t, noise = diffusion.draw(g, args.batch, shape)
        x0 = torch.randn((args.batch, *shape), device=device, generator=g)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            losses = diffusion.training_losses(lambda x, s: forward(x, s, text).float(), x0, t, noise)
        losses["loss"].mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def measure_steps(args: argparse.Namespace, compiled: bool, sizes: list[tuple[int, int]]) -> dict:
    step = build_step(args, compiled)
    first = {size: round(timer(lambda s=size: step(*s), args.device)(), 3) for size in sizes}
    runs = {size: timer(lambda s=size: [step(*s) for _ in range(args.steps_per_repeat)], args.device) for size in sizes}
    times = interleave({f"{w}x{h}": runs[(w, h)] for w, h in sizes}, args.repeats, warmup=1)
    square = f"{sizes[0][0]}x{sizes[0][1]}"
    out = {}
    for w, h in sizes:
        name = f"{w}x{h}"
        per_step = [t / args.steps_per_repeat for t in times[name]]
        out[name] = {
            "tokens": (w // VAE_FACTOR // 2) * (h // VAE_FACTOR // 2),
            "first_step_s": first[(w, h)],
            "step_s": spread(per_step),
            "img_per_s": round(args.batch / spread(per_step)["median"], 2),
            f"img_per_s_vs_{square}": paired_ratio(times[square], times[name]),
        }
    return out


def measure_schedule(images: int, batch: int) -> dict:
    from difffit.engine.data.batches import BucketOrder, Split
    from difffit.engine.data.buckets import plan_buckets

    g = torch.Generator().manual_seed(0)
    aspects = torch.exp(torch.empty(images).uniform_(-1.4, 1.4, generator=g))  # ratios from about 1:4 to 4:1
    sizes = [(round(1000 * a), 1000) for a in aspects.tolist()]
    start = time.perf_counter()
    buckets = plan_buckets(sizes, 1024, 16, batch)
    plan_s = time.perf_counter() - start
    order, split = BucketOrder([b.members for b in buckets], [0] * images, seed=0), Split(batch, 1, 0, 1)
    steps = min(order.n, 2000)
    start = time.perf_counter()
    order.take_batch(split, 0, 0)  # builds the first round
    round_s = time.perf_counter() - start
    start = time.perf_counter()
    for s in range(1, steps):
        order.take_batch(split, s, 0)
    return {
        "images": images,
        "buckets": len(buckets),
        "plan_s": round(plan_s, 3),
        "round_build_s": round(round_s, 4),
        "take_batch_us": round(1e6 * (time.perf_counter() - start) / (steps - 1), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    small = small_mode()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--config", default="tiny" if small else "alpha-512", choices=sorted(CONFIGS))
    parser.add_argument(
        "--sizes",
        default="64x64,80x48,128x32" if small else "512x512,736x352,1024x256",
        help="comma-separated WxH buckets in pixels; the first is the reference (the square)",
    )
    parser.add_argument("--batch", type=int, default=2 if small else 32)
    parser.add_argument("--tokens", type=int, default=8 if small else 120)
    parser.add_argument("--precision", default="no" if small else "bf16", choices=("no", "bf16"))
    parser.add_argument("--compile", default="off" if small else "off,on", help="comma-separated: off, on")
    parser.add_argument("--repeats", type=int, default=2 if small else 5)
    parser.add_argument("--steps-per-repeat", type=int, default=1 if small else 3)
    parser.add_argument(
        "--images", type=int, default=10_000 if small else 1_000_000, help="images of the schedule measurement"
    )
    args = parser.parse_args()
    sizes = [tuple(int(v) for v in size.split("x")) for size in args.sizes.split(",")]
    steps = {mode: measure_steps(args, mode == "on", sizes) for mode in args.compile.split(",")}
    emit(
        {
            "benchmark": "buckets",
            **environment(args.device),
            "config": args.config,
            "batch": args.batch,
            "precision": args.precision,
            "repeats": args.repeats,
            "steps_per_repeat": args.steps_per_repeat,
            "steps": steps,
            "schedule": measure_schedule(args.images, args.batch),
        }
    )


if __name__ == "__main__":
    main()
