"""The bundled text-to-image base and its quickstart: adaptation really happens, offline, on a CPU.

`tiny-t2i` (difffit/assets/tiny-t2i) is a PixArt-α pipeline folder trained on drawn scenes on a light
background; examples/target-t2i holds the same kind of scenes as neon outlines on a dark background. Sampled
by the target's own captions, the adapted model must sit closer to the target than the base does, by the
pixel Frechet distance of tests/test_quickstart.py (no downloaded weights).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_quickstart import frechet_distance, pixel_features

from difffit.engine.evaluation.sample import SamplingOptions, generate
from difffit.engine.methods.sources import load_source
from difffit.engine.models.families import family_of_spec, load_base
from difffit.engine.models.families.pipelines import TINY_T2I_BASE
from difffit.engine.training.recipes import resolve_fit_config
from difffit.engine.training.train import fit

REPO = Path(__file__).resolve().parents[1]
TARGET = REPO / "examples" / "target-t2i"
RECIPE = REPO / "recipes" / "quickstart-t2i.toml"
SAMPLES = 64  # by the target's first 64 captions
# The recipe's settings but fewer steps, enough that the criterion holds with a wide margin (see the test).
TEST_STEPS = 100


@pytest.fixture(scope="module")
def target() -> tuple[list[str], np.ndarray]:
    """The target's captions and the pixel features of its images."""
    rows = [json.loads(line) for line in (TARGET / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) >= 100, "examples/target-t2i is missing: run python examples/make_examples.py"
    images = np.stack([np.asarray(Image.open(TARGET / row["file_name"]).convert("RGB")) for row in rows])
    return [row["text"] for row in rows], pixel_features(images)


def test_tiny_t2i_is_a_bundled_pixart_pipeline_that_stock_diffusers_loads():
    from diffusers import DiffusionPipeline

    base = load_base("tiny-t2i")
    assert family_of_spec("tiny-t2i").name == "pixart"
    assert base.source_format == "bundled" and base.pipeline == "PixArtAlphaPipeline" and base.resolution == 32
    pipe = DiffusionPipeline.from_pretrained(str(TINY_T2I_BASE))
    assert type(pipe).__name__ == "PixArtAlphaPipeline"
    assert pipe.tokenizer.tokenize("a red circle at the top left") == ["▁a", "▁red", "▁circle", "▁at", "▁the", "▁top",
                                                                        "▁left"]
    # package data stays small: the whole pipeline folder
    assert sum(f.stat().st_size for f in TINY_T2I_BASE.rglob("*") if f.is_file()) < 5_000_000


def test_fitting_tiny_t2i_moves_samples_to_the_target_look(tmp_path, monkeypatch, target):
    captions, target_features = target
    monkeypatch.chdir(REPO)  # the recipe names examples/target-t2i relative to the checkout
    config = resolve_fit_config({"steps": TEST_STEPS, "save_every": 0, "sample_every": 0, "num_workers": 0,
                                 "cache_dir": str(tmp_path / "cache"), "out": str(tmp_path / "run")}, str(RECIPE))
    result = fit(config, progress=False)
    options = SamplingOptions(scheduler=None, cfg_scale=None, batch_size=SAMPLES)  # the pipeline's own
    prompts = captions[:SAMPLES]
    before = generate(load_base("tiny-t2i"), SAMPLES, options, prompts=prompts, progress=False).numpy()
    adapted, _ = load_source(str(result.adapter))
    after = generate(adapted, SAMPLES, options, prompts=prompts, progress=False).numpy()

    base_distance = frechet_distance(pixel_features(before), target_features)
    adapted_distance = frechet_distance(pixel_features(after), target_features)
    print(f"pixel Frechet distance to the target: base {base_distance:.3f}, adapted {adapted_distance:.3f}")
    assert adapted_distance < 0.5 * base_distance, (adapted_distance, base_distance)
