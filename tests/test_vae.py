"""The autoencoder wrapper: scaled latents, identity, local folders, hub ids through the cache."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import make_tiny_vae

from difffit.engine.errors import DiffFitError
from difffit.engine.models.bases import Base
from difffit.engine.models.dit import DiT, DiTConfig
from difffit.engine.models.vae import DEFAULT_VAE, IdentityAutoencoder, load_vae, vae_geometry


def test_identity_round_trip():
    vae = load_vae("identity")
    assert isinstance(vae, IdentityAutoencoder)
    assert (vae.spec, vae.factor, vae.latent_channels) == ("identity", 1, 3)
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    mean, std = vae.encode(images)
    assert torch.equal(mean, images) and torch.count_nonzero(std) == 0
    assert torch.equal(vae.decode(mean), images)
    assert vae.to("cpu", torch.float16) is vae


def test_tiny_folder_encodes_scaled_latents(tiny_vae_dir):
    vae = load_vae(str(tiny_vae_dir))
    raw = make_tiny_vae()  # the same weights, unwrapped
    assert (vae.factor, vae.latent_channels) == (2, 4)
    assert vae.scaling_factor == raw.config.scaling_factor == 0.18215
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    mean, std = vae.encode(images)
    assert mean.shape == std.shape == (2, 4, 8, 8)
    with torch.no_grad():
        dist = raw.encode(images).latent_dist
        decoded = raw.decode(mean / 0.18215).sample
    torch.testing.assert_close(mean, dist.mean * 0.18215)
    torch.testing.assert_close(std, dist.std * 0.18215)
    out = vae.decode(mean)
    assert out.shape == (2, 3, 16, 16)
    torch.testing.assert_close(out, decoded)
    assert not any(p.requires_grad for p in vae.vae.parameters())


def test_shift_factor_is_applied(tmp_path):
    raw = make_tiny_vae()
    raw.register_to_config(shift_factor=0.5)
    raw.save_pretrained(tmp_path / "shifted")
    vae = load_vae(str(tmp_path / "shifted"))
    images = torch.rand(1, 3, 16, 16) * 2 - 1
    mean, _ = vae.encode(images)
    with torch.no_grad():
        expected = (raw.encode(images).latent_dist.mean - 0.5) * 0.18215
    torch.testing.assert_close(mean, expected)
    with torch.no_grad():
        torch.testing.assert_close(vae.decode(mean), raw.decode(mean / 0.18215 + 0.5).sample)


def test_pipeline_folder_uses_its_vae(tiny_vae_dir, tmp_path):
    shutil.copytree(tiny_vae_dir, tmp_path / "pipe" / "vae")
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    assert load_vae(str(tmp_path / "pipe")).factor == 2


def test_geometry_without_weights(tiny_vae_dir):
    assert vae_geometry("identity") == (1, 3)
    assert vae_geometry(DEFAULT_VAE) == (8, 4)  # known: no download, even offline
    assert vae_geometry(str(tiny_vae_dir)) == (2, 4)


def test_bad_vae_specs(tmp_path):
    expected = "neither 'identity', a diffusers AutoencoderKL folder, nor a hub id"
    with pytest.raises(DiffFitError, match=expected):
        load_vae("./no/such/vae")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(DiffFitError, match="holds a UNet2DModel model, not an AutoencoderKL"):
        load_vae(str(tmp_path / "unet"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DiffFitError, match="no readable config.json"):
        load_vae(str(tmp_path / "empty"))


def test_hub_vae_offline_says_what_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with pytest.raises(DiffFitError) as error:
        load_vae("stabilityai/sd-vae-ft-mse")
    message = error.value.message
    assert "hf download stabilityai/sd-vae-ft-mse" in message
    assert str(tmp_path / "hf" / "hub") in message and "--vae a local AutoencoderKL folder" in message


def test_base_vae_is_lazy_and_checks_channels(tiny_vae_dir):
    model = DiT(DiTConfig(input_size=8, hidden_size=32, depth=1, num_heads=2, num_classes=3)).eval()
    base = Base(model, "test", "random", "0" * 16, "identity", vae_factor=1)
    assert base._vae is None  # nothing loaded until asked
    with pytest.raises(DiffFitError, match="3-channel latents but the base test expects 4"):
        base.vae()
    base = Base(model, "test", "random", "0" * 16, str(tiny_vae_dir), vae_factor=2)
    assert base.vae() is base.vae()  # loaded once, then cached
