"""The bundled tiny base and the quickstart: adaptation really happens, offline, in seconds.

The distance needs no downloaded weights: a Frechet distance between Gaussians fitted to 4x4
downsampled pixels (48 numbers per image) of the samples and of the example target images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import linalg

from difffit.engine.evaluation.sample import SamplingOptions, generate
from difffit.engine.methods.sources import load_source
from difffit.engine.models.families import load_base
from difffit.engine.training.config import FitConfig
from difffit.engine.training.train import fit

REPO = Path(__file__).resolve().parents[1]
TARGET = REPO / "examples" / "target"


def pixel_features(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, 48): 4x4 box-downsampled pixels in [0, 1]."""
    n, h, w, _ = images.shape
    small = images.reshape(n, 4, h // 4, 4, w // 4, 3).mean(axis=(2, 4)) / 255.0
    return small.reshape(n, -1)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


@pytest.fixture(scope="module")
def target_features() -> np.ndarray:
    files = sorted(TARGET.glob("*/*.png"))
    assert len(files) >= 100, "examples/target is missing: run python examples/make_examples.py"
    return pixel_features(np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]))


def test_tiny_base_is_bundled_and_offline():
    base = load_base("tiny")
    assert base.source_format == "bundled" and base.vae_spec == "identity"
    assert base.resolution == 32 and base.class_names == ["circle", "cross", "square", "triangle"]


def test_fitting_the_tiny_base_moves_samples_to_the_target_domain(tmp_path, target_features):
    config = FitConfig(
        data=str(TARGET),
        base="tiny",
        steps=150,
        batch_size=32,
        lr=3e-3,
        ema_decay=0.99,
        save_every=0,
        sample_every=0,
        num_workers=0,
        cache_dir=str(tmp_path / "cache"),
        out=str(tmp_path / "run"),
    )
    result = fit(config, progress=False)
    options = SamplingOptions(scheduler="ddim", steps=25, cfg_scale=1.5, batch_size=32)
    before = generate(load_base("tiny"), 48, options, progress=False).numpy()
    adapted, _ = load_source(str(result.adapter))
    after = generate(adapted, 48, options, progress=False).numpy()

    base_distance = frechet_distance(pixel_features(before), target_features)
    adapted_distance = frechet_distance(pixel_features(after), target_features)
    assert adapted_distance < 0.5 * base_distance, (adapted_distance, base_distance)
    # the adapter holds only the trained tensors: a small fraction of the base file
    base_bytes = (REPO / "difffit" / "assets" / "tiny.safetensors").stat().st_size
    assert Path(result.adapter).stat().st_size < 0.2 * base_bytes
