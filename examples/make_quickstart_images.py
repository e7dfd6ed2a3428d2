"""The README's quickstart pictures, made from the current code: rerun it after any change that moves them.

Runs what the README's quickstart runs (`fit --recipe recipes/quickstart.toml`, then
`sample ADAPTER -n 16 --cfg-scale 2` and `sample tiny -n 16 --cfg-scale 2`) in a scratch folder, and writes
docs/quickstart-base.png, -adapted.png and -target.png (4x4 grids of the 32 px images, shown at 2x with
nearest-neighbour pixels) and docs/quickstart-loss.png (the run's loss.png). Every step is seeded, so a
rerun of unchanged code writes the same pictures. A few minutes on a quiet 2-core CPU (39 under a load
average of 5-7).

    python examples/make_quickstart_images.py
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from PIL import Image

from difffit.engine.evaluation.sample import SamplingOptions
from difffit.engine.evaluation.sample_folder import load_pngs, save_grid
from difffit.engine.methods.sources import sample_sources
from difffit.engine.training.recipes import resolve_fit_config
from difffit.engine.training.train import fit

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
SHOWN_AT = 2  # the grids are 128 px; the README shows them at 256
PER_CLASS = 8  # target picture: the first 8 images of each of its 2 classes


def publish(grid: Path, name: str) -> None:
    with Image.open(grid) as image:
        image.resize((image.width * SHOWN_AT, image.height * SHOWN_AT), Image.Resampling.NEAREST).save(
            DOCS / f"quickstart-{name}.png"
        )
    print(f"wrote docs/quickstart-{name}.png")


def main() -> None:
    os.chdir(REPO)  # the recipe names examples/target relative to the checkout
    with tempfile.TemporaryDirectory(prefix="quickstart-images-") as scratch:
        scratch = Path(scratch)
        result = fit(resolve_fit_config({"out": str(scratch / "run")}, "recipes/quickstart.toml"))
        print(f"fit: {result.step} steps, last loss {result.loss:.4f}")
        shutil.copyfile(result.out_dir / "loss.png", DOCS / "quickstart-loss.png")
        print("wrote docs/quickstart-loss.png")
        options = SamplingOptions(cfg_scale=2.0)  # `sample`'s defaults otherwise: DDPM 250 steps, seed 0
        for name, source in (("adapted", str(result.adapter)), ("base", "tiny")):
            sample_sources([source], 16, options, out=scratch / name)
            publish(scratch / name / "grid.png", name)
        classes = sorted(p for p in (REPO / "examples" / "target").iterdir() if p.is_dir())
        target = [png for folder in classes for png in sorted(folder.glob("*.png"))[:PER_CLASS]]
        publish(save_grid(load_pngs(target), scratch / "target.png"), "target")


if __name__ == "__main__":
    main()
