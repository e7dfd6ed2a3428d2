"""upscale-res: the positional-encoding trick, moving a base up, fitting, sampling and merging there."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from difffit.engine.errors import DiffFitError
from difffit.engine.evaluation.sample import SamplingOptions, generate
from difffit.engine.methods.merge import merge_adapter
from difffit.engine.methods.sources import load_source
from difffit.engine.models.dit import sincos_pos_embed_2d
from difffit.engine.models.families import load_base
from difffit.engine.models.resolution import move_to_resolution
from difffit.engine.training.config import FitConfig
from difffit.engine.training.train import fit


@pytest.fixture
def base(tiny_base_file, tiny_vae_dir):
    """The tiny base: 8x8 latents, patch 2 (a 4x4 grid), 16 px through the factor-2 VAE."""
    return load_base(str(tiny_base_file), vae=str(tiny_vae_dir))


def test_trick_keeps_the_base_positions_at_even_indices(base):
    original = base.model.pos_embed.detach().clone()
    move_to_resolution(base, 32, "trick")
    assert base.resolution == 32 and base.config.input_size == 16 and base.config.pos_embed_scale == 2.0
    grid = base.model.pos_embed.detach()[0].reshape(8, 8, -1)
    assert torch.equal(grid[::2, ::2].reshape(16, -1), original[0])
    # odd positions are the half-way points the base never saw
    assert not torch.equal(grid[1::2, 1::2].reshape(16, -1), original[0])


def test_plain_is_the_standard_grid(base):
    move_to_resolution(base, 32, "plain")
    expected = sincos_pos_embed_2d(base.config.hidden_size, 8)
    assert torch.equal(base.model.pos_embed.detach()[0], expected)
    assert base.config.pos_embed_scale == 1.0


@pytest.mark.parametrize("target,message", [(30, "multiple of 4"), (16, "not larger"), (8, "not larger")])
def test_bad_targets_are_refused(base, target, message):
    with pytest.raises(DiffFitError, match=message):
        move_to_resolution(base, target)


def test_unknown_mode_is_refused(base):
    with pytest.raises(DiffFitError, match="positional-embedding mode"):
        move_to_resolution(base, 32, "stretch")


def test_upscaled_fit_samples_and_merges_at_the_new_size(tmp_path, toy_data, tiny_base_file, tiny_vae_dir):
    config = FitConfig(
        data=str(toy_data),
        base=str(tiny_base_file),
        vae=str(tiny_vae_dir),
        resolution=32,
        pos_embed="trick",
        steps=3,
        batch_size=4,
        save_every=0,
        sample_every=0,
        num_workers=0,
        cache_dir=str(tmp_path / "cache"),
        out=str(tmp_path / "run"),
        adapter_dtype="fp32",
    )
    result = fit(config, progress=False)  # moves the 16 px base to 32 px with the trick
    base = load_base(str(tiny_base_file), vae=str(tiny_vae_dir))
    move_to_resolution(base, 32, "trick")

    adapted, meta = load_source(str(result.adapter))
    assert (meta.resolution, meta.latent_size, meta.pos_embed, meta.pos_embed_scale) == (32, 16, "trick", 2.0)
    assert adapted.model.pos_embed.shape[1] == 64
    torch.testing.assert_close(adapted.model.pos_embed, base.model.pos_embed, atol=0, rtol=0)

    images = generate(adapted, 2, SamplingOptions(scheduler="ddim", steps=3, batch_size=2), progress=False)
    assert images.shape == (2, 32, 32, 3) and images.dtype == torch.uint8

    merged_path = tmp_path / "merged.safetensors"
    merge_adapter(str(result.adapter), merged_path)
    merged = load_base(str(merged_path), vae=str(tiny_vae_dir))
    assert merged.resolution == 32 and merged.config.pos_embed_scale == 2.0
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([10, 700]), torch.tensor([0, 1])
    with torch.no_grad():
        torch.testing.assert_close(merged.model(x, t, y), adapted.model(x, t, y), atol=1e-5, rtol=0)


def test_cli_refuses_a_smaller_target_in_one_sentence(tmp_path, toy_data, tiny_base_file, tiny_vae_dir):
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "difffit",
            "upscale-res",
            str(toy_data),
            "--base",
            str(tiny_base_file),
            "--vae",
            str(tiny_vae_dir),
            "--to",
            "8",
            "--batch-size",
            "4",
            "--out",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1
    assert "not larger than the base's 16 px" in run.stderr
    assert "Traceback" not in run.stderr


def test_cli_needs_a_target(tmp_path, toy_data, tiny_base_file):
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "difffit",
            "upscale-res",
            str(toy_data),
            "--base",
            str(tiny_base_file),
            "--out",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1 and "needs a target resolution" in run.stderr and "Traceback" not in run.stderr
