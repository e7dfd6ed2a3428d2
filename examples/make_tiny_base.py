"""Rebuild the bundled tiny base (difffit/assets/tiny.safetensors) from scratch.

The tiny base is a pixel-space DiT (identity VAE, 32x32 RGB, patch 4, 6 blocks, width 128,
4 classes) trained with difffit itself: `fit --method full` from a reference-initialised model on the
generated shapes in examples/shapes, then merged into one original-layout file.

    python examples/make_tiny_base.py            # init -> fit (recipes/tiny-base.toml) -> merge
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from difffit.engine.models.dit import DiT, DiTConfig

REPO = Path(__file__).resolve().parents[1]
INIT = REPO / "runs" / "tiny-base" / "init.safetensors"
RUN = REPO / "runs" / "tiny-base"
ASSET = REPO / "difffit" / "assets" / "tiny.safetensors"
CONFIG = DiTConfig(
    input_size=32,
    patch_size=4,
    in_channels=3,
    hidden_size=128,
    depth=6,
    num_heads=4,
    num_classes=4,
    class_dropout_prob=0.1,
)
CLASSES = ["circle", "cross", "square", "triangle"]  # the sorted folder names of examples/shapes


def write_init() -> None:
    torch.manual_seed(0)
    model = DiT(CONFIG)
    INIT.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "difffit.num_heads": str(CONFIG.num_heads),
        "difffit.vae": "identity",
        "difffit.class_names": json.dumps(CLASSES),
    }
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(INIT), metadata=metadata)


def difffit(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "difffit", *args], check=True, cwd=REPO)


def main() -> None:
    write_init()
    difffit("fit", "--recipe", str(REPO / "recipes" / "tiny-base.toml"), "--base", str(INIT), "--out", str(RUN))
    difffit("merge", str(RUN / "adapter.safetensors"), "--out", str(ASSET))
    print(f"wrote {ASSET} ({ASSET.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
