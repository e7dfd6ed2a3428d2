"""PixArt training steps: DiffFit against full fine-tuning, and cached text embeddings against encoding on the fly.

    python benchmarks/pixart_train.py --device cuda                       # PixArt-α XL/2 512 px, bf16, difffit vs full
    python benchmarks/pixart_train.py --device cuda --methods difffit --text cached,encode --t5 xxl
    DIFFFIT_BENCH_SMALL=1 python benchmarks/pixart_train.py               # the same code path at toy sizes, CPU

The transformer is diffusers' PixArtTransformer2DModel with the real α 512 configuration (or a toy one)
and random weights, built on the device; the step is what `difffit fit` runs: the hybrid loss on the
base's schedule through the PixArt family's forward, backward, AdamW, frozen matrices stored bf16 under
bf16 autocast. Text: `cached` feeds stored T5 embeddings (what fit does: the encoder is freed before
training); `encode` keeps a T5 encoder (v1.1 XXL's configuration by default on CUDA, random weights)
resident and encodes the batch's captions every step, as a trainer without a cache would.

Each contender (method x text) is a worker process, so its peak memory is its own (CUDA max allocated;
CPU max RSS). Each worker first finds the largest batch of `--batches` it can step at (trying them in
order and stopping at the first out-of-memory; the workers start one after another, so a later one
probes with the earlier ones' weights and optimizer state resident); then every worker steps at the
largest batch all of them fit, the parent interleaving their timed steps round after round. One JSON
object: per contender its largest batch, the peak memory at the common batch, step time (median, min,
max), img/s; and the ratios repeat by repeat.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import sys
import time
from types import SimpleNamespace

import torch
from _timing import (
    Worker,
    emit,
    environment,
    interleave,
    paired_ratio,
    small_mode,
    spread,
    synchronizer,
    without_values,
)

from difffit.engine.models.families.pixart_bases import XL2_CONFIG

TINY = {
    **XL2_CONFIG,
    "num_layers": 2,
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "caption_channels": 64,
    "cross_attention_dim": 32,
    "sample_size": 8,
    "norm_num_groups": 4,
}
CONFIGS = {
    "alpha-512": {**XL2_CONFIG, "sample_size": 64},
    "alpha-1024": {**XL2_CONFIG, "sample_size": 128, "use_additional_conditions": True},
    # CPU-sized: 12 blocks 384 wide at 128 px, reading T5-base's 768-d text.
    "small": {
        **XL2_CONFIG,
        "num_layers": 12,
        "num_attention_heads": 6,
        "attention_head_dim": 64,
        "caption_channels": 768,
        "cross_attention_dim": 384,
        "sample_size": 16,
    },
    "tiny": TINY,
}
# T5 v1.1 encoders as PixArt uses them (XXL: 4.76B parameters, 4096 wide); `tiny` matches TINY's text width.
T5 = {
    "xxl": dict(d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64),
    "base": dict(d_model=768, d_ff=2048, num_layers=12, num_heads=12, d_kv=64),
    "tiny": dict(d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16),
}


def build(args: argparse.Namespace):
    """The model, optimizer and `step(batch)` of one contender (method, text) on args.device."""
    from difffit.engine.methods.trainable import cast_frozen_matrices, prepare_model, trainable_parameters
    from difffit.engine.models.diffusion import GaussianDiffusion
    from difffit.engine.models.families import PIXART
    from difffit.engine.models.speed import make_optimizer
    from difffit.engine.training.step import step_generator

    device, config = torch.device(args.device), CONFIGS[args.config]
    dtype = torch.bfloat16 if args.precision == "bf16" else None
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: 611M values in seconds on a GPU
        model = PIXART.empty_model(config)
        encoder = _t5(args, config["caption_channels"]) if args.text == "encode" else None
    prepare_model(model, args.method)
    if dtype is not None:
        cast_frozen_matrices(model, dtype)  # as `difffit fit` does under mixed precision
    model.train()
    params = trainable_parameters(model)
    optimizer = make_optimizer(params.values(), 1e-4, device)
    # The 1024-MS model's pixel-size micro-conditions need the VAE factor: the public pipelines' is 8.
    # PixArt's schedule: linear betas 1e-4..0.02 over 1000 steps, as DiT's.
    diffusion, forward = GaussianDiffusion(), PIXART.forward(model, SimpleNamespace(vae_factor=8))
    side, counter = config["sample_size"], itertools.count()

    def step(batch: int) -> None:
        g = step_generator(device, 0, next(counter))
        t, noise = diffusion.draw(g, batch, (4, side, side))
        x0 = torch.randn((batch, 4, side, side), device=device, generator=g)
        text = _text(encoder, batch, args.tokens, config["caption_channels"], device, g)
        try:
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                losses = diffusion.training_losses(lambda x, s: forward(x, s, text).float(), x0, t, noise)
            losses["loss"].mean().backward()
            optimizer.step()
        finally:  # also after an out-of-memory probe: no stale gradients held into the next batch
            optimizer.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in params.values())


def _t5(args: argparse.Namespace, width: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=32128, feed_forward_proj="gated-gelu", **T5[args.t5])
    if config.d_model != width:
        raise SystemExit(f"--t5 {args.t5} is {config.d_model} wide; the transformer reads {width}-d text")
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    return T5EncoderModel(config).to(dtype=dtype).eval().requires_grad_(False)


def _text(encoder, batch: int, tokens: int, width: int, device: torch.device, g: torch.Generator) -> dict:
    """A batch's text: T5 run on its token ids (`encode`), or stored embeddings (`cached`: read from the
    cache and copied to the device, as fit's batches are)."""
    mask = torch.ones((batch, tokens), dtype=torch.long, device=device)
    if encoder is None:
        embeds = torch.randn((batch, tokens, width), generator=torch.Generator().manual_seed(0)).to(device)
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask}
    ids = torch.randint(2, 32128, (batch, tokens), device=device, generator=g)
    with torch.no_grad():
        return {"prompt_embeds": encoder(ids, attention_mask=mask).last_hidden_state, "prompt_attention_mask": mask}


