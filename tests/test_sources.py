"""engine/methods/sources.py: the inputs of sample / info / merge / eval-fid, used from Python."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_adapter import train, write_base

from difffit.engine.errors import DiffFitError
from difffit.engine.evaluation.sample import SamplingOptions
from difffit.engine.evaluation.sample_folder import load_pngs
from difffit.engine.methods.adapter import save_adapter
from difffit.engine.methods.sources import describe_source, sample_sources, source_name, unique_names

FAST = SamplingOptions(scheduler="ddim", steps=2, batch_size=2, device="cpu")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_vae_dir):
    root = tmp_path_factory.mktemp("sources")
    base_spec = write_base(root / "base.safetensors", tiny_vae_dir)
    base, trained, meta = train(base_spec)
    path = root / "run" / "adapter.safetensors"
    path.parent.mkdir()
    save_adapter(path, trained, base.model.state_dict(), meta)
    return path


def test_folder_names_for_sources(tmp_path):
    run = tmp_path / "food101-difffit"
    run.mkdir()
    (run / "adapter.safetensors").touch()
    (tmp_path / "birds.safetensors").touch()
    assert source_name(str(run / "adapter.safetensors")) == "food101-difffit"
    assert source_name(str(tmp_path / "birds.safetensors")) == "birds"
    assert source_name("DiT-XL/2-256") == "DiT-XL-2-256"
    assert unique_names(["random:DiT-S/2", "random:DiT-S/2"]) == ["random-DiT-S-2", "random-DiT-S-2-2"]


def test_describe_base_with_a_method_names_the_adapted_model(tiny_base_file):
    plain = describe_source(str(tiny_base_file))
    report = describe_source(str(tiny_base_file), method="difffit", num_classes=3, gamma_blocks="all")
    assert report["kind"] == "base" and report["method"] == "difffit"
    assert report["num_classes"] == 10 and report["target_num_classes"] == 3  # the base's, the target's
    assert report["total_params"] == plain["total_params"]  # the base itself is unchanged
    # 3 + 1 class rows instead of 10 + 1, and two gamma vectors in each of the 2 blocks (width 384)
    assert report["adapted_total_params"] == plain["total_params"] - 7 * 384 + 2 * 2 * 384
    assert report["trainable_percent"] == pytest.approx(
        100 * report["trainable_params"] / (report["adapted_total_params"])
    )


def test_describe_adapter_checks_a_base_and_refuses_method_options(adapter):
    report = describe_source(str(adapter), base=describe_source(str(adapter))["base"])
    assert report["kind"] == "adapter" and report["checked_base_matches"] is True
    with pytest.raises(DiffFitError, match="apply to bases, not adapters"):
        describe_source(str(adapter), method="bitfit")


def test_sample_sources_writes_folders_and_sample_json(adapter, tiny_base_file, tiny_vae_dir, tmp_path):
    sources = [str(adapter), str(tiny_base_file)]
    summary = sample_sources(
        sources, 3, FAST, out=tmp_path / "out", classes=["1"], vae=str(tiny_vae_dir), progress=False
    )
    assert [o["source"] for o in summary["outputs"]] == sources
    assert [o["dir"] for o in summary["outputs"]] == [str(tmp_path / "out" / n) for n in ("run", "tiny_base")]
    assert (summary["n"], summary["steps"], summary["processes"]) == (3, 2, 1)
    folder = tmp_path / "out" / "run"
    settings = json.loads((folder / "sample.json").read_text())
    assert settings["source"] == str(adapter) and settings["adapter"]["method"] == "difffit"
    assert settings["classes"] == [1] and settings["scheduler"] == "ddim" and settings["steps"] == 2
    assert load_pngs(sorted(folder.glob("0*.png"))).shape == (3, 16, 16, 3)
    base_settings = json.loads((tmp_path / "out" / "tiny_base" / "sample.json").read_text())
    assert base_settings["adapter"] is None and base_settings["base"] == str(tiny_base_file)


def test_one_source_goes_to_out_itself(adapter, tmp_path):
    summary = sample_sources([str(adapter)], 2, FAST, out=tmp_path / "one", progress=False)
    assert summary["outputs"][0]["dir"] == str(tmp_path / "one")
    images = load_pngs(sorted((tmp_path / "one").glob("0*.png")))
    assert images.dtype == np.uint8 and (tmp_path / "one" / "sample.json").exists()
