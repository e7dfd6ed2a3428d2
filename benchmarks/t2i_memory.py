"""Peak memory of one training step on the large text-to-image transformers: bf16 against fp8 frozen weights,
with and without gradient checkpointing, DiffFit against LoRA and full fine-tuning.

    python benchmarks/t2i_memory.py --device cuda --configs flux-dev --px 512          # FLUX.1-dev, random weights
    python benchmarks/t2i_memory.py --estimate --configs flux-dev,sd35-large,pixart-alpha-512
    python benchmarks/t2i_memory.py --configs flux-small,sd35-small,pixart-small       # the trend, on a CPU
    DIFFFIT_BENCH_SMALL=1 python benchmarks/t2i_memory.py                              # toy sizes, CPU smoke run

Each configuration is the family's diffusers transformer (FluxTransformer2DModel, SD3Transformer2DModel,
PixArtTransformer2DModel) with random weights, built where it runs. The step is fit's: the method's
trainable tensors as `prepare_model` sets them, fp8 through `quantize_frozen_linears` with the family's
bf16 list, the other frozen matrices stored bf16 under bf16 autocast, the family's checkpointing switch,
AdamW; the loss is the mean squared error of the model's output against a target of its shape (the
rectified-flow loss; PixArt's hybrid loss adds a few tensors of the output's size).

What is measured, said in the output as `measure`:
- on CUDA, the allocator's peak (`max_memory_allocated`, and `max_memory_reserved`, what a card's size
  limits) over the timed steps, after a warm-up step made the optimizer state; img/s over those steps;
- on a CPU, the bytes of live tensors counted op by op (benchmarks/_memory.py): the same quantity without
  the allocator's rounding; fp8 runs through `_scaled_mm` where torch has a CPU kernel, else the
  dequantizing reference matmul (`fp8_matmul`), whose transient fp32 copy of one layer adds to its peak;
- `--estimate`: that count under FakeTensorMode, where tensors have no data: the real configurations on a
  CPU without allocating them, an estimate to be checked on a GPU (no timings).
Each contender runs alone in a child process (a 12B model each: they cannot share one GPU), one after the
other, so its peak is its own; the timed steps are therefore not interleaved. An out-of-memory contender
(full fine-tuning of 12B on one GPU) is a result, not a crash. One JSON object on stdout.
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import statistics
import sys
import time
from contextlib import nullcontext

import torch
from _memory import PeakMemory
from _timing import emit, environment, small_mode, spread, synchronizer
from pixart_train import CONFIGS as PIXART_CONFIGS
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

from difffit.engine.methods.baselines import MethodSettings
from difffit.engine.methods.trainable import cast_frozen_matrices, prepare_model, trainable_parameters
from difffit.engine.models.families import FAMILIES
from difffit.engine.models.fp8 import quantize_frozen_linears
from difffit.engine.models.speed import make_optimizer

FLUX_DEV = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
SD35_LARGE = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    num_layers=38,
    attention_head_dim=64,
    num_attention_heads=38,
    joint_attention_dim=4096,
    caption_projection_dim=2432,
    pooled_projection_dim=2048,
    out_channels=16,
    pos_embed_max_size=192,
    qk_norm="rms_norm",
)
# (family, transformer config, text tokens). Text: FLUX-dev's T5 512 tokens; SD3's 77 CLIP + 256 T5; PixArt-α 120.
CONFIGS = {
    "flux-dev": ("flux", FLUX_DEV, 512),
    "sd35-large": ("sd3", SD35_LARGE, 333),
    "pixart-alpha-512": ("pixart", PIXART_CONFIGS["alpha-512"], 120),
    # CPU-sized, in the real ones' proportions (FLUX: twice as many single as joint blocks; SD3.5-large's
    # q/k RMS norms): 256 wide, reading 256-d text.
    "flux-small": (
        "flux",
        {
            **FLUX_DEV,
            "num_layers": 4,
            "num_single_layers": 8,
            "attention_head_dim": 64,
            "num_attention_heads": 4,
            "joint_attention_dim": 256,
            "pooled_projection_dim": 64,
            "axes_dims_rope": (16, 24, 24),
        },
        64,
    ),
    "sd35-small": (
        "sd3",
        {
            **SD35_LARGE,
            "num_layers": 8,
            "num_attention_heads": 4,
            "joint_attention_dim": 256,
            "caption_projection_dim": 256,
            "pooled_projection_dim": 64,
            "pos_embed_max_size": 64,
        },
        64,
    ),
    "pixart-small": ("pixart", PIXART_CONFIGS["small"], 64),
    "flux-tiny": (
        "flux",
        {
            **FLUX_DEV,
            "num_layers": 1,
            "num_single_layers": 2,
            "attention_head_dim": 16,
            "num_attention_heads": 2,
            "joint_attention_dim": 32,
            "pooled_projection_dim": 16,
            "axes_dims_rope": (4, 6, 6),
        },
        8,
    ),
    "sd35-tiny": (
        "sd3",
        {
            **SD35_LARGE,
            "num_layers": 2,
            "attention_head_dim": 16,
            "num_attention_heads": 2,
            "joint_attention_dim": 32,
            "caption_projection_dim": 32,
            "pooled_projection_dim": 16,
            "pos_embed_max_size": 16,
        },
        8,
    ),
    "pixart-tiny": ("pixart", PIXART_CONFIGS["tiny"], 8),
}
GOAL_GIB = 24  # DiffFit on FLUX.1-dev with fp8 frozen weights and checkpointing, batch 1, on a 24 GB card
# What a card needs beyond the allocator's reserved peak: the CUDA context and libraries' workspaces.
CONTEXT_GIB = 1.0


def model_inputs(
    family: str, config: dict, batch: int, px: int, tokens: int, device: torch.device, g: torch.Generator
) -> tuple[dict, torch.Tensor]:
    """The transformer's keyword arguments for one noisy batch at `px` pixels (VAE factor 8), and the
    target its output is compared with."""

    def randn(*shape):
        return torch.randn(shape, generator=g, device=device)

    side = px // 8
    if family == "flux":  # latents packed 2x2 into 64-channel tokens; rotary ids; FLUX-dev's guidance
        image = (side // 2) ** 2
        kwargs = dict(
            hidden_states=randn(batch, image, config["in_channels"]),
            encoder_hidden_states=randn(batch, tokens, config["joint_attention_dim"]),
            pooled_projections=randn(batch, config["pooled_projection_dim"]),
            timestep=torch.rand(batch, generator=g, device=device),
            img_ids=torch.zeros(image, 3, device=device),
            txt_ids=torch.zeros(tokens, 3, device=device),
            guidance=torch.full((batch,), 3.5, device=device) if config["guidance_embeds"] else None,
        )
        return kwargs, randn(batch, image, config["in_channels"])
    latents = randn(batch, config["in_channels"], side, side)
    timestep = torch.randint(0, 1000, (batch,), generator=g, device=device)
    if family == "sd3":
        kwargs = dict(
            hidden_states=latents,
            encoder_hidden_states=randn(batch, tokens, config["joint_attention_dim"]),
            pooled_projections=randn(batch, config["pooled_projection_dim"]),
            timestep=timestep,
        )
        return kwargs, randn(*latents.shape)
    kwargs = dict(
        hidden_states=latents,
        encoder_hidden_states=randn(batch, tokens, config["caption_channels"]),
        encoder_attention_mask=torch.ones(batch, tokens, device=device),
        timestep=timestep,
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    )
    return kwargs, randn(*latents.shape)


def fp8_kernel(device: torch.device, choice: str) -> bool:
    """Whether fp8 runs through `_scaled_mm` (`auto`: where it has a kernel on this device)."""
    if choice != "auto":
        return choice == "kernel"
    try:
        a = torch.zeros(16, 16, dtype=torch.float8_e4m3fn, device=device)
        one = torch.tensor(1.0, device=device)
        torch._scaled_mm(a, a.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError):
        return False
    return True


def build(args, name: str, method: str, precision: str, checkpointing: bool, device: torch.device):
    """The contender's model, optimizer and `step()`, and the tensors it holds before a step."""
    family_name, config, tokens = CONFIGS[name]
    family = FAMILIES[family_name]
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: 12B values in seconds on a GPU
        model = family.empty_model(config)
    # Under --estimate the new trainable tensors (LoRA's, gamma) are made real: peft moves its new layers with
    # `.to()`, which swaps tensors, and FakeTensorMode refuses to swap the fake ones it made.
    with unset_fake_temporarily() if args.estimate else nullcontext():
        prepare_model(model, method, settings=MethodSettings(rank=args.rank))
    if precision == "fp8":
        quantize_frozen_linears(model, keep=family.fp8_keep(), kernel=fp8_kernel(device, args.fp8_matmul))
    cast_frozen_matrices(model, torch.bfloat16)
    family.set_gradient_checkpointing(model, checkpointing)
    model.train()
    params = trainable_parameters(model)
    optimizer = make_optimizer(params.values(), 1e-4, device)
    g = torch.Generator(device).manual_seed(0)

    def step() -> None:
        kwargs, target = model_inputs(family_name, config, args.batch, args.px, tokens, device, g)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(**kwargs, return_dict=False)[0]
        loss = (out[:, : target.shape[1]].float() - target).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    resident = [*model.parameters(), *model.buffers()]
    return step, optimizer, resident, sum(p.numel() for p in params.values())


