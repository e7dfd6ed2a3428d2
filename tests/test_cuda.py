"""CUDA checks, run by benchmarks/gpu_check.sh on a GPU machine. On a machine without CUDA they are
reported as skipped (visibly, with the reason); CI has no GPU."""

import pytest
import torch
from conftest import assert_loss_matches_reference

from difffit.engine.models.dit import DiT

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: run benchmarks/gpu_check.sh")


@pytest.fixture
def cuda_model(golden_model):
    model = DiT(golden_model.config).eval()
    model.load_state_dict(golden_model.state_dict())
    return model.cuda()


def test_forward_matches_reference_on_cuda(golden, cuda_model):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    with torch.no_grad():
        out = cuda_model(golden["fwd.x"].cuda(), golden["fwd.t"].cuda(), golden["fwd.y"].cuda())
    torch.testing.assert_close(out.cpu(), golden["fwd.out"], atol=1e-4, rtol=0)


def test_loss_matches_reference_on_cuda(golden, cuda_model):
    assert_loss_matches_reference(golden, cuda_model, device="cuda", atol=1e-4)  # the forward's CUDA tolerance


def test_bf16_autocast_is_close(golden, cuda_model):
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        out = cuda_model(golden["fwd.x"].cuda(), golden["fwd.t"].cuda(), golden["fwd.y"].cuda())
    assert (out.float().cpu() - golden["fwd.out"]).abs().max() < 0.1


def test_gradient_checkpointing_on_cuda(golden, cuda_model):
    cuda_model.train().set_gradient_checkpointing(True)
    out = cuda_model(golden["fwd.x"].cuda(), golden["fwd.t"].cuda(), golden["fwd.y"].cuda())
    out.square().mean().backward()
    assert all(p.grad is not None for p in cuda_model.parameters() if p.requires_grad)


def test_resume_is_exact_with_device_side_randomness(tmp_path, toy_data, tiny_base_file, tiny_vae_dir):
    """Timesteps and noise come from a CUDA generator seeded per (seed, step, rank): a run resumed from a
    checkpoint draws what an uninterrupted run draws (fp32, compile off, so the numbers are comparable)."""
    from safetensors.torch import load_file
    from test_train import config

    from difffit.engine.training.train import fit

    def run(name, steps, **extra):
        return fit(
            config(
                tmp_path,
                toy_data,
                tiny_base_file,
                tiny_vae_dir,
                steps=steps,
                save_every=2,
                device="cuda",
                mixed_precision="no",
                compile="off",
                out=str(tmp_path / name),
                **extra,
            ),
            progress=False,
        )

    full = run("full", 4)
    run("half", 2)
    resumed = run("half", 4, resume=True)
    a, b = load_file(str(full.adapter)), load_file(str(resumed.adapter))
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)
