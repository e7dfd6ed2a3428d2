"""eval-fid speed: our Inception feature extraction against torch-fidelity's own pipeline, and the
time of a repeat evaluation whose reference statistics come from the cache. Prints one JSON object.

Random Inception weights (same network, no download), so the FID values themselves mean nothing.

    python benchmarks/fid.py --num-images 200 --size 64 --device cpu
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from difffit_cli.engine import image_sets, inception, metrics
from difffit_cli.engine.devices import resolve_device
from difffit_cli.testing import random_inception_weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=200)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto")
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

        theirs = torch_fidelity_images_per_s(folder, weights, device, args.batch_size)
        ours = our_images_per_s(folder, weights, device, args.batch_size)

        def evaluate() -> float:
            start = time.perf_counter()
            metrics.evaluate(str(folder), str(folder), inception_weights=str(weights), device=str(device),
                             batch_size=args.batch_size, progress=False)
            return time.perf_counter() - start

        cold, repeat = evaluate(), evaluate()

    print(json.dumps({
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}",
        "num_images": args.num_images, "size": args.size, "batch_size": args.batch_size,
        "ours_images_per_s": round(ours, 2), "torch_fidelity_images_per_s": round(theirs, 2),
        "speedup": round(ours / theirs, 3), "goal_speedup": 1.0,
        "fid_cold_s": round(cold, 2), "fid_repeat_cached_reference_s": round(repeat, 2),
    }, indent=2))


def our_images_per_s(folder: Path, weights: Path, device: torch.device, batch_size: int) -> float:
    extractor = inception.InceptionFeatures(weights, device)
    extractor(np.zeros((2, 64, 64, 3), np.uint8))  # warm-up (kernel selection, lazy init)
    images = image_sets.FolderImages(folder)
    start = _sync(device)
    inception.extract_features(images, extractor, batch_size=batch_size, description="ours", progress=False)
    return images.count / (_sync(device) - start)


def torch_fidelity_images_per_s(folder: Path, weights: Path, device: torch.device, batch_size: int) -> float:
    """torch-fidelity's calculate_metrics path: its folder dataset, DataLoader workers, batching."""
    from torch_fidelity.utils import create_feature_extractor, extract_featuresdict_from_input_id

    cuda = device.type == "cuda"
    options = {"input1": str(folder), "cuda": cuda, "batch_size": batch_size, "verbose": False,
               "feature_extractor_weights_path": str(weights)}
    extractor = create_feature_extractor(inception.FEATURE_EXTRACTOR, ["2048"], **options)
    extractor(torch.zeros((2, 3, 64, 64), dtype=torch.uint8, device=device))
    start = _sync(device)
    features = extract_featuresdict_from_input_id(1, extractor, **options)
    return len(features["2048"]) / (_sync(device) - start)


def _sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


if __name__ == "__main__":
    main()