def measure(args, contender: tuple[str, str, str, bool]) -> dict:
    """Build and step one contender (in its own process): its memory and speed, or where it ran out."""
    name, method, precision, checkpointing = contender
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    phase, out = "build", {}
    try:
        fake = None
        if args.estimate:
            fake = FakeTensorMode(allow_non_fake_inputs=True)
            fake.__enter__()
        step, optimizer, resident, trainable = build(args, name, method, precision, checkpointing, device)
        out["trainable_params"] = trainable
        phase = "first step"
        step()  # the optimizer state exists from here on
        state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        phase, sync, times = "timed steps", synchronizer(device), []
        with PeakMemory(device, [*resident, *state]) as memory:
            for _ in range(1 if args.estimate else args.steps):
                sync()
                start = time.perf_counter()
                step()
                sync()
                times.append(time.perf_counter() - start)
        out |= {"status": "ok", "resident_mib": mib(memory.resident), "peak_mib": mib(memory.peak)}
        if memory.reserved is not None:
            out["peak_reserved_mib"] = mib(memory.reserved)
        if not args.estimate:
            out |= {"step_s": spread(times), "img_per_s": round(args.batch / statistics.median(times), 3)}
    except torch.OutOfMemoryError:
        out |= {"status": "out of memory", "during": phase}
        if device.type == "cuda":
            out["peak_mib"] = mib(torch.cuda.max_memory_allocated(device))
    return out


