"""Shared fixtures: the golden reference vectors and tiny random models. Nothing here downloads."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# Tests must never reach the network, and must not write into the user's caches.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFFIT_NO_DOWNLOAD", "1")

# shared/ sits beside the checkout; DIFFFIT_GOLDEN points elsewhere (e.g. on a GPU machine).
GOLDEN = Path(
    os.environ.get(
        "DIFFFIT_GOLDEN",
        Path(__file__).resolve().parents[1].parent / "shared" / "golden" / "dit_reference_small.safetensors",
    )
)


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.getbasetemp() / "cache"
    monkeypatch.setenv("DIFFFIT_CACHE", str(cache / "difffit"))
    monkeypatch.setenv("HF_HOME", str(cache / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(cache / "torch"))


@pytest.fixture(scope="session")
def golden() -> dict:
    """Reference DiT outputs: {'config': dict, 'state': state dict, 'fwd.x': ..., ...}."""
    from safetensors import safe_open

    if not GOLDEN.exists():
        pytest.fail(f"golden vectors not found at {GOLDEN}; the test suite needs shared/ beside the checkout")
    with safe_open(str(GOLDEN), "pt") as f:
        out = {"config": json.loads(f.metadata()["config"]), "state": {}}
        for key in f.keys():
            if key.startswith("state."):
                out["state"][key[len("state."):]] = f.get_tensor(key)
            else:
                out[key] = f.get_tensor(key)
    return out


@pytest.fixture(scope="session")
def golden_model(golden):
    from difffit_cli.engine.models.dit import DiT, DiTConfig

    model = DiT(DiTConfig(**golden["config"])).eval()
    model.load_state_dict(golden["state"])
    return model


@pytest.fixture
def seeded():
    torch.manual_seed(0)
    return 0


def make_tiny_vae(seed: int = 0):
    """A 2-level diffusers AutoencoderKL: 4 latent channels, downsampling factor 2, ~44k parameters."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    ).eval()


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory) -> Path:
    """A local diffusers AutoencoderKL folder (factor 2: 16 px images <-> 8x8 latents)."""
    path = tmp_path_factory.mktemp("tiny_vae")
    make_tiny_vae().save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def _one_thread():
    # The test machine's cores are shared; one intra-op thread is many times faster under contention.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_base_file(tmp_path_factory) -> Path:
    """A 2-block DiT (width 384, MLP ratio 1, 8x8x4 latents, 10 classes) saved in the original layout.

    The reference init zeroes the adaLN and output weights, which would leave DiffFit's biases almost
    nothing to steer; small random values stand in for pre-trained weights.
    """
    from safetensors.torch import save_file

    from difffit_cli.engine.models.dit import DiT, DiTConfig

    torch.manual_seed(0)
    model = DiT(DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=384, depth=2,
                                num_heads=6, mlp_ratio=1.0, num_classes=10))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1 and ("adaLN" in name or "final_layer.linear" in name):
                p.normal_(0, 0.02)
    path = tmp_path_factory.mktemp("base") / "tiny_base.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def make_toy_data(root: Path, per_class: int = 6) -> Path:
    """Two classes of flat-coloured images with a little noise: easy to learn."""
    rng = np.random.default_rng(0)
    for cls, channel in (("blue", 2), ("red", 0)):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 30, (20, 24, 3), dtype=np.uint8)
            pixels[..., channel] = 220
            Image.fromarray(pixels).save(root / cls / f"{i}.png")
    return root


@pytest.fixture
def toy_data(tmp_path) -> Path:
    return make_toy_data(tmp_path / "data")
