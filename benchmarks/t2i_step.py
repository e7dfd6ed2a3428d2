"""Is DiffFit faster than LoRA where users train? Step time and peak memory of each method on the text-to-image
transformers, against the floor no frozen-weight method can beat.

    python benchmarks/t2i_step.py                                   # flux-small, sd35-small, pixart-small, CPU
    python benchmarks/t2i_step.py --device cuda --configs pixart-alpha-512,sd35-large,flux-dev --blocks 4 \\
        --px 512 --precision bf16                                   # real widths and tokens, 4 blocks deep
    DIFFFIT_BENCH_SMALL=1 python benchmarks/t2i_step.py             # toy sizes, CPU smoke run

The configurations are benchmarks/t2i_memory.py's (the family's diffusers transformer, random weights); the
step is fit's: the method's trainable tensors as `prepare_model` sets them (LoRA: rank `--rank` on the
family's targets), frozen matrices stored bf16 under bf16 autocast with `--precision bf16`, AdamW, the mean
squared error of the output against a target of its shape. The contenders:
- `floor`: every weight frozen and one scalar trained, which scales the model's input. Its backward carries
  the gradient through every layer to the input and computes no weight gradient: no method that trains
  something in the first block and freezes the weights can step faster (DiffFit's biases, norms and gammas,
  LoRA's factors and BitFit's biases all sit in every block);
- `difffit`, `lora` (rank 16), `bitfit`, `full`.
Every contender holds its own copy of the model in this one process, and their timed steps are interleaved
over `--repeats` rounds (benchmarks/_timing.py); ratios are taken round by round against the floor. Peak
memory is measured over one more step per contender, alone: on a CPU the bytes of live tensors counted op by
op (benchmarks/_memory.py), on CUDA the allocator's peak above what was allocated before the step; both plus
the contender's own weights and optimizer state. `matmul_gflop`: the step's matrix products counted by torch's
FlopCounterMode, the same on every machine, which tells a method's extra arithmetic from a machine's noise.
`--blocks N` keeps N blocks of each stack (FLUX: N joint and 2N single blocks), so a 12B configuration's
width, heads, text and image tokens are measured on one GPU.
One JSON object on stdout.
"""

from __future__ import annotations

import argparse
import sys

import torch
from _memory import PeakMemory
from _timing import emit, environment, interleave, paired_ratio, small_mode, spread, synchronizer, timer
from t2i_memory import CONFIGS, model_inputs
from torch.utils.flop_counter import FlopCounterMode

from difffit.engine.methods.baselines import MethodSettings
from difffit.engine.methods.trainable import cast_frozen_matrices, prepare_model, trainable_parameters
from difffit.engine.models.families import FAMILIES
from difffit.engine.models.speed import make_optimizer

METHODS = ("floor", "difffit", "lora", "bitfit", "full")
GOAL_FLOOR_RATIO = 1.05  # DiffFit's step at most this times the floor's, and below LoRA's


def with_blocks(family: str, config: dict, blocks: int | None) -> dict:
    """`config` cut to `blocks` blocks per stack (FLUX: `blocks` joint and 2 x `blocks` single ones)."""
    if not blocks:
        return config
    return {**config, "num_layers": blocks, **({"num_single_layers": 2 * blocks} if family == "flux" else {})}