def mib(size: int) -> float:
    return round(size / 2**20, 3)


def _child(args, contender, conn) -> None:
    try:
        result = measure(args, contender)
    except Exception as e:  # one contender's failure is its result; the others still run
        result = {"status": "error", "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    conn.send(result)
    conn.close()


def warm_imports(contender: tuple[str, str, str, bool], rank: int) -> None:
    """Import in the parent what a contender's child needs (the diffusers model class, peft for LoRA), once
    for all of them: a forked child inherits the modules, so each one does not import them again."""
    name, method, _, _ = contender
    family_name, config, _ = CONFIGS[name]
    with torch.device("meta"):
        prepare_model(FAMILIES[family_name].empty_model(config), method, settings=MethodSettings(rank=rank))


def run_alone(args, contender) -> dict:
    """`measure` in a forked child: its own CUDA context and peak, and an out-of-memory one cannot
    leave fragments behind for the next. (Fork, not spawn: no re-import; the parent never touches CUDA.)"""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(args, contender, send))
    child.start()
    send.close()
    result = receive.recv() if receive.poll(args.contender_timeout) else None
    child.join(timeout=10)
    if child.is_alive():
        child.kill()
    return result or {"status": f"no result (exit code {child.exitcode})"}


def contenders(args) -> list[tuple[str, str, str, bool]]:
    """Every config x method x precision x checkpointing asked for, most wanted first (the lists' order)."""
    out = []
    for name, checkpointing, precision, method in itertools.product(
        args.configs.split(","),
        [c == "on" for c in args.checkpointing.split(",")],
        args.precision.split(","),
        args.methods.split(","),
    ):
        if name not in CONFIGS:
            raise SystemExit(f"unknown config {name}; known: {', '.join(CONFIGS)}")
        out.append((name, method, precision, checkpointing))
    return out


def skip_reason(contender: tuple[str, str, str, bool]) -> str | None:
    name, method, precision, _ = contender
    if CONFIGS[name][0] not in FAMILIES:
        return f"this difffit has no {CONFIGS[name][0]} family"
    if precision == "fp8" and method == "full":
        return "full fine-tuning trains every weight; fp8 is for frozen ones"
    return None


def contender_name(contender: tuple[str, str, str, bool], rank: int) -> str:
    name, method, precision, checkpointing = contender
    label = f"lora-r{rank}" if method == "lora" else method
    return f"{name} {label} {precision} {'ckpt' if checkpointing else 'no-ckpt'}"


