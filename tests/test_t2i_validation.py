"""Validation on text-to-image bases (tiny PixArt, SD3 and FLUX pipelines): the held-out split per bucket, a
validation loss that is the same number for the same weights (also across a resume), in-training FID and CLIP
score, keep-best, the report's plots, eval-fid --prompts on a text-to-image adapter, and the bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file
from t2i_fixtures import (
    PIPELINES,
    make_mixed_aspect_data,
    save_tiny_clip,
    t2i_fit_config,
)

from difffit.engine.errors import DiffFitError
from difffit.engine.evaluation.image_sets import ModelInput, ModelSamples
from difffit.engine.evaluation.inception import random_inception_weights
from difffit.engine.evaluation.metrics import evaluate
from difffit.engine.sharing.report import write_report
from difffit.engine.training import validation
from difffit.engine.training.config import FitConfig
from difffit.engine.training.train import fit

SHAPES = {(16, 16): 6, (32, 8): 6}  # two buckets; --val-fraction 0.34 holds out 2 of each
LATENT_SHAPES = {(8, 8), (4, 16)}  # their latents' (h, w): the tiny VAEs halve each side


@pytest.fixture(params=list(PIPELINES), scope="module")
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def pipeline_dir(family, tmp_path_factory):
    return PIPELINES[family](tmp_path_factory.mktemp(family) / "pipe")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_mixed_aspect_data(tmp_path_factory.mktemp("data") / "data", SHAPES)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "clip", seed=5)  # seed 5: positive cosines here


def records(run_dir: Path, key: str) -> list[tuple[int, float]]:
    lines = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in lines if key in r]


def config(data, pipeline_dir, tmp_path, name: str, **overrides):
    options = dict(steps=4, batch_size=2, lr=1e-2, val_fraction=0.34, val_every=2, keep_best="val_loss", save_every=2)
    return t2i_fit_config(data, pipeline_dir, tmp_path, **{**options, "out": str(tmp_path / name), **overrides})


def test_validation_loss_is_the_same_number_for_the_same_weights_across_a_resume(
    data, pipeline_dir, tmp_path, monkeypatch
):
    held_out_shapes, measure = [], validation.held_out_loss

    def spy(forward, diffusion, groups, *args, **kwargs):
        held_out_shapes.append(sorted(tuple(group.x0.shape) for group in groups))
        return measure(forward, diffusion, groups, *args, **kwargs)

    monkeypatch.setattr(validation, "held_out_loss", spy)
    full = fit(config(data, pipeline_dir, tmp_path, "full"), progress=False)
    full_dir = full.out_dir
    logged = records(full.out_dir, "val_loss")
    assert [step for step, _ in logged] == [2, 4] and all(np.isfinite(v) and v > 0 for _, v in logged)
    assert logged[0][1] != logged[1][1]  # the weights changed, and so did the number
    assert full.images == 8  # 2 of each bucket's 6 held out
    # every held-out image, in its own bucket's shape: 2 images of each
    assert {(s[0], s[2], s[3]) for s in held_out_shapes[0]} == {(2, h, w) for h, w in LATENT_SHAPES}
    best_step, best_value = min(logged, key=lambda r: r[1])
    assert (full.best_step, full.best_metric) == (best_step, best_value)

    fit(config(data, pipeline_dir, tmp_path, "half", steps=2), progress=False)
    resumed = fit(config(data, pipeline_dir, tmp_path, "half", resume=True), progress=False)
    assert records(resumed.out_dir, "val_loss") == logged  # bit for bit: the same held-out set, noise and weights
    assert (resumed.best_step, resumed.best_metric) == (full.best_step, full.best_metric)
    best, resumed_best = (load_file(str(run / "best" / "adapter.safetensors")) for run in (full_dir, resumed.out_dir))
    assert best.keys() == resumed_best.keys() and all(torch.equal(v, resumed_best[k]) for k, v in best.items())


def metrics_of(family: str) -> str:
    """FID on PixArt; the samples it reads are made the same way on every family, so SD3's and FLUX's runs
    save the Inception network's time and score CLIP only."""
    return "fid,clip" if family == "pixart" else "clip"


@pytest.fixture(scope="module")
def evaluated(family, data, pipeline_dir, clip_dir, tmp_path_factory):
    """A run with in-training CLIP score (and FID, KID) every 2 steps, keeping the best CLIP score."""
    root = tmp_path_factory.mktemp("eval")
    weights = random_inception_weights(root / "inception.pth")
    result = fit(
        config(
            data,
            pipeline_dir,
            root,
            "run",
            eval_every=2,
            eval_metrics=metrics_of(family),
            clip_model=str(clip_dir),
            inception_weights=str(weights),
            keep_best="clip",
        ),
        progress=False,
    )
    return result, weights


def test_in_training_fid_and_clip_keep_the_best_clip_score(family, evaluated):
    result, _ = evaluated
    clips, fids = records(result.out_dir, "clip"), records(result.out_dir, "fid")
    assert [s for s, _ in clips] == [2, 4] and all(0 < v <= 100 for _, v in clips)
    if "fid" in metrics_of(family):
        assert [s for s, _ in fids] == [2, 4] and all(np.isfinite(v) and v > 0 for _, v in fids)
        assert [s for s, _ in records(result.out_dir, "kid")] == [2, 4]  # the held-out reference keeps features
    assert (result.best_step, result.best_metric) == max(clips, key=lambda r: r[1])  # higher is better
    assert (result.out_dir / "best" / "adapter.safetensors").is_file()


