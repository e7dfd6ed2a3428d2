"""Training-step time and peak memory of every method, with and without regional compile, in bf16
and fp8, on the same base and batch; contenders interleaved over repeats.

    python benchmarks/train_step.py                                  # CPU: DiT-S/2, latent 32, batch 8, fp32
    python benchmarks/train_step.py --device cuda --config DiT-XL/2 --batch 32 --precision bf16,fp8 --compile off,on

One step = the hybrid loss (forward), backward, AdamW step, with timesteps and noise drawn on the
device and the loss summed there: what `difffit fit` does per step, with no host sync inside.
Each contender (method x precision x compile) lives in its own worker process, so its peak memory
(CUDA: max allocated; CPU: max RSS) is its own; the parent asks the workers in turn, round after
round, for `--steps-per-repeat` timed steps, and prints one JSON object: per contender the median,
min and max seconds per step, img/s, peak memory, the first step's time (with compile: the cold
compile, from an empty inductor cache for the first compiled worker), MFU on known GPUs; and the
ratios (difffit/full, compile on/off, fp8/bf16) repeat by repeat.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import sys
import tempfile
import time

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

from difffit.engine.methods.trainable import METHODS
from difffit.engine.models.dit import config_for

# Dense tensor-core peaks of the SXM parts (bf16), by a word of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}


def forward_flops(cfg) -> float:
    """FLOPs (2 per multiply-add) of one image's forward pass; DiT-XL/2 at 256 px: ~2 x 118.6 G."""
    d, tokens = cfg.hidden_size, (cfg.input_size // cfg.patch_size) ** 2
    patch = cfg.patch_size**2
    block = tokens * (4 + 2 * cfg.mlp_ratio) * d * d + 2 * tokens * tokens * d + 6 * d * d
    embed = tokens * patch * cfg.in_channels * d + 256 * d + d * d
    final = tokens * d * patch * cfg.out_channels + 2 * d * d
    return 2.0 * (cfg.depth * block + embed + final)


# -- the worker: one contender, stepping on request -------------------------------------------------


def build_step(args: argparse.Namespace):
    """The model and a `step()` closure for one contender (method, precision, compile)."""
    from difffit.engine.devices import AUTOCAST_DTYPES, require_fp8
    from difffit.engine.methods.trainable import cast_frozen_matrices, prepare_model, trainable_parameters
    from difffit.engine.models.diffusion import GaussianDiffusion
    from difffit.engine.models.dit import DiT
    from difffit.engine.models.fp8 import quantize_frozen_linears
    from difffit.engine.models.speed import compile_blocks, make_optimizer
    from difffit.engine.training.step import LossMeter, step_generator

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: 675M values init in seconds on a GPU
        model = DiT(config_for(args.config, input_size=args.latent, num_classes=1000))
    with torch.no_grad():  # adaLN-Zero init zeroes the modulation; give the blocks real work
        for name, p in model.named_parameters():
            if name != "pos_embed" and not p.any():
                p.normal_(std=0.02)
    prepare_model(model, args.method)
    fp8 = args.precision == "fp8"
    if fp8:
        if not args.fp8_anywhere:
            require_fp8(device)
        # The CPU's _scaled_mm is a slow reference loop: smoke runs take the dequantizing path.
        quantize_frozen_linears(model, kernel=device.type == "cuda")
    dtype = torch.bfloat16 if fp8 else AUTOCAST_DTYPES.get(args.precision)
    if dtype is not None:
        cast_frozen_matrices(model, dtype)  # as `difffit fit` does under mixed precision
    model.to(device).train()
    if args.compile == "on":
        compile_blocks(model)
    params = trainable_parameters(model)
    optimizer = make_optimizer(params.values(), 1e-4, device)
    diffusion = GaussianDiffusion()
    x0 = torch.randn((args.batch, 4, args.latent, args.latent), device=device)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    meter = LossMeter(device)
    counter = itertools.count()

    def step() -> None:
        g = step_generator(device, 0, next(counter))
        t, noise = diffusion.draw(g, args.batch, tuple(x0.shape[1:]))
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            losses = diffusion.training_losses(lambda xt, ts: model(xt, ts, y).float(), x0, t, noise)
        loss = losses["loss"].mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        meter.add(loss, losses["mse"].mean(), losses["vb"].mean())

    return step, sum(p.numel() for p in params.values()), meter


def worker(args: argparse.Namespace) -> None:
    """Build, take the first (cold) step, then serve `run N` / `done` requests on stdin, JSON on stdout."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = synchronizer(device)
    step, trainable, meter = build_step(args)
    start = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - start
    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    print(json.dumps({"first_step_s": first, "trainable_params": trainable}), flush=True)
    for line in sys.stdin:
        command, _, count = line.strip().partition(" ")
        if command == "run":
            n = int(count)
            sync()
            start = time.perf_counter()
            for _ in range(n):
                step()
            sync()
            print(json.dumps({"s": (time.perf_counter() - start) / n}), flush=True)
        elif command == "done":
            finite = meter.read()["finite"]
            peak = (
                torch.cuda.max_memory_allocated(device)
                if device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            )  # Linux: KiB
            print(json.dumps({"peak_mem_mb": round(peak / 2**20, 1), "loss_finite": finite}), flush=True)
            return


# -- the parent: contenders, interleaving, report -------------------------------------------------------


def contenders(args: argparse.Namespace) -> tuple[list[tuple[str, str, str]], dict[str, str]]:
    """(method, precision, compile) triples to run, and the skipped ones with the reason."""
    from difffit.engine.devices import fp8_support

    runs, skipped = [], {}
    for method, precision, compile_ in itertools.product(args.methods, args.precision, args.compile):
        name = contender_name(method, precision, compile_)
        if precision == "fp8" and method == "full":
            skipped[name] = "full fine-tuning trains every weight; fp8 is for frozen ones"
        elif precision == "fp8" and not args.fp8_anywhere and (reason := fp8_support(args.device)):
            skipped[name] = reason
        elif precision == "fp16" and args.device == "cpu":
            skipped[name] = "fp16 needs CUDA"
        else:
            runs.append((method, precision, compile_))
    return runs, skipped


def contender_name(method: str, precision: str, compile_: str) -> str:
    return f"{method} {precision} compile-{compile_}"


def ratios(times: dict[str, list[float]], peaks: dict[str, float], args: argparse.Namespace) -> dict:
    out = {}
    for precision, compile_ in itertools.product(args.precision, args.compile):
        full = contender_name("full", precision, compile_)
        for method in args.methods:
            mine = contender_name(method, precision, compile_)
            if method != "full" and mine in times and full in times:
                out[f"{method}/full step time, {precision} compile-{compile_}"] = paired_ratio(times[mine], times[full])
                out[f"{method}/full peak memory, {precision} compile-{compile_}"] = round(peaks[mine] / peaks[full], 3)
    for method, precision in itertools.product(args.methods, args.precision):
        on, off = (contender_name(method, precision, c) for c in ("on", "off"))
        if on in times and off in times:
            out[f"{method} compile on/off step time, {precision}"] = paired_ratio(times[on], times[off])
    for method, compile_ in itertools.product(args.methods, args.compile):
        fp8, bf16 = (contender_name(method, p, compile_) for p in ("fp8", "bf16"))
        if fp8 in times and bf16 in times:
            out[f"{method} fp8/bf16 step time, compile-{compile_}"] = paired_ratio(times[fp8], times[bf16])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    small = small_mode()
    parser.add_argument("--config", default="DiT-S/2")
    parser.add_argument("--latent", type=int, default=8 if small else 32, help="latent side (256 px = 32)")
    parser.add_argument("--batch", type=int, default=4 if small else 8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    parser.add_argument("--precision", default="no", help="comma-separated: no, bf16, fp16, fp8")
    parser.add_argument("--compile", default="off", help="comma-separated: off, on")
    parser.add_argument("--repeats", type=int, default=3 if small else 7)
    parser.add_argument("--steps-per-repeat", type=int, default=1 if small else 3)
    parser.add_argument("--warmup", type=int, default=1 if small else 2, help="steps after the first one")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads per worker (0: torch's default)")
    parser.add_argument(
        "--fp8-anywhere",
        action="store_true",
        help="run fp8 where _scaled_mm has no tensor cores (CPU smoke runs of the code path)",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    args.methods, args.precision, args.compile = (v.split(",") for v in (args.methods, args.precision, args.compile))
    runs, skipped = contenders(args)
    common = without_values(sys.argv[1:], ("--methods", "--precision", "--compile"))
    workers, cold_cache = {}, tempfile.mkdtemp(prefix="inductor-cold-")
    shared_cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or tempfile.mkdtemp(prefix="inductor-")
    for method, precision, compile_ in runs:  # one at a time: a compile never competes with another
        # The first compiled worker compiles from an empty cache (the cold figure); later ones share one.
        cold = compile_ == "on" and not any(c == "on" for _, _, c in workers)
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cold_cache if cold else shared_cache}
        argv = [*common, "--worker", "--method", method, "--precision", precision, "--compile", compile_]
        workers[(method, precision, compile_)] = Worker(__file__, argv, env)
    handles = {contender_name(*key): w for key, w in workers.items()}
    times = interleave(
        {name: (lambda w=w: w.ask(f"run {args.steps_per_repeat}")["s"]) for name, w in handles.items()},
        args.repeats,
        warmup=0,
    )
    finals = {name: w.ask("done") for name, w in handles.items()}
    for w in handles.values():
        w.proc.wait()

    env = environment(args.device)
    cfg = config_for(args.config, input_size=args.latent)
    forward = forward_flops(cfg)
    peak_flops = next((v for k, v in PEAK_BF16_FLOPS.items() if k in env.get("gpu", "")), None)
    results = {}
    first_compiled = next((contender_name(*k) for k in workers if k[2] == "on"), None)
    for (method, precision, compile_), w in workers.items():
        name = contender_name(method, precision, compile_)
        step = spread(times[name])
        img_s = args.batch / step["median"]
        needed = (3 if method == "full" else 2) * forward  # forward + input grads (+ weight grads for full)
        result = {
            "step_s": step,
            "img_per_s": round(img_s, 2),
            "tflops_per_s": round(needed * img_s / 1e12, 3),
            "peak_mem_mb": finals[name]["peak_mem_mb"],
            "loss_finite": finals[name]["loss_finite"],
            "first_step_s": round(w.ready["first_step_s"], 3),
            "trainable_params": w.ready["trainable_params"],
        }
        if compile_ == "on":
            result["compile_s"] = round(w.ready["first_step_s"] - step["median"], 2)
            result["compile_cache"] = "cold (empty inductor cache)" if name == first_compiled else "shared cache"
        if peak_flops and precision in ("bf16", "fp8"):
            result["mfu_of_bf16_peak"] = round(needed * img_s / peak_flops, 3)
        results[name] = result
    peaks = {name: r["peak_mem_mb"] for name, r in results.items()}
    emit(
        {
            "benchmark": "train_step",
            **env,
            "config": args.config,
            "latent": args.latent,
            "batch": args.batch,
            "repeats": args.repeats,
            "steps_per_repeat": args.steps_per_repeat,
            "threads_per_worker": args.threads or None,
            "contenders": results,
            "ratios": ratios(times, peaks, args),
            "skipped": skipped,
        }
    )


if __name__ == "__main__":
    main()
