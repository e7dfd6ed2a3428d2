"""Shared fixtures: the golden reference vectors and tiny random models. Nothing here downloads."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

# Tests must never reach the network, and must not write into the user's caches.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFFIT_NO_DOWNLOAD", "1")

GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "golden" / "dit_reference_small.safetensors"


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
    from difffit_cli.engine.dit import DiT, DiTConfig

    model = DiT(DiTConfig(**golden["config"])).eval()
    model.load_state_dict(golden["state"])
    return model


@pytest.fixture
def seeded():
    torch.manual_seed(0)
    return 0
