"""Multi-GPU step time of DiffFit and full fine-tuning, modelled from one-GPU measurements plus the
gradient all-reduce (data parallel, fixed batch per GPU). See benchmarks/scaling.md for the model.

    python benchmarks/scaling.py                       # the committed H200 figures (README "Performance")
    python benchmarks/scaling.py --difffit-img-s 400 --full-img-s 300 --classes 101

Prints one JSON object: per network and GPU count the modelled step times (no overlap, and the
all-reduce hidden behind the backward pass as far as it lasts), throughputs and full/DiffFit ratios,
and where DiffFit's advantage peaks.
"""

from __future__ import annotations

import argparse
import json

from difffit.engine.methods.trainable import describe_method
from difffit.engine.models.dit import config_for

GB = 1e9
# Per-GPU one-way bandwidth (bytes/s) and per-hop latency (s). NVLink 4 (H100/H200): 900 GB/s counts
# both directions, so 450 GB/s one way; Ethernet at line rate, one NIC per GPU (DGX-style).
NETWORKS = {
    "nvlink-900GB/s": {"bandwidth": 450 * GB, "latency": 5e-6, "max_gpus": 8},
    "ethernet-400Gb/s": {"bandwidth": 400e9 / 8, "latency": 20e-6, "max_gpus": None},
    "ethernet-100Gb/s": {"bandwidth": 100e9 / 8, "latency": 20e-6, "max_gpus": None},
}
GPU_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# Share of a step's compute that is backward (an all-reduce can overlap only that): full = 2 of 3
# forward-equivalents (input + weight gradients), DiffFit = 1 of 2 (input gradients only).
BACKWARD_SHARE = {"difffit": 1 / 2, "full": 2 / 3}


def allreduce_seconds(values: int, gpus: int, bandwidth: float, latency: float, bytes_per_value: int) -> float:
    """Ring all-reduce: each GPU sends and receives 2(N-1)/N of the buffer, in 2(N-1) latency-bound hops."""
    if gpus == 1:
        return 0.0
    return 2 * (gpus - 1) / gpus * values * bytes_per_value / bandwidth + 2 * (gpus - 1) * latency


def step_seconds(compute: float, comm: float, backward_share: float, overlap: bool) -> float:
    return compute + (max(0.0, comm - backward_share * compute) if overlap else comm)


def model(args: argparse.Namespace) -> dict:
    config = config_for("DiT-XL/2", input_size=32)
    values = {
        "difffit": describe_method(config, "difffit", num_classes=args.classes)["trainable_params"],
        "full": describe_method(config, "full")["trainable_params"],
    }
    compute = {"difffit": args.batch / args.difffit_img_s, "full": args.batch / args.full_img_s}
    table, peaks = {}, {}
    for net, spec in NETWORKS.items():
        rows = []
        for n in GPU_COUNTS:
            if n > 1 and spec["max_gpus"] and n > spec["max_gpus"]:
                continue
            row = {"gpus": n}
            for overlap in (False, True):
                key = "overlap" if overlap else "no_overlap"
                times = {
                    m: step_seconds(
                        compute[m],
                        allreduce_seconds(values[m], n, spec["bandwidth"], spec["latency"], args.bytes_per_value),
                        BACKWARD_SHARE[m],
                        overlap,
                    )
                    for m in compute
                }
                row[key] = {
                    "difffit_step_s": round(times["difffit"], 5),
                    "full_step_s": round(times["full"], 5),
                    "difffit_img_s_total": round(n * args.batch / times["difffit"], 1),
                    "full_img_s_total": round(n * args.batch / times["full"], 1),
                    "full/difffit_step": round(times["full"] / times["difffit"], 3),
                }
            row["full_allreduce_s"] = round(
                allreduce_seconds(values["full"], n, spec["bandwidth"], spec["latency"], args.bytes_per_value), 5
            )
            row["difffit_allreduce_s"] = round(
                allreduce_seconds(values["difffit"], n, spec["bandwidth"], spec["latency"], args.bytes_per_value), 6
            )
            rows.append(row)
        table[net] = rows
        best = max(rows, key=lambda r: r["no_overlap"]["full/difffit_step"])
        peaks[net] = {
            "gpus": best["gpus"],
            "full/difffit_step_no_overlap": best["no_overlap"]["full/difffit_step"],
            "full/difffit_step_overlap": best["overlap"]["full/difffit_step"],
        }
    return {
        "inputs": {
            "difffit_img_s_one_gpu": args.difffit_img_s,
            "full_img_s_one_gpu": args.full_img_s,
            "batch_per_gpu": args.batch,
            "trainable_values": values,
            "classes": args.classes,
            "bytes_per_value": args.bytes_per_value,
            "networks": {
                k: {"bandwidth_GB_s": v["bandwidth"] / GB, "latency_us": v["latency"] * 1e6}
                for k, v in NETWORKS.items()
            },
        },
        "table": table,
        "peak_advantage": peaks,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--difffit-img-s", type=float, default=368.0, help="one GPU, DiT-XL/2 256 px (H200, README)")
    parser.add_argument("--full-img-s", type=float, default=282.0, help="one GPU, full fine-tuning (H200, README)")
    parser.add_argument("--batch", type=int, default=32, help="images per GPU per step")
    parser.add_argument("--classes", type=int, default=101, help="dataset classes (DiffFit's class table)")
    parser.add_argument("--bytes-per-value", type=int, default=4, help="gradient bytes (fp32 DDP: 4; bf16: 2)")
    print(json.dumps(model(parser.parse_args()), indent=1))


if __name__ == "__main__":
    main()
