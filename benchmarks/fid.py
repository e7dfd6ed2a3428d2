"""eval-fid speed: our Inception feature extraction against torch-fidelity's own pipeline (interleaved
over repeats: median, min, max), and the time of a repeat evaluation whose reference statistics come
from the cache. Prints one JSON object.

Random Inception weights (same network, no download), so the FID values themselves mean nothing.

    python benchmarks/fid.py --num-images 200 --size 64 --device cpu
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _timing import emit, environment, interleave, paired_ratio, small_mode, spread
from PIL import Image

from difffit.engine.devices import resolve_device
from difffit.engine.evaluation import image_sets, inception, metrics
from difffit.engine.evaluation.inception import random_inception_weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    small = small_mode()
    parser.add_argument("--num-images", type=int, default=20 if small else 200)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=2 if small else 5)
    args = parser.parse_args()
    device = resolve_device(args.device)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["DIFFFIT_CACHE"] = str(root / "cache")
        weights = random_inception_weights(root / "inception.pth")
        folder = root / "images"
        folder.mkdir()
        rng = np.random.default_rng(0)
        for i in range(args.num_images):
            image = rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
            Image.fromarray(image).save(folder / f"{i:06d}.png")

        ours, theirs = (
            our_extraction(folder, weights, device, args.batch_size),
            torch_fidelity_extraction(folder, weights, device, args.batch_size),
        )
        times = interleave({"ours": ours, "torch_fidelity": theirs}, args.repeats, warmup=0)

        def evaluate() -> float:
            start = time.perf_counter()
            metrics.evaluate(
                str(folder),
                str(folder),
                inception_weights=str(weights),
                device=str(device),
                batch_size=args.batch_size,
                progress=False,
            )
            return time.perf_counter() - start

        cold, repeat = evaluate(), evaluate()

    emit(
        {
            "benchmark": "fid_features",
            **environment(device),
            "num_images": args.num_images,
            "size": args.size,
            "batch_size": args.batch_size,
            "repeats": args.repeats,
            "ours_images_per_s": spread([args.num_images / t for t in times["ours"]], 2),
            "torch_fidelity_images_per_s": spread([args.num_images / t for t in times["torch_fidelity"]], 2),
            "speedup": paired_ratio(times["torch_fidelity"], times["ours"]),
            "goal_speedup": 1.2,
            "fid_cold_s": round(cold, 2),
            "fid_repeat_cached_reference_s": round(repeat, 2),
        }
    )


def our_extraction(folder: Path, weights: Path, device: torch.device, batch_size: int):
    """A callable: one timed pass of our extractor over the folder (built and warmed up once)."""
    extractor = inception.InceptionFeatures(weights, device)
    extractor(np.zeros((2, 64, 64, 3), np.uint8))  # warm-up (kernel selection, lazy init)

    def run() -> float:
        start = _sync(device)
        inception.extract_features(
            image_sets.FolderImages(folder), extractor, batch_size=batch_size, description="ours", progress=False
        )
        return _sync(device) - start

    return run


def torch_fidelity_extraction(folder: Path, weights: Path, device: torch.device, batch_size: int):
    """The same for torch-fidelity's calculate_metrics path: its folder dataset, DataLoader workers, batching."""
    from torch_fidelity.utils import create_feature_extractor, extract_featuresdict_from_input_id

    cuda = device.type == "cuda"
    options = {
        "input1": str(folder),
        "cuda": cuda,
        "batch_size": batch_size,
        "verbose": False,
        "feature_extractor_weights_path": str(weights),
    }
    extractor = create_feature_extractor(inception.FEATURE_EXTRACTOR, ["2048"], **options)
    extractor(torch.zeros((2, 3, 64, 64), dtype=torch.uint8, device=device))

    def run() -> float:
        start = _sync(device)
        extract_featuresdict_from_input_id(1, extractor, **options)
        return _sync(device) - start

    return run


def _sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


if __name__ == "__main__":
    main()
