"""Shared fixtures: the golden reference vectors and tiny random models. Nothing here downloads."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# Tests must never reach the network, and must not write into the user's caches.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFFIT_NO_DOWNLOAD", "1")

# shared/ sits beside the checkout; DIFFFIT_GOLDEN points elsewhere (e.g. on a GPU machine).
GOLDEN = Path(
    os.environ.get(
        "DIFFFIT_GOLDEN",
        Path(__file__).resolve().parents[1].parent / "shared" / "golden" / "dit_reference_small.safetensors",
    )
)


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.getbasetemp() / "cache"
    monkeypatch.setenv("DIFFFIT_CACHE", str(cache / "difffit"))
    monkeypatch.setenv("HF_HOME", str(cache / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(cache / "torch"))


@pytest.fixture(scope="session")
def golden() -> dict:
    """Reference DiT outputs: {'config': dict, 'state': state dict, 'fwd.x': ..., ...}."""
    from safetensors import safe_open

    if not GOLDEN.exists():
        pytest.fail(f"golden vectors not found at {GOLDEN}; the test suite needs shared/ beside the checkout")
    with safe_open(str(GOLDEN), "pt") as f:
        out = {"config": json.loads(f.metadata()["config"]), "state": {}}
        for key in f.keys():
            if key.startswith("state."):
                out["state"][key[len("state.") :]] = f.get_tensor(key)
            else:
                out[key] = f.get_tensor(key)
    return out


@pytest.fixture(scope="session")
def golden_model(golden):
    from difffit.engine.models.dit import DiT, DiTConfig

    model = DiT(DiTConfig(**golden["config"])).eval()
    model.load_state_dict(golden["state"])
    return model


# Two correct float32 runs of the golden model (another CPU, another BLAS kernel) agree to this, element
# by element: test_dit checks our forward against the reference's at exactly this tolerance.
MODEL_ATOL = 1e-5


def assert_close_amplified(
    actual: torch.Tensor, expected: torch.Tensor, formula, model_output: torch.Tensor, atol: float = MODEL_ATOL
) -> None:
    """`actual` = `formula(model_output)` matches the reference's float32 value, within the model's rounding
    times what the formula amplifies it by, plus the formula's own rounding.

    A formula of the output multiplies the model's float32 rounding by its derivative: pred_xstart =
    sqrt(1/abar) x_t - sqrt(1/abar - 1) eps scales eps's rounding by ~157 at t = 999, so a fixed 1e-5 holds
    on one machine and fails on the next. Element i may therefore differ by
    - atol * (1 + sum_j |d f_i / d o_j|): atol on each output element o_j times the formula's sensitivity to
      it (exact: autograd in float64), and atol once more;
    - plus twice the formula's own float32 rounding, measured here against float64 on the same output: the
      reference rounded the same operations at the same precision, and the two roundings may add up. It
      matters where a formula cancels, as the decoder likelihood at t = 0 does (cdf_plus - cdf_min).
    No number here is picked until the test passes. `formula(o)` must compute in o's dtype (cast its other
    inputs to `o.dtype`).
    """
    output = model_output.detach()
    jacobian = torch.autograd.functional.jacobian(formula, output.double(), vectorize=True)
    amplification = jacobian.abs().reshape(actual.numel(), -1).sum(dim=1).reshape(actual.shape)
    with torch.no_grad():
        rounding = (formula(output.float()).double() - formula(output.double())).abs()
    tolerance = atol * (1 + amplification) + 2 * rounding
    diff = (actual.double() - expected.double()).abs()
    worst = int((diff / tolerance).argmax())
    assert (diff <= tolerance).all(), (
        f"{(diff > tolerance).sum()} of {diff.numel()} elements differ by more than their tolerance; worst: "
        f"{diff.flatten()[worst]:.3g} against {tolerance.flatten()[worst]:.3g} "
        f"(amplification {amplification.flatten()[worst]:.3g}, float32 rounding {rounding.flatten()[worst]:.3g})"
    )


def assert_loss_matches_reference(golden: dict, model, device: str = "cpu", atol: float = MODEL_ATOL) -> None:
    """The hybrid loss's terms (`training_losses`, run on `device`) on the golden batch equal the reference's."""
    from difffit.engine.models.diffusion import GaussianDiffusion

    diffusion = GaussianDiffusion()
    x0, t, noise = (golden[f"loss.{key}"].to(device) for key in ("x0", "t", "noise"))
    xt = diffusion.q_sample(x0, t, noise)
    with torch.no_grad():
        output = model(xt, diffusion.original_timesteps(t), golden["loss.y"].to(device))
    out = diffusion.training_losses(lambda *_: output, x0, t, noise)

    def term(name: str, o: torch.Tensor) -> torch.Tensor:
        # Undetached: the VB term trains no eps, but its value still moves with eps's rounding.
        mse = diffusion.training_losses(lambda *_: o, x0.to(o), t.to(o.device), noise.to(o))["mse"]
        vb = diffusion.vb_terms_bpd(o, x0.to(o), xt.to(o), t.to(o.device))
        return {"mse": mse, "vb": vb, "loss": mse + vb}[name]

    for name in ("loss", "mse", "vb"):
        assert_close_amplified(
            out[name].cpu(), golden[f"loss.{name}"], lambda o, name=name: term(name, o), output.cpu(), atol
        )


def guidance_atol(scale: float, atol: float = MODEL_ATOL) -> float:
    """Guided eps = (1 - s) uncond + s cond adds up both outputs' rounding: atol * (|1 - s| + |s|)."""
    return atol * (abs(1 - scale) + abs(scale))


