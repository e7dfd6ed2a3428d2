"""What verifying an adapter's checksum costs: `read_adapter` of the same adapter with and without one.

    python benchmarks/adapter_checksum.py                 # DiT-XL/2 shapes: difffit (fp16) and full (fp16)
    python benchmarks/adapter_checksum.py --methods difffit lora

The adapters have DiT-XL/2's exact tensor shapes for 101 classes (`expected_shapes` on the meta device: no
2.7 GB model is built) and random fp16 values, in difffit's adapter format; the two files of a method differ
only in the `checksum` field of their metadata (a file without one is what difffit wrote before, and is read
without the check). Both are read with `read_adapter` (header, tensors, shape and NaN checks, and the
checksum when there is one), alternating over the repeats (benchmarks/_timing.py), from the page cache after
the warm-up. Prints one JSON object per method: medians with min and max, the ratio with / without, and
the CRC-32 throughput (`tensors_checksum` alone, on tensors already in memory).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import torch
from _timing import emit, environment, interleave, paired_ratio, spread, timer
from safetensors.torch import save_file

from difffit.engine.methods.adapter import AdapterMeta, expected_shapes, read_adapter, tensors_checksum
from difffit.engine.models.dit import config_for


def xl_meta(method: str) -> AdapterMeta:
    """The metadata of a DiT-XL/2 adapter of `method` for 101 classes, stored as fp16 differences."""
    xl = config_for("DiT-XL/2", input_size=32)
    return AdapterMeta(
        method=method,
        gamma_blocks=list(range(14)) if method == "difffit" else [],
        base_spec="DiT-XL/2-256",
        base_fingerprint="0" * 16,
        base_config=xl.to_dict(),
        config={**xl.to_dict(), "num_classes": 101},
        vae_spec="stabilityai/sd-vae-ft-ema",
        new_class_table=True,
    )


def measure(method: str, repeats: int, folder: Path) -> dict:
    meta = xl_meta(method)
    g = torch.Generator().manual_seed(0)
    tensors = {name: torch.randn(shape, generator=g).to(torch.float16) for name, shape in expected_shapes(meta).items()}
    paths = {}
    for name, checksum in (("with_checksum", tensors_checksum(tensors)), ("without_checksum", None)):
        paths[name] = folder / f"{method}-{name}.safetensors"
        stored = dataclasses.replace(meta, checksum=checksum).to_dict()
        save_file(tensors, str(paths[name]), metadata={"difffit": json.dumps(stored)})
    times = interleave({name: timer(lambda p=path: read_adapter(p), "cpu") for name, path in paths.items()}, repeats)
    crc = interleave({"crc": timer(lambda: tensors_checksum(tensors), "cpu")}, repeats)["crc"]
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    return {
        "tensor_bytes": size,
        **{f"read_adapter_{name}_s": spread(t, 6) for name, t in times.items()},
        "with_over_without": paired_ratio(times["with_checksum"], times["without_checksum"]),
        "checksum_s": spread(crc, 6),
        "checksum_gb_per_s": round(size / 1e9 / spread(crc)["median"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["difffit", "full"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {method: measure(method, args.repeats, Path(tmp)) for method in args.methods}
    emit({**environment("cpu"), "architecture": "DiT-XL/2, 101 classes, fp16", "methods": results})


if __name__ == "__main__":
    main()
