"""What `difffit env` reports: versions, devices and cache locations."""

from __future__ import annotations

import importlib.metadata
import platform
import sys

from difffit import __version__
from difffit.engine.hub import downloads_disabled, hub_cache_dir
from difffit.engine.io import user_cache_dir


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment_report() -> dict:
    import torch

    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        devices.append("mps")
    report = {"difffit": __version__, "python": sys.version.split()[0], "platform": platform.platform()}
    for package in (
        "torch",
        "torchvision",
        "diffusers",
        "accelerate",
        "safetensors",
        "huggingface_hub",
        "torch-fidelity",
        "typer",
        "rich",
        "pillow",
    ):
        report[package] = _version(package)
    report.update(
        {
            "cuda": torch.version.cuda or "none",
            "devices": ", ".join(devices),
            "hub_cache": str(hub_cache_dir()),
            "downloads_disabled": downloads_disabled(),
            "difffit_cache": str(user_cache_dir()),
            "torch_hub_cache": torch.hub.get_dir(),
        }
    )
    return report
