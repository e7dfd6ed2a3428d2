"""CLIP score on a tiny CLIP trained here to tell four colours apart: semantics, the formula, loading."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from t2i_fixtures import save_tiny_clip

from difffit.engine.errors import DiffFitError
from difffit.engine.evaluation.clip_score import clip_score
from difffit.engine.evaluation.metrics import evaluate

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 40)}
PROMPTS = [f"a {name} square" for name in COLOURS]


def squares(seed: int) -> list[np.ndarray]:
    """One noisy 32 px square per colour, in COLOURS order."""
    rng = np.random.default_rng(seed)
    return [
        np.clip(np.array(rgb)[None, None] + rng.integers(-20, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
        for rgb in COLOURS.values()
    ]


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
        score(squares(3)[:1], [long[:60] + " and more words that are cut anyway"], trained_clip), abs=1e-3
    )
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


# -- eval-fid --metrics clip on prompt samples ------------------------------------------------------------


def sample_folder(root, images, prompts=None):
    """What `difffit sample --prompt` writes: numbered PNGs, a grid, sample.json with the prompts, the marker."""
    from PIL import Image

    root.mkdir()
    names = [f"{i:06d}.png" for i in range(len(images))]
    for name, image in zip(names, images, strict=True):
        Image.fromarray(image).save(root / name)
    Image.new("RGB", (64, 64)).save(root / "grid.png")
    manifest = {"files": [*names, "grid.png", "sample.json"], **({"prompts": prompts} if prompts else {})}
    (root / "sample.json").write_text(json.dumps(manifest))
    (root / ".difffit").write_text('{"tool": "difffit", "kind": "samples"}\n')
    return root


def test_eval_fid_scores_a_prompt_sample_folder(trained_clip, tmp_path):
    images, prompts = squares(11) + squares(12), PROMPTS + PROMPTS[::-1]
    folder = sample_folder(tmp_path / "samples", images, prompts)
    result = evaluate(str(folder), metrics="clip", clip_model=str(trained_clip), device="cpu", progress=False)
    assert result.metrics == {"clip_score": pytest.approx(score(images, prompts, trained_clip), abs=1e-9)}
    assert result.num_generated == 8 and result.reference_source == "none"  # grid.png is not a sample
    first = evaluate(
        str(folder), metrics="clip", clip_model=str(trained_clip), num_samples=3, device="cpu", progress=False
    )
    assert first.metrics["clip_score"] == pytest.approx(score(images[:3], prompts[:3], trained_clip), abs=1e-9)
    with pytest.raises(DiffFitError, match="--metrics clip computes none"):  # no REFERENCE: one sentence
        evaluate(str(folder), metrics="clip", clip_model=str(trained_clip), save_stats=tmp_path / "s.npz", device="cpu")


def test_eval_fid_and_clip_together_skip_an_unreadable_sample_once(trained_clip, tmp_path):
    from difffit.engine.evaluation.inception import random_inception_weights

    images, prompts = squares(13) + squares(14), PROMPTS * 2
    folder = sample_folder(tmp_path / "samples", images, prompts)
    (folder / "000002.png").write_bytes(b"not a png")
    reference = sample_folder(tmp_path / "reference", squares(15) + squares(16))  # a sample folder as reference
    weights = random_inception_weights(tmp_path / "inception.pth")
    result = evaluate(
        str(folder),
        str(reference),
        metrics="fid,clip",
        clip_model=str(trained_clip),
        inception_weights=str(weights),
        device="cpu",
        progress=False,
    )
    assert set(result.metrics) == {"fid", "clip_score"} and result.metrics["fid"] > 0
    assert (result.num_generated, result.num_reference) == (7, 8)
    assert [path.name for path, _ in result.skipped] == ["000002.png"]
    kept = [i for i in range(8) if i != 2]
    expected = score([images[i] for i in kept], [prompts[i] for i in kept], trained_clip)
    assert result.metrics["clip_score"] == pytest.approx(expected, abs=1e-9)


def test_prompts_of_a_sample_npz_are_its_folders(trained_clip, tmp_path):
    images, prompts = squares(17), PROMPTS
    folder = sample_folder(tmp_path / "samples", images, prompts)
    with open(folder / "samples.npz", "wb") as f:
        np.savez(f, arr_0=np.stack(images))
    manifest = json.loads((folder / "sample.json").read_text())
    (folder / "sample.json").write_text(json.dumps({**manifest, "files": [*manifest["files"], "samples.npz"]}))
    result = evaluate(
        str(folder / "samples.npz"), metrics="clip", clip_model=str(trained_clip), device="cpu", progress=False
    )
    assert result.metrics["clip_score"] == pytest.approx(score(images, prompts, trained_clip), abs=1e-9)


def test_clip_without_prompts_or_with_a_wrong_count_is_one_sentence(trained_clip, tmp_path):
    from PIL import Image

    plain = tmp_path / "plain"
    plain.mkdir()

    for i, image in enumerate(squares(0)):
        Image.fromarray(image).save(plain / f"{i}.png")
    with pytest.raises(DiffFitError, match="records no prompts"):
        evaluate(str(plain), metrics="clip", clip_model=str(trained_clip), progress=False)
    no_prompts = sample_folder(tmp_path / "unprompted", squares(1))
    with pytest.raises(DiffFitError, match="records no prompts"):
        evaluate(str(no_prompts), metrics="clip", clip_model=str(trained_clip), progress=False)
    wrong = sample_folder(tmp_path / "wrong", squares(2), PROMPTS[:3])
    with pytest.raises(DiffFitError, match="lists 3 prompts for 4 samples"):
        evaluate(str(wrong), metrics="clip", clip_model=str(trained_clip), progress=False)


@pytest.mark.parametrize(
    "args, words",
    [
        (["--metrics", "fid"], "--metrics fid compares the generated images with a REFERENCE; none was given"),
        (["--clip-model", "x/y"], "--clip-model is the model of the clip metric; add clip to --metrics"),
        (["{folder}", "--metrics", "clip"], "A REFERENCE was given, but --metrics clip"),
        (
            ["--metrics", "clip", "--clip-model", "someone/absent"],
            "CLIP model someone/absent is not in the Hugging Face",
        ),
    ],
)
def test_eval_fid_clip_refusals_on_the_command_line(tmp_path, args, words):
    folder = sample_folder(tmp_path / "samples", squares(0), PROMPTS)
    args = [a.format(folder=folder) for a in args]
    done = subprocess.run(
        [sys.executable, "-m", "difffit", "eval-fid", str(folder), *args], capture_output=True, text=True
    )
    assert done.returncode == 1 and words in " ".join(done.stderr.split()), done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_eval_fid_clip_json_on_the_command_line(trained_clip, tmp_path):
    folder = sample_folder(tmp_path / "samples", squares(3), PROMPTS)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "difffit",
            "eval-fid",
            str(folder),
            "--metrics",
            "clip",
            "--clip-model",
            str(trained_clip),
            "--device",
            "cpu",
            "--json",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "clip_score": pytest.approx(score(squares(3), PROMPTS, trained_clip)),
        "num_generated": 4,
        "num_reference": None,
    }
