"""The text-to-image quickstart's pictures, made from the current code: rerun it after any change that moves them.

Runs what docs/quickstart-t2i.md runs (`fit --recipe recipes/quickstart-t2i.toml`, then `sample` of the
adapter and of the `tiny-t2i` base by the first 16 captions of examples/target-t2i, with the pipeline's own
sampler: SD3's flow-matching Euler, 28 steps, guidance 7) in a scratch folder, and writes docs/quickstart-t2i-base.png,
-adapted.png and -target.png (4x4 grids of the 32 px images, in the same caption order, shown at 2x with
nearest-neighbour pixels). Every step is seeded, so a rerun of unchanged code writes the same pictures.

    python examples/make_quickstart_t2i_images.py
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from make_quickstart_images import publish

from difffit.engine.evaluation.sample import SamplingOptions
from difffit.engine.evaluation.sample_folder import load_pngs, save_grid
from difffit.engine.methods.sources import sample_sources
from difffit.engine.training.recipes import resolve_fit_config
from difffit.engine.training.train import fit

REPO = Path(__file__).resolve().parents[1]
TARGET = REPO / "examples" / "target-t2i"
SHOWN = 16  # the target's first 16 captions, and their images


def main() -> None:
    os.chdir(REPO)  # the recipe names examples/target-t2i relative to the checkout
    rows = [json.loads(line) for line in (TARGET / "metadata.jsonl").read_text().splitlines()][:SHOWN]
    captions = [row["text"] for row in rows]
    with tempfile.TemporaryDirectory(prefix="quickstart-t2i-images-") as scratch:
        scratch = Path(scratch)
        result = fit(resolve_fit_config({"out": str(scratch / "run")}, "recipes/quickstart-t2i.toml"))
        print(f"fit: {result.step} steps, last loss {result.loss:.4f}")
        options = SamplingOptions(scheduler=None, cfg_scale=None)  # the pipeline's own sampler, seed 0
        for name, source in (("adapted", str(result.adapter)), ("base", "tiny-t2i")):
            sample_sources([source], SHOWN, options, out=scratch / name, prompts=captions)
            publish(scratch / name / "grid.png", f"t2i-{name}")
        target = load_pngs([TARGET / row["file_name"] for row in rows])
        publish(save_grid(target, scratch / "target.png"), "t2i-target")


if __name__ == "__main__":
    main()
