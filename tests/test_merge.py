"""`difffit merge`: folded models in both formats match the adapter applied to its base."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_adapter import T, X, outputs, train, write_base
from typer.testing import CliRunner

from difffit.cli import app
from difffit.engine.methods.adapter import save_adapter
from difffit.engine.methods.merge import merge_adapter
from difffit.engine.methods.sources import load_source
from difffit.engine.models.families import load_base


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_vae_dir):
    """A trained 4-class difffit adapter (fp32) on a 10-class 4-block DiT-S/2 base with the tiny VAE."""
    folder = tmp_path_factory.mktemp("merge")
    base_spec = write_base(folder / "base.safetensors", tiny_vae_dir)
    base, trained, meta = train(base_spec, scale=0.1)
    save_adapter(folder / "adapter.safetensors", trained, base.model.state_dict(), meta, dtype="fp32")
    return str(folder / "adapter.safetensors")


def test_original_merge_is_a_base_with_the_same_outputs(adapter, tmp_path):
    applied, _ = load_source(adapter)
    out = tmp_path / "merged.safetensors"
    summary = merge_adapter(adapter, out)
    assert summary["format"] == "original" and summary["bytes"] == out.stat().st_size
    merged = load_base(str(out))
    assert merged.model.gamma_blocks == [] and merged.config.num_classes == 4
    assert merged.class_names == applied.class_names == [f"class{i}" for i in range(4)]
    assert merged.vae_spec == applied.vae_spec and merged.resolution == 16
    torch.testing.assert_close(outputs(merged.model, 4), outputs(applied.model, 4), atol=1e-5, rtol=1e-5)
    # gamma really was folded: the merged weights differ from the base's where gamma != 1.
    assert not torch.equal(merged.model.blocks[0].attn.proj.weight, applied.model.blocks[0].attn.proj.weight)


def test_diffusers_merge_matches_and_runs_in_dit_pipeline(adapter, tmp_path):
    from diffusers import DiTPipeline

    applied, _ = load_source(adapter)
    folder = tmp_path / "pipeline"
    merge_adapter(adapter, folder, fmt="diffusers")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "DiTPipeline" and index["id2label"]["3"] == "class3"

    # Read back with the reference numerics: same outputs; null label moved to DiTPipeline's 1000.
    merged = load_base(str(folder))
    assert merged.config.num_classes == 1000 and merged.class_names[:4] == applied.class_names
    table = merged.model.y_embedder.embedding_table.weight
    assert torch.equal(table[4:], table[1000].expand(997, -1))
    y_applied, y_merged = torch.tensor([0, 3, 4]), torch.tensor([0, 3, 1000])
    with torch.no_grad():
        expected = applied.model(X, T, y_applied)
        torch.testing.assert_close(merged.model(X, T, y_merged), expected, atol=1e-5, rtol=1e-5)

    pipe = DiTPipeline.from_pretrained(folder)
    assert pipe.labels["class2"] == 2
    images = pipe(
        class_labels=[0, 3],
        num_inference_steps=2,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()


def test_merge_cli_json_and_force_base(adapter, tmp_path, tiny_vae_dir):
    other = write_base(tmp_path / "other.safetensors", tiny_vae_dir, seed=3)
    runner = CliRunner()
    out = str(tmp_path / "m.safetensors")
    refused = runner.invoke(app, ["merge", adapter, "--base", other, "--out", out])
    assert refused.exit_code != 0 and "fingerprint" in str(refused.exception)
    assert not (tmp_path / "m.safetensors").exists()
    forced = runner.invoke(app, ["merge", adapter, "--base", other, "--force-base", "--json", "--out", out])
    assert forced.exit_code == 0, forced.output
    summary = json.loads(forced.stdout)
    assert summary["base"] == other and summary["num_classes"] == 4
    assert summary["gamma_blocks_folded"] == [0, 1]
    assert load_base(out).config.num_classes == 4