def test_report_plots_val_loss_fid_and_clip(family, evaluated, tmp_path):
    result, _ = evaluated
    page = write_report([result.out_dir], tmp_path / "report.html").read_text()
    plotted = json.loads(page.split('class="log-data">')[1].split("</script>")[0])
    metrics = metrics_of(family).split(",")
    for key in ("val_loss", *metrics):
        assert plotted[key]["step"] == [2, 4], key
    # each curve (its gid) in an inline SVG: val_loss with the losses, fid and clip in the evaluation panels
    assert all(f'id="{curve}"' in page for curve in ("loss-0-val_loss", *(f"eval-0-{m}" for m in metrics)))


def test_eval_fid_samples_a_text_to_image_adapter_by_prompt(
    family, evaluated, data, clip_dir, tmp_path, monkeypatch, capsys
):
    result, weights = evaluated
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red picture, 16 by 16\na blue picture, 32 by 8\n")
    adapter = str(result.out_dir / "adapter.safetensors")
    fid = "fid" in metrics_of(family)
    scores = evaluate(
        adapter,
        str(data) if fid else None,
        metrics=metrics_of(family),
        num_samples=4,
        prompts=["a red picture", "a blue picture"],
        inception_weights=str(weights),
        clip_model=str(clip_dir),
        batch_size=4,
        device="cpu",
        progress=False,
    )
    assert scores.num_generated == 4 and 0 < scores.metrics["clip_score"] <= 100
    assert np.isfinite(scores.metrics["fid"]) if fid else "fid" not in scores.metrics
    code, out, err = run_cli(
        monkeypatch,
        capsys,
        "eval-fid",
        adapter,
        "--prompts",
        prompts,
        "--metrics",
        "clip",
        "--clip-model",
        clip_dir,
        "--device",
        "cpu",
        "--json",
    )
    assert code == 0, err
    assert json.loads(out)["num_generated"] == 2  # one sample per prompt by default
    code, _, err = run_cli(monkeypatch, capsys, "eval-fid", adapter, "--metrics", "clip", "--clip-model", clip_dir)
    assert code == 1 and "--prompts FILE" in err and "Traceback" not in err
    samples = ModelSamples.from_source(adapter, None, ModelInput(prompts=["a cat", "a dog"]), torch.device("cpu"))
    assert (samples.count, samples.sampling.cfg_scale) == (2, None)  # the pipeline's own, resolved as it samples


def test_eval_fid_samples_dit_at_the_papers_fid_setting_and_refuses_prompts(tiny_base_file, tiny_vae_dir):
    model = ModelInput(vae=str(tiny_vae_dir))
    samples = ModelSamples.from_source(str(tiny_base_file), 2, model, torch.device("cpu"))
    assert (samples.sampling.cfg_scale, samples.sampling.scheduler, samples.prompts) == (1.5, "ddpm", None)
    with pytest.raises(DiffFitError, match="--prompts does not apply to"):
        ModelSamples.from_source(
            str(tiny_base_file), 2, ModelInput(vae=str(tiny_vae_dir), prompts=["a cat"]), torch.device("cpu")
        )


# -- bad input: one sentence, nothing written -------------------------------------------------------------


def uncaptioned(root: Path) -> Path:
    data = make_mixed_aspect_data(root, {(16, 16): 2})
    for caption in data.glob("*.txt"):
        caption.unlink()
    return data


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"val_fraction": 0.5}, r"would hold out all 1 image\(s\) of the 32 x 8 bucket"),
        ({"val_fraction": 0.0, "val_every": 0, "keep_best": None, "val_data": "UNCAPTIONED"}, "have no caption"),
        (
            {"eval_every": 2, "eval_metrics": "clip", "clip_model": "someone/no-such-clip", "keep_best": None},
            "someone/no-such-clip",
        ),
        (
            {"eval_every": 2, "eval_metrics": "clip", "keep_best": None},
            "clip-vit-large-patch14",
        ),  # the default, offline
        ({"eval_every": 2, "keep_best": "clip"}, "--eval-metrics fid does not compute it"),
        (
            {"val_fraction": 0.0, "val_every": 0, "keep_best": None, "eval_every": 2, "eval_metrics": "clip"},
            "no validation set",
        ),
    ],
)
def test_bad_validation_input_is_one_sentence_and_writes_nothing(pipeline_dir, tmp_path, overrides, message):
    data = make_mixed_aspect_data(tmp_path / "data", {(16, 16): 6, (32, 8): 1})
    if overrides.get("val_data") == "UNCAPTIONED":
        overrides = {**overrides, "val_data": str(uncaptioned(tmp_path / "val"))}
    with pytest.raises(DiffFitError, match=message) as caught:
        fit(config(data, pipeline_dir, tmp_path, "run", **overrides), progress=False)
    assert "\n" not in caught.value.message
    assert not (tmp_path / "run").exists()


def test_clip_and_eval_prompts_on_a_class_conditional_base_are_refused(
    tmp_path, toy_data, tiny_base_file, tiny_vae_dir
):
    common = dict(
        data=str(toy_data),
        base=str(tiny_base_file),
        vae=str(tiny_vae_dir),
        steps=1,
        eval_every=1,
        val_fraction=0.34,
        out=str(tmp_path / "run"),
    )
    for overrides, message in (
        ({"eval_metrics": "clip"}, "--eval-metrics clip scores samples against their captions"),
        ({"eval_prompts": "prompts.txt"}, "--eval-prompts applies to text-to-image bases"),
    ):
        with pytest.raises(DiffFitError, match=message):
            fit(FitConfig(**common, **overrides), progress=False)
    assert not (tmp_path / "run").exists()
