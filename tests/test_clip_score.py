"""CLIP score on a tiny CLIP trained here to tell four colours apart: semantics, the formula, loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from t2i_fixtures import save_tiny_clip

from difffit_cli.engine.errors import DiffFitError
from difffit_cli.engine.evaluation.clip_score import clip_score

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 40)}
PROMPTS = [f"a {name} square" for name in COLOURS]


def squares(seed: int) -> list[np.ndarray]:
    """One noisy 32 px square per colour, in COLOURS order."""
    rng = np.random.default_rng(seed)
    return [np.clip(np.array(rgb)[None, None] + rng.integers(-20, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
            for rgb in COLOURS.values()]


@pytest.fixture(scope="module")
def trained_clip(tmp_path_factory):
    """A tiny CLIP trained contrastively (60 Adam steps, ~2 s) until each colour matches its own prompt."""
    from transformers import CLIPModel, CLIPProcessor

    folder = save_tiny_clip(tmp_path_factory.mktemp("clip"))
    model, processor = CLIPModel.from_pretrained(folder), CLIPProcessor.from_pretrained(folder)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(60):
        inputs = processor(text=PROMPTS, images=squares(step), return_tensors="pt", padding=True)
        loss = model(**inputs, return_loss=True).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return save_tiny_clip(folder, model.eval())


def score(images, prompts, folder, **kwargs) -> float:
    return clip_score(images, prompts, model=str(folder), device="cpu", progress=False, **kwargs)


def test_matching_prompts_score_above_mismatched_ones(trained_clip):
    images = squares(1000) + squares(1001)
    matched = score(images, PROMPTS * 2, trained_clip)
    shifted = score(images, (PROMPTS[1:] + PROMPTS[:1]) * 2, trained_clip)
    assert matched > 40 and shifted < 20, (matched, shifted)


def test_equals_the_models_own_cosines_clamped_per_image(trained_clip):
    """Against CLIPModel.forward's logits (another code path): batching, alignment, preprocessing, the clamp."""
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(trained_clip).eval(), CLIPProcessor.from_pretrained(trained_clip)
    images = squares(7) + squares(8)[:3]
    prompts = [PROMPTS[i % 4] if i % 3 else PROMPTS[(i + 1) % 4] for i in range(len(images))]
    with torch.no_grad():
        out = model(**processor(text=prompts, images=images, return_tensors="pt", padding=True))
    cosines = (out.logits_per_image / model.logit_scale.exp()).diagonal().double()
    assert (cosines < -0.01).any() and (cosines > 0.01).any()  # so the clamp matters here
    expected = (100 * cosines.clamp(min=0)).mean().item()
    assert score(images, prompts, trained_clip, batch_size=3) == pytest.approx(expected, abs=1e-3)
    assert expected != pytest.approx((100 * cosines).mean().item(), abs=1e-3)


def test_images_and_prompts_must_pair_up(trained_clip):
    with pytest.raises(ValueError):
        score(squares(0), PROMPTS[:3], trained_clip)
    with pytest.raises(DiffFitError, match="no images"):
        score([], [], trained_clip)


def test_long_prompts_are_cut_to_the_token_limit_and_counted(trained_clip, capsys):
    long = PROMPTS[0] + ", in a photo of" * 10  # past the tiny CLIP's 16 tokens
    assert score(squares(3)[:1], [long], trained_clip) == pytest.approx(
        score(squares(3)[:1], [long[:60] + " and more words that are cut anyway"], trained_clip), abs=1e-3)
    assert "1 of 1 prompts are longer than the CLIP model's 16 tokens" in capsys.readouterr().err.replace("\n", " ")


def test_a_hub_id_loads_from_the_cache_and_is_refused_offline_when_absent(trained_clip, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    repo = tmp_path / "hf" / "hub" / "models--someone--tiny-clip"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    shutil.copytree(trained_clip, repo / "snapshots" / ("0" * 40))
    images = squares(5)
    assert score(images, PROMPTS, "someone/tiny-clip") == score(images, PROMPTS, trained_clip)
    with pytest.raises(DiffFitError, match="CLIP model someone/other is not in the Hugging Face cache"):
        score(images, PROMPTS, "someone/other")
    with pytest.raises(DiffFitError, match="neither a folder holding a CLIP model nor a hub id"):
        score(images, PROMPTS, str(tmp_path / "no such folder"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DiffFitError, match="Cannot load the CLIP model"):
        score(images, PROMPTS, str(tmp_path / "empty"))