@pytest.fixture
def seeded():
    torch.manual_seed(0)
    return 0


def make_tiny_vae(seed: int = 0):
    """A 2-level diffusers AutoencoderKL: 4 latent channels, downsampling factor 2, ~44k parameters."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    ).eval()


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory) -> Path:
    """A local diffusers AutoencoderKL folder (factor 2: 16 px images <-> 8x8 latents)."""
    path = tmp_path_factory.mktemp("tiny_vae")
    make_tiny_vae().save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def _one_thread():
    # The test machine's cores are shared; one intra-op thread is many times faster under contention.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_base_file(tmp_path_factory) -> Path:
    """A 2-block DiT (width 384, MLP ratio 1, 8x8x4 latents, 10 classes) saved in the original layout.

    The reference init zeroes the adaLN and output weights, which would leave DiffFit's biases almost
    nothing to steer; small random values stand in for pre-trained weights.
    """
    from safetensors.torch import save_file

    from difffit.engine.models.dit import DiT, DiTConfig

    torch.manual_seed(0)
    model = DiT(
        DiTConfig(
            input_size=8,
            patch_size=2,
            in_channels=4,
            hidden_size=384,
            depth=2,
            num_heads=6,
            mlp_ratio=1.0,
            num_classes=10,
        )
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1 and ("adaLN" in name or "final_layer.linear" in name):
                p.normal_(0, 0.02)
    path = tmp_path_factory.mktemp("base") / "tiny_base.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def make_toy_data(root: Path, per_class: int = 6) -> Path:
    """Two classes of flat-coloured images with a little noise: easy to learn."""
    rng = np.random.default_rng(0)
    for cls, channel in (("blue", 2), ("red", 0)):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 30, (20, 24, 3), dtype=np.uint8)
            pixels[..., channel] = 220
            Image.fromarray(pixels).save(root / cls / f"{i}.png")
    return root


@pytest.fixture
def toy_data(tmp_path) -> Path:
    return make_toy_data(tmp_path / "data")


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """`difffit ARGS` in this process, through main() (the real error handling): (exit code, out, err)."""
    import sys

    from difffit.cli import main

    monkeypatch.setattr(sys, "argv", ["difffit", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out, err = capsys.readouterr()
    return code, out, err
