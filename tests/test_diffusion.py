"""Loss and sampler steps against the reference diffusion code's outputs."""

import pytest
import torch

from difffit_cli.engine.models.diffusion import GaussianDiffusion, space_timesteps


def test_hybrid_loss_matches_reference(golden, golden_model):
    diffusion = GaussianDiffusion()
    with torch.no_grad():
        out = diffusion.training_losses(
            lambda x, t: golden_model(x, t, golden["loss.y"]), golden["loss.x0"], golden["loss.t"], golden["loss.noise"]
        )
    for term in ("loss", "mse", "vb"):
        torch.testing.assert_close(out[term], golden[f"loss.{term}"], atol=1e-5, rtol=0)


def test_vb_term_does_not_train_the_mean(golden, golden_model):
    """Inside the VB term the predicted mean is detached: its gradient w.r.t. eps is zero."""
    diffusion = GaussianDiffusion()
    eps = torch.randn(2, 4, 8, 8, requires_grad=True)
    var = torch.zeros(2, 4, 8, 8, requires_grad=True)
    out = diffusion.training_losses(
        lambda x, t: torch.cat([eps, var], dim=1), golden["loss.x0"][:2], torch.tensor([5, 500]),
        golden["loss.noise"][:2],
    )
    out["vb"].sum().backward()
    assert eps.grad is None or eps.grad.abs().max() == 0
    assert var.grad.abs().max() > 0


@pytest.mark.parametrize("name,spacing", [("s250", "250"), ("ddim25", "ddim25")])
def test_respaced_steps_match_reference(golden, golden_model, name, spacing):
    diffusion = GaussianDiffusion(spacing)
    assert diffusion.timesteps == golden[f"{name}.timesteps"].tolist()
    index, xt = golden[f"{name}.index"], golden[f"{name}.xt"]
    with torch.no_grad():
        output = golden_model(xt, diffusion.original_timesteps(index), golden["fwd.y"])
    out = diffusion.p_mean_variance(output, xt, index)
    for key in ("mean", "log_variance", "pred_xstart"):
        torch.testing.assert_close(out[key], golden[f"{name}.{key}"], atol=1e-5, rtol=0)
    torch.testing.assert_close(diffusion.ddim_step(output, xt, index), golden[f"{name}.ddim_prev"], atol=1e-5, rtol=0)


def test_ddpm_step_adds_no_noise_at_index_zero(golden, golden_model):
    diffusion = GaussianDiffusion("250")
    xt, index = golden["s250.xt"], golden["s250.index"]
    with torch.no_grad():
        output = golden_model(xt, diffusion.original_timesteps(index), golden["fwd.y"])
    noise = torch.randn_like(xt)
    step = diffusion.ddpm_step(output, xt, index, noise)
    mean = diffusion.p_mean_variance(output, xt, index)["mean"]
    torch.testing.assert_close(step[0], mean[0], atol=0, rtol=0)
    assert (step[1:] - mean[1:]).abs().max() > 0


def test_space_timesteps_sections_and_errors():
    assert space_timesteps(10, "10") == list(range(10))
    assert space_timesteps(100, "ddim10") == list(range(0, 100, 10))
    assert space_timesteps(10, "2,3") == [0, 4, 5, 7, 9]
    with pytest.raises(ValueError):
        space_timesteps(10, "20")
    with pytest.raises(ValueError):
        space_timesteps(100, "ddim11")