def peak_mb(device: torch.device) -> float:
    peak = (
        torch.cuda.max_memory_allocated(device)
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )  # Linux: KiB
    return round(peak / 2**20, 1)


def worker(args: argparse.Namespace) -> None:
    """Build, probe the batches, then serve `batch B`, `run N` and `done` requests (JSON lines on stdout)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = synchronizer(device)
    step, trainable = build(args)
    probe, largest = {}, None
    for batch in map(int, args.batches.split(",")):
        try:
            step(batch)
            sync()
            probe[batch], largest = "ok", batch
        except torch.OutOfMemoryError:
            probe[batch] = "out of memory"
            break
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(json.dumps({"largest_batch": largest, "probe": probe, "trainable_params": trainable}), flush=True)
    batch = largest
    for line in sys.stdin:
        command, _, value = line.strip().partition(" ")
        if command == "batch":  # the common batch: one warm-up step there, then measure peak memory afresh
            batch = int(value)
            step(batch)
            sync()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            print(json.dumps({"batch": batch}), flush=True)
        elif command == "run":
            n = int(value)
            sync()
            start = time.perf_counter()
            for _ in range(n):
                step(batch)
            sync()
            print(json.dumps({"s": (time.perf_counter() - start) / n}), flush=True)
        elif command == "done":
            print(json.dumps({"peak_mem_mb": peak_mb(device)}), flush=True)
            return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    small = small_mode()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--config", default="tiny" if small else "alpha-512", choices=sorted(CONFIGS))
    parser.add_argument("--methods", default="difffit,full", help="comma-separated: difffit, bitfit, lora, full")
    parser.add_argument("--text", default="cached", help="comma-separated: cached, encode")
    parser.add_argument("--t5", default="tiny" if small else "xxl", choices=sorted(T5))
    parser.add_argument("--tokens", type=int, default=8 if small else 120, help="caption tokens (α: 120)")
    parser.add_argument(
        "--batches",
        default="1,2" if small else "8,16,32,64,128,256",
        help="batches to try, ascending: the largest that every contender steps at is used",
    )
    parser.add_argument("--precision", default="no" if small else "bf16", choices=("no", "bf16"))
    parser.add_argument("--repeats", type=int, default=2 if small else 5)
    parser.add_argument("--steps-per-repeat", type=int, default=1 if small else 3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads per worker (0: torch's default)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    contenders = list(itertools.product(args.methods.split(","), args.text.split(",")))
    common = without_values(sys.argv[1:], ("--methods", "--text"))
    workers = {
        f"{method} {text}": Worker(
            __file__, [*common, "--worker", "--method", method, "--text", text], dict(os.environ)
        )
        for method, text in contenders
    }
    if any(w.ready["largest_batch"] is None for w in workers.values()):
        raise SystemExit(f"a contender fits none of --batches {args.batches}: {[w.ready for w in workers.values()]}")
    batch = min(w.ready["largest_batch"] for w in workers.values())
    for w in workers.values():
        w.ask(f"batch {batch}")
    times = interleave(
        {name: (lambda w=w: w.ask(f"run {args.steps_per_repeat}")["s"]) for name, w in workers.items()},
        args.repeats,
        warmup=0,
    )
    peaks = {name: w.ask("done")["peak_mem_mb"] for name, w in workers.items()}
    for w in workers.values():
        w.proc.wait()
    results = {
        name: {
            "largest_batch": w.ready["largest_batch"],
            "probe": w.ready["probe"],
            "trainable_params": w.ready["trainable_params"],
            "step_s": spread(times[name]),
            "img_per_s": round(batch / spread(times[name])["median"], 2),
            "peak_mem_mb": peaks[name],
        }
        for name, w in workers.items()
    }
    emit(
        {
            "benchmark": "pixart_train",
            **environment(args.device),
            "config": args.config,
            "t5": args.t5,
            "tokens": args.tokens,
            "precision": args.precision,
            "batch": batch,
            "repeats": args.repeats,
            "steps_per_repeat": args.steps_per_repeat,
            "contenders": results,
            "ratios": ratios(times, peaks),
        }
    )


def ratios(times: dict[str, list[float]], peaks: dict[str, float]) -> dict:
    """difffit/full (per text mode) and encode/cached (per method): step time repeat by repeat, peak memory."""
    out = {}
    for a, b in itertools.permutations(times, 2):
        (method_a, text_a), (method_b, text_b) = a.split(), b.split()
        if (text_a == text_b and method_b == "full" and method_a != "full") or (
            method_a == method_b and (text_a, text_b) == ("encode", "cached")
        ):
            out[f"{a} / {b} step time"] = paired_ratio(times[a], times[b])
            out[f"{a} / {b} peak memory"] = round(peaks[a] / peaks[b], 3)
    return out


if __name__ == "__main__":
    main()
