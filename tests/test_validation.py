"""Validation: the held-out split, a deterministic validation loss, in-training FID, the best adapter, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_toy_data
from PIL import Image
from safetensors.torch import load_file

from difffit.engine.data.images import scan_image_folder
from difffit.engine.errors import DiffFitError
from difffit.engine.evaluation.inception import random_inception_weights
from difffit.engine.methods.adapter import read_adapter
from difffit.engine.models.dit import DiT, DiTConfig
from difffit.engine.training.config import FitConfig
from difffit.engine.training.train import fit
from difffit.engine.training.validation import split_validation, validation_loss


def records(run_dir: Path, key: str) -> list[tuple[int, float]]:
    lines = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in lines if key in r]


@pytest.fixture
def conf(tmp_path, tiny_base_file, tiny_vae_dir):
    def make(data: Path, **overrides) -> FitConfig:
        options = dict(
            data=str(data),
            base=str(tiny_base_file),
            vae=str(tiny_vae_dir),
            steps=6,
            batch_size=4,
            save_every=0,
            sample_every=0,
            num_workers=0,
            cache_dir=str(tmp_path / "cache"),
            out=str(tmp_path / "run"),
            adapter_dtype="fp32",
        )
        return FitConfig(**(options | overrides))

    return make


def test_same_weights_same_validation_loss():
    torch.manual_seed(0)
    model = DiT(
        DiTConfig(input_size=4, patch_size=2, in_channels=4, hidden_size=64, depth=1, num_heads=2, num_classes=3)
    ).eval()
    x0, labels = torch.randn(5, 4, 4, 4), torch.tensor([0, 1, 2, 0, 1])
    first = validation_loss(model, x0, labels, seed=0, batch_size=3)
    assert validation_loss(model, x0, labels, seed=0, batch_size=3) == first
    assert validation_loss(model, x0, labels, seed=0, batch_size=20) == pytest.approx(first, rel=1e-6)  # batching
    torch.randn(100)  # the global RNG is not what it draws from
    assert validation_loss(model, x0, labels, seed=0, batch_size=3) == first
    with torch.no_grad():
        model.final_layer.linear.bias.add_(0.1)
    assert validation_loss(model, x0, labels, seed=0, batch_size=3) != first


def test_held_out_split_and_validation_data_classes(tmp_path, toy_data):
    folder = scan_image_folder(toy_data)
    train, val = split_validation(FitConfig(data=str(toy_data), val_fraction=0.34, seed=5), folder)
    assert len(train) == 8 and len(val) == 4 and set(train.files).isdisjoint(val.files)
    assert sorted(val.labels) == [0, 0, 1, 1] and val.class_names == folder.class_names
    other = make_toy_data(tmp_path / "other", per_class=1)
    (other / "blue").rename(other / "green")
    with pytest.raises(DiffFitError, match="green"):
        split_validation(FitConfig(data=str(toy_data), val_data=str(other)), folder)
    with pytest.raises(DiffFitError, match="holds out no image"):
        split_validation(FitConfig(data=str(toy_data), val_fraction=0.01), folder)


def test_overfitting_shows_training_loss_falling_and_validation_loss_rising(tmp_path, conf):
    """Two training images of pixel noise: a small DiT, fully trained in pixel space (identity VAE), soon
    denoises towards them alone, and from then on it does worse on two other noise images."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).save(tmp_path / split / f"{i}.png")
    # Batches of 8 from 2 images: each image 4 times per step, stated with --repeats (a batch may not exceed an epoch).
    result = fit(
        conf(
            tmp_path / "train",
            base="random:DiT-S/2",
            vae="identity",
            resolution=4,
            method="full",
            steps=100,
            batch_size=8,
            repeats=4,
            lr=1e-3,
            ema=False,
            val_data=str(tmp_path / "val"),
            val_every=10,
        ),
        progress=False,
    )
    losses = [value for _, value in records(result.out_dir, "loss")]
    val_losses = records(result.out_dir, "val_loss")
    assert [step for step, _ in val_losses] == list(range(10, 101, 10))
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])  # training keeps improving ...
    # ... while validation bottoms out (measured: step 60, 0.285) and turns up (step 100: 0.343, 1.2x).
    lowest = min(range(10), key=lambda i: val_losses[i][1])
    assert lowest < 9 and val_losses[-1][1] > val_losses[lowest][1] * 1.1


def test_keep_best_val_loss_and_resume_restores_split_and_best(tmp_path, conf, toy_data):
    options = dict(lr=1e-2, val_fraction=0.34, val_every=3, keep_best="val_loss", save_every=6)
    full = fit(conf(toy_data, steps=12, out=str(tmp_path / "full"), **options), progress=False)
    logged = records(full.out_dir, "val_loss")
    best_step, best_value = min(logged, key=lambda r: r[1])
    assert (full.best_step, full.best_metric) == (best_step, best_value)
    best = full.out_dir / "best" / "adapter.safetensors"
    assert read_adapter(best)[1].training["steps"] == best_step
    assert full.images == 8  # 4 of the 12 held out

    fit(conf(toy_data, steps=6, out=str(tmp_path / "half"), **options), progress=False)
    resumed = fit(conf(toy_data, steps=12, out=str(tmp_path / "half"), resume=True, **options), progress=False)
    assert records(resumed.out_dir, "val_loss") == logged
    assert (resumed.best_step, resumed.best_metric) == (full.best_step, full.best_metric)
    resumed_best = load_file(str(resumed.out_dir / "best" / "adapter.safetensors"))
    assert all(torch.equal(v, resumed_best[k]) for k, v in load_file(str(best)).items())


def test_in_training_fid_and_keep_best_fid(tmp_path, conf, toy_data):
    weights = random_inception_weights(tmp_path / "inception.pth")
    result = fit(
        conf(
            toy_data,
            steps=4,
            lr=1e-2,
            eval_every=2,
            eval_n=4,
            eval_reference=str(toy_data),
            inception_weights=str(weights),
            keep_best="fid",
        ),
        progress=False,
    )
    fids, kids = records(result.out_dir, "fid"), records(result.out_dir, "kid")
    assert [s for s, _ in fids] == [2, 4] and [s for s, _ in kids] == [2, 4]
    assert all(np.isfinite(v) and v > 0 for _, v in fids)
    assert result.best_step == min(fids, key=lambda r: r[1])[0]
    assert (result.out_dir / "best" / "adapter.safetensors").is_file()


def test_missing_inception_weights_fail_before_training(tmp_path, conf, toy_data):
    with pytest.raises(DiffFitError, match="Inception weights"):
        fit(conf(toy_data, eval_every=2, eval_reference=str(toy_data)), progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"val_every": 5}, "needs a validation set"),
        ({"keep_best": "fid"}, "--eval-every"),
        ({"eval_every": 5}, "--eval-reference"),
        ({"val_fraction": 1.0}, r"\[0, 1\)"),
    ],
)
def test_validation_options_are_checked(conf, toy_data, overrides, message):
    with pytest.raises(DiffFitError, match=message):
        conf(toy_data, **overrides).validate()
