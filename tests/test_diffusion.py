"""Loss and sampler steps against the reference diffusion code's outputs.

The reference ran in float32. Each comparison allows the model's float32 rounding times what the formula
amplifies it by, plus the formula's own rounding (`assert_close_amplified`). The sampler steps also run in
float64, whose rounding differs from the reference's as much as a correct machine's can: both must pass.
"""

import copy

import pytest
import torch
from conftest import assert_close_amplified, assert_loss_matches_reference

from difffit.engine.models.diffusion import GaussianDiffusion, space_timesteps


def test_hybrid_loss_matches_reference(golden, golden_model):
    assert_loss_matches_reference(golden, golden_model)


def test_vb_term_does_not_train_the_mean(golden, golden_model):
    """Inside the VB term the predicted mean is detached: its gradient w.r.t. eps is zero."""
    diffusion = GaussianDiffusion()
    eps = torch.randn(2, 4, 8, 8, requires_grad=True)
    var = torch.zeros(2, 4, 8, 8, requires_grad=True)
    out = diffusion.training_losses(
        lambda x, t: torch.cat([eps, var], dim=1),
        golden["loss.x0"][:2],
        torch.tensor([5, 500]),
        golden["loss.noise"][:2],
    )
    out["vb"].sum().backward()
    assert eps.grad is None or eps.grad.abs().max() == 0
    assert var.grad.abs().max() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name,spacing", [("s250", "250"), ("ddim25", "ddim25")])
def test_respaced_steps_match_reference(golden, golden_model, name, spacing, dtype):
    model = golden_model if dtype == torch.float32 else copy.deepcopy(golden_model).to(dtype)
    diffusion = GaussianDiffusion(spacing)
    assert diffusion.timesteps == golden[f"{name}.timesteps"].tolist()
    index, xt = golden[f"{name}.index"], golden[f"{name}.xt"]
    with torch.no_grad():
        output = model(xt.to(dtype), diffusion.original_timesteps(index), golden["fwd.y"])
    out = diffusion.p_mean_variance(output, xt.to(dtype), index)
    for key in ("mean", "log_variance", "pred_xstart"):
        assert_close_amplified(
            out[key],
            golden[f"{name}.{key}"],
            lambda o, key=key: diffusion.p_mean_variance(o, xt.to(o.dtype), index)[key],
            output,
        )
    assert_close_amplified(
        diffusion.ddim_step(output, xt.to(dtype), index),
        golden[f"{name}.ddim_prev"],
        lambda o: diffusion.ddim_step(o, xt.to(o.dtype), index),
        output,
    )


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