class Contender:
    """One method's model, optimizer and training step on one configuration."""

    def __init__(self, args, name: str, method: str, device: torch.device):
        family_name, config, self.tokens = CONFIGS[name]
        self.family_name, self.config = family_name, with_blocks(family_name, config, args.blocks)
        self.args, self.device = args, device
        self.dtype = torch.bfloat16 if args.precision == "bf16" else None
        torch.manual_seed(0)
        with torch.device(device):
            self.model = FAMILIES[family_name].empty_model(self.config)
        if method == "floor":
            self.model.requires_grad_(False)
            self.scale = torch.nn.Parameter(torch.ones((), device=device))
            params = [self.scale]
        else:
            prepare_model(self.model, method, settings=MethodSettings(rank=args.rank))
            self.scale = None
            params = list(trainable_parameters(self.model).values())
        if self.dtype is not None:
            cast_frozen_matrices(self.model, self.dtype)
        self.model.train()
        self.trainable = sum(p.numel() for p in params)
        self.optimizer = make_optimizer(params, 1e-4, device)
        self.g = torch.Generator(device).manual_seed(0)

    def step(self) -> None:
        kwargs, target = model_inputs(
            self.family_name, self.config, self.args.batch, self.args.px, self.tokens, self.device, self.g
        )
        if self.scale is not None:
            kwargs["hidden_states"] = kwargs["hidden_states"] * self.scale
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            out = self.model(**kwargs, return_dict=False)[0]
        loss = (out[:, : target.shape[1]].float() - target).square().mean()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def resident(self) -> list[torch.Tensor]:
        state = [v for s in self.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        return [
            *self.model.parameters(),
            *self.model.buffers(),
            *state,
            *([self.scale] if self.scale is not None else []),
        ]

    def matmul_gflop(self) -> float:
        """The matrix products of one step (torch's FlopCounterMode: matmuls, convolutions, attention), in
        GFLOP: what a method adds to the floor's work whatever the machine."""
        with FlopCounterMode(display=False) as flops:
            self.step()
        return round(flops.get_total_flops() / 1e9, 3)

    def peak_mib(self) -> float:
        """Peak memory of one step: own weights and optimizer state plus what the step allocates at most."""
        own = sum(t.untyped_storage().nbytes() for t in {id(t): t for t in self.resident()}.values())
        if self.device.type != "cuda":
            with PeakMemory(self.device, self.resident()) as memory:
                self.step()
            return round(memory.peak / 2**20, 3)
        torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.step()
        torch.cuda.synchronize(self.device)
        return round((own + torch.cuda.max_memory_allocated(self.device) - before) / 2**20, 3)


def measure(args, name: str) -> dict:
    """Every method on configuration `name`: step times interleaved, then each one's peak memory."""
    device = torch.device(args.device)
    methods = args.methods.split(",")
    contenders = {method: Contender(args, name, method, device) for method in methods}
    for c in contenders.values():
        c.step()  # the optimizer state exists from here on

    def steps(c: Contender):
        def run() -> None:
            for _ in range(args.steps_per_repeat):
                c.step()

        return timer(run, device)

    times = interleave({m: steps(c) for m, c in contenders.items()}, args.repeats, warmup=1)
    times = {m: [t / args.steps_per_repeat for t in ts] for m, ts in times.items()}
    synchronizer(device)()
    rows = {
        m: {
            "step_s": spread(times[m]),
            "peak_mib": c.peak_mib(),
            "matmul_gflop": c.matmul_gflop(),
            "trainable_params": c.trainable,
        }
        for m, c in contenders.items()
    }
    ratios = {}
    for method in methods:
        for base in ("floor", "lora"):
            if base in times and method != base:
                ratios[f"{method}/{base} step"] = paired_ratio(times[method], times[base])
    out = {"family": CONFIGS[name][0], "blocks": args.blocks or "all", "contenders": rows, "ratios": ratios}
    if {"difffit", "floor", "lora"} <= set(methods):
        floor_ratio, lora_ratio = ratios["difffit/floor step"]["median"], ratios["difffit/lora step"]["median"]
        out["goal"] = {
            "difffit/floor": floor_ratio,
            "difffit/lora": lora_ratio,
            "met": floor_ratio <= GOAL_FLOOR_RATIO and lora_ratio < 1,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    small = small_mode()
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--configs", default="flux-tiny,sd35-tiny,pixart-tiny" if small else "flux-small,sd35-small,pixart-small"
    )
    parser.add_argument("--blocks", type=int, default=0, help="blocks kept per stack (0: the configuration's)")
    parser.add_argument("--px", type=int, default=64 if small else 256, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=1 if small else 2)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated: {', '.join(METHODS)}")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    parser.add_argument(
        "--precision",
        default="no",
        choices=("no", "bf16"),
        help="bf16: frozen matrices stored bf16 under bf16 autocast, as fit on a GPU",
    )
    parser.add_argument("--repeats", type=int, default=2 if small else 7)
    parser.add_argument("--steps-per-repeat", type=int, default=1 if small else 2)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    unknown = sorted(set(args.methods.split(",")) - set(METHODS)) + sorted(set(args.configs.split(",")) - set(CONFIGS))
    if unknown:
        raise SystemExit(f"unknown method(s) or config(s): {', '.join(unknown)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
    for name in args.configs.split(","):
        results[name] = measure(args, name)
        print(f"{name}: {results[name].get('goal')}", file=sys.stderr, flush=True)
    emit(
        {
            "benchmark": "t2i_step",
            **environment(args.device),
            "px": args.px,
            "batch": args.batch,
            "precision": args.precision,
            "lora_rank": args.rank,
            "repeats": args.repeats,
            "steps_per_repeat": args.steps_per_repeat,
            "goal": f"difffit <= {GOAL_FLOOR_RATIO} x floor and < lora",
            "configs": results,
        }
    )


if __name__ == "__main__":
    main()