def ratios(results: dict[str, dict]) -> dict[str, float]:
    """Peak memory ratios where both contenders ran: fp8 / bf16, checkpointing on / off, difffit / the others."""
    ok = {tuple(name.split()): r["peak_mib"] for name, r in results.items() if r.get("status") == "ok"}
    out = {}
    for (config, method, precision, ckpt), peak in ok.items():
        if precision == "fp8" and (other := ok.get((config, method, "bf16", ckpt))):
            out[f"{config} {method} {ckpt}: fp8/bf16 peak"] = round(peak / other, 3)
        if ckpt == "ckpt" and (other := ok.get((config, method, precision, "no-ckpt"))):
            out[f"{config} {method} {precision}: ckpt/no-ckpt peak"] = round(peak / other, 3)
        if method != "difffit" and (difffit := ok.get((config, "difffit", precision, ckpt))):
            out[f"{config} {precision} {ckpt}: difffit/{method} peak"] = round(difffit / peak, 3)
    return out


def goal(results: dict[str, dict], batch: int) -> dict | None:
    """DiffFit on FLUX.1-dev, fp8 + checkpointing, batch 1, against a 24 GB card."""
    result = results.get("flux-dev difffit fp8 ckpt")
    if batch != 1 or not result or result.get("status") != "ok":
        return None
    held = result.get("peak_reserved_mib", result["peak_mib"]) / 1024
    return {
        "contender": "flux-dev difffit fp8 ckpt",
        "peak_gib": round(held, 2),
        "limit_gib": GOAL_GIB,
        "rule": f"peak (reserved on CUDA) + {CONTEXT_GIB} GiB for the CUDA context <= {GOAL_GIB} GiB",
        "met": held + CONTEXT_GIB <= GOAL_GIB,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    small = small_mode()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--configs", default="flux-tiny,sd35-tiny,pixart-tiny" if small else "flux-dev")
    parser.add_argument("--px", type=int, default=64 if small else 512, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--methods", default="difffit,lora,full", help="comma-separated: difffit, bitfit, lora, full")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    parser.add_argument("--precision", default="bf16,fp8", help="comma-separated: bf16, fp8 (frozen weights)")
    parser.add_argument("--checkpointing", default="on,off", help="comma-separated: on, off")
    parser.add_argument(
        "--fp8-matmul",
        default="auto",
        choices=("auto", "kernel", "reference"),
        help="fp8 through _scaled_mm (kernel), dequantized (reference), or the kernel where it runs",
    )
    parser.add_argument("--estimate", action="store_true", help="count tensor bytes under FakeTensorMode (CPU)")
    parser.add_argument("--steps", type=int, default=1 if small else 3, help="timed steps after a warm-up step")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--budget", type=float, default=0, help="start no contender after this many seconds (0: none)")
    parser.add_argument("--contender-timeout", type=float, default=600, help="seconds one contender may take")
    args = parser.parse_args()
    if args.estimate and args.device != "cpu":
        raise SystemExit("--estimate counts on the CPU (FakeTensorMode); leave --device cpu")
    start, results, skipped = time.perf_counter(), {}, {}
    for contender in contenders(args):
        name = contender_name(contender, args.rank)
        if reason := skip_reason(contender):
            skipped[name] = reason
        elif args.budget and time.perf_counter() - start > args.budget:
            skipped[name] = "out of time (--budget)"
        else:
            warm_imports(contender, args.rank)
            results[name] = run_alone(args, contender)
            print(f"{name}: {results[name]}", file=sys.stderr, flush=True)
    device = torch.device(args.device)
    measure_text = (
        "estimate: live tensor bytes under FakeTensorMode"
        if args.estimate
        else "cuda max_memory_allocated / max_memory_reserved"
        if device.type == "cuda"
        else "live tensor bytes counted op by op"
    )
    emit(
        {
            "benchmark": "t2i_memory",
            **environment(device),
            "measure": measure_text,
            "fp8_matmul": "_scaled_mm" if fp8_kernel(device, args.fp8_matmul) else "dequantized reference",
            "px": args.px,
            "batch": args.batch,
            "lora_rank": args.rank,
            "timed_steps": args.steps,
            "configs": {name: CONFIGS[name][0] for name in args.configs.split(",")},
            "contenders": results,
            "skipped": skipped,
            "ratios": ratios(results),
            "goal": goal(results, args.batch),
        }
    )


if __name__ == "__main__":
    main()
