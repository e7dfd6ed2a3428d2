"""Min-SNR-gamma and P2 loss weighting: off by default, each changes the loss, formulas checked directly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import assert_loss_matches_reference

from difffit.engine.errors import DiffFitError
from difffit.engine.methods.adapter import read_adapter
from difffit.engine.models.diffusion import GaussianDiffusion, linear_betas
from difffit.engine.training.config import FitConfig
from difffit.engine.training.train import fit


def _losses(golden, golden_model, **weighting):
    diffusion = GaussianDiffusion()
    with torch.no_grad():
        return diffusion.training_losses(
            lambda x, t: golden_model(x, t, golden["loss.y"]),
            golden["loss.x0"],
            golden["loss.t"],
            golden["loss.noise"],
            diffusion.mse_weights(**weighting),
        )


def _snr(t: torch.Tensor) -> torch.Tensor:
    """SNR of original step t, straight from the betas (no shared code with the engine's tables)."""
    alpha_bar = np.cumprod(1 - linear_betas(1000).numpy())[t.numpy()]
    return torch.from_numpy(alpha_bar / (1 - alpha_bar))


def test_no_weighting_is_the_reference_loss(golden, golden_model):
    assert GaussianDiffusion().mse_weights() is None  # so fit calls training_losses without weights
    assert_loss_matches_reference(golden, golden_model)


@pytest.mark.parametrize(
    "weighting,expected",
    [
        ({"snr_gamma": 5.0}, lambda snr: torch.minimum(snr, torch.tensor(5.0, dtype=snr.dtype)) / snr),
        ({"p2_gamma": 1.0}, lambda snr: 1 / (1 + snr)),
        ({"p2_gamma": 0.5}, lambda snr: (1 + snr) ** -0.5),
    ],
)
def test_weighting_changes_the_mse_term_by_its_formula(golden, golden_model, weighting, expected):
    plain, weighted = _losses(golden, golden_model), _losses(golden, golden_model, **weighting)
    weights = expected(_snr(golden["loss.t"])).float()
    assert not torch.allclose(weighted["loss"], plain["loss"])
    torch.testing.assert_close(weighted["loss"], weights * plain["mse"] + plain["vb"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(weighted["mse"], plain["mse"])  # the logged MSE stays unweighted
    torch.testing.assert_close(weighted["vb"], plain["vb"])


def test_min_snr_caps_only_the_low_noise_steps():
    weights = GaussianDiffusion().mse_weights(snr_gamma=5.0)
    snr = _snr(torch.arange(1000))
    assert torch.all(weights[snr <= 5] == 1) and torch.all(weights[snr > 5] < 1)


def test_fit_records_the_weighting(tmp_path, toy_data, tiny_base_file, tiny_vae_dir):
    options = dict(
        data=str(toy_data),
        base=str(tiny_base_file),
        vae=str(tiny_vae_dir),
        steps=2,
        batch_size=4,
        save_every=0,
        sample_every=0,
        num_workers=0,
        cache_dir=str(tmp_path / "cache"),
    )
    plain = fit(FitConfig(**options, out=str(tmp_path / "plain")), progress=False)
    weighted = fit(FitConfig(**options, out=str(tmp_path / "snr"), snr_gamma=5.0, p2_gamma=1.0), progress=False)
    first = [json.loads((r.out_dir / "log.jsonl").read_text().splitlines()[0]) for r in (plain, weighted)]
    assert first[0]["mse"] == first[1]["mse"] and first[0]["loss"] != first[1]["loss"]
    assert read_adapter(weighted.adapter)[1].training.items() >= {"snr_gamma": 5.0, "p2_gamma": 1.0}.items()
    assert "snr_gamma" not in read_adapter(plain.adapter)[1].training
    with pytest.raises(DiffFitError, match="--snr-gamma"):
        FitConfig(**options, snr_gamma=-1.0).validate()
