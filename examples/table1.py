"""The DiffFit paper's Table 1 in one script: every fine-tuning method on one dataset, one budget.

Each method is trained with `engine.training.train.fit` (same data, steps, batch and seed; each method's own
default learning rate unless --lr is given) in a fresh process, so the peak memory is that method's
own; then its adapter is evaluated with `engine.evaluation.metrics.evaluate` (what `difffit eval-fid ADAPTER
DATA -n N` runs: sample N images from the adapter, FID against the training images).

    python examples/table1.py                    # bundled tiny base, examples/target, shared 2-core CPU: ~9 minutes
    python examples/table1.py --base DiT-XL/2-256 --data ./food-101 --steps 24000 --batch-size 32 \\
        --fid-samples 10000 --sample-steps 250 --inception-weights pt_inception-2015-12-05.pth

Writes OUT/table1.md and OUT/table1.json (and OUT/<method>/ run folders). Without
--inception-weights the FID network has random weights (the real ones are not available offline):
such FIDs only show that the pipeline runs end to end, they rank nothing. On the tiny base the
whole table shows the pipeline, not the paper's ranking.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from difffit.engine.evaluation.metrics import evaluate
from difffit.engine.evaluation.sample import SamplingOptions
from difffit.engine.methods.sources import describe_adapter
from difffit.engine.methods.trainable import METHODS
from difffit.engine.training.config import FitConfig
from difffit.engine.training.train import fit

REPO = Path(__file__).resolve().parents[1]
COLUMNS = (
    "method",
    "trainable_params",
    "trainable_percent",
    "adapter_bytes",
    "img_per_s",
    "peak_memory_mb",
    "final_loss",
    "fid",
)


def run_method(method: str, args: argparse.Namespace, weights: str) -> dict:
    """Train and evaluate one method (in its own process: ru_maxrss is then this method's peak)."""
    torch.set_num_threads(args.threads)
    out = Path(args.out) / method
    result = fit(
        FitConfig(
            data=args.data,
            base=args.base,
            method=method,
            out=str(out),
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=0,
            save_every=0,
            sample_every=0,
            device=args.device,
            num_workers=0,
        ),
        progress=False,
    )
    if torch.cuda.is_available() and args.device != "cpu":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:  # Linux reports ru_maxrss in KiB: the whole process (Python, torch, data), not only tensors
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    losses = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
    tail = losses[-max(1, len(losses) // 10) :]
    info = describe_adapter(result.adapter)
    fid = evaluate(
        str(result.adapter),
        args.data,
        num_samples=args.fid_samples,
        inception_weights=weights,
        device=args.device,
        progress=False,
        sampling=SamplingOptions(scheduler="ddim", steps=args.sample_steps, cfg_scale=args.cfg_scale, seed=0),
    ).metrics["fid"]
    return {
        "method": method,
        "settings": info["settings"],
        "trainable_params": info["trainable_params"],
        "trainable_percent": round(info["trainable_percent"], 4),
        "adapter_bytes": info["file_bytes"],
        "img_per_s": result.img_per_s,
        "peak_memory_mb": round(peak, 1),
        "final_loss": round(sum(tail) / len(tail), 4),  # mean over the last 10% of steps (one step is noisy)
        "fid": round(fid, 2),
        "lr": FitConfig(method=method, lr=args.lr).learning_rate(),
    }


def markdown(rows: list[dict], note: str) -> str:
    head = [
        "method",
        "trainable params",
        "% of model",
        "adapter bytes",
        "train img/s",
        "peak memory (MB)",
        "final loss",
        "FID",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [
            row["method"],
            f"{row['trainable_params']:,}",
            f"{row['trainable_percent']:.2f}",
            f"{row['adapter_bytes']:,}",
            f"{row['img_per_s']:.0f}",
            f"{row['peak_memory_mb']:.0f}",
            f"{row['final_loss']:.4f}",
            f"{row['fid']:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\n{note}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="tiny")
    parser.add_argument("--data", default=str(REPO / "examples" / "target"))
    parser.add_argument("--out", default="runs/table1")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=None, help="default: each method's own (1e-4 full, else 1e-3)")
    parser.add_argument("--fid-samples", type=int, default=64)
    parser.add_argument("--sample-steps", type=int, default=25, help="DDIM steps per FID sample")
    parser.add_argument("--cfg-scale", type=float, default=1.5, help="the paper's FID guidance scale")
    parser.add_argument(
        "--inception-weights", default="random", help="default: random weights (FIDs then mean nothing)"
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: fastest on a shared CPU)")
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    weights = args.inception_weights
    note = (
        f"Budget: {args.steps} steps x batch {args.batch_size} per method on {args.base} / "
        f"{os.path.relpath(args.data)}, seed 0; "
        f"FID from {args.fid_samples} samples (DDIM {args.sample_steps} steps, cfg {args.cfg_scale}) against "
        "the training images."
    )
    if weights == "random":
        note += (
            " FID used RANDOM Inception weights (the real ones are not available offline): these FIDs only "
            "show that the pipeline runs, they do not rank the methods."
        )
    rows, start = [], time.perf_counter()
    # One fresh process per method (spawn: no state shared with this one), so peak memory is per method.
    context = multiprocessing.get_context("spawn")
    for method in METHODS:
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            row = pool.submit(run_method, method, args, weights).result()
        rows.append(row)
        print(
            f"{method:<20} {row['trainable_params']:>10,} params  loss {row['final_loss']:.4f}  "
            f"FID {row['fid']:.2f}  ({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
    table = markdown(rows, note)
    (out / "table1.md").write_text(table)
    (out / "table1.json").write_text(json.dumps({"rows": rows, "note": note, "args": vars(args)}, indent=1))
    print(table)


if __name__ == "__main__":
    main()
