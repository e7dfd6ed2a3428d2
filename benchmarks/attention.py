"""SDPA forward + backward time of flash against cuDNN attention at DiT's head dim (72), and the pick.

    python benchmarks/attention.py --device cuda          # DiT-XL/2 at 256 px: batch 32, 16 heads, 256 tokens

On the CPU there is nothing to choose (prints an empty timing table). Prints one JSON object.
"""

from __future__ import annotations

import argparse

import torch
from _timing import emit, environment

from difffit.engine.models.speed import HEAD_DIM_DIT, time_attention_backends


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    device = torch.device(args.device)
    report = {
        "benchmark": "attention_backend",
        **environment(device),
        "batch": args.batch,
        "heads": 16,
        "tokens": args.tokens,
        "head_dim": HEAD_DIM_DIT,
        "dtype": "bfloat16",
    }
    for label, batch in (("training batch", args.batch), ("guided sampling batch", 2 * args.batch)):
        timings = time_attention_backends(device, batch=batch, tokens=args.tokens, repeats=args.repeats)
        report[label] = {
            "batch": batch,
            "seconds": {k: round(v, 6) for k, v in timings.items()},
            "choice": min(timings, key=timings.get) if timings else None,
        }
    emit(report)


if __name__ == "__main__":
    main()
