"""The PixArt workflow through the command line, as a user types it: fit on captioned images, info, sample by
prompt, merge, and the one-sentence refusals (no traceback, nothing written)."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli
from t2i_fixtures import make_captioned_data, make_tiny_pixart


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return make_tiny_pixart(tmp_path_factory.mktemp("pixart-cli") / "pipe")


def test_fit_info_sample_merge(pipeline_dir, tmp_path, monkeypatch, capsys):
    data = make_captioned_data(tmp_path / "data")
    run = tmp_path / "run"
    code, out, err = run_cli(
        monkeypatch,
        capsys,
        "fit",
        data,
        "--base",
        pipeline_dir,
        "--steps",
        "3",
        "--batch-size",
        "4",
        "--sample-every",
        "0",
        "--compile",
        "off",
        "--out",
        run,
        "--cache-dir",
        tmp_path / "cache",
        "--validation-prompt",
        "a red square",
        "--json",
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["step"] == 3 and result["images"] == 12
    code, out, err = run_cli(monkeypatch, capsys, "info", run / "adapter.safetensors", "--json")
    info = json.loads(out)
    assert info["family"] == "pixart" and info["method"] == "difffit" and info["training"]["captions"] == 2
    code, out, err = run_cli(monkeypatch, capsys, "info", pipeline_dir, "--method", "lora")
    assert code == 0 and "What lora trains" in err and "lora" in err
    code, out, err = run_cli(
        monkeypatch,
        capsys,
        "sample",
        run / "adapter.safetensors",
        "--prompt",
        "a red square",
        "--prompt",
        "a blue square",
        "-n",
        "3",
        "--steps",
        "2",
        "--device",
        "cpu",
        "--out",
        tmp_path / "samples",
    )
    assert code == 0, err
    assert json.loads((tmp_path / "samples" / "sample.json").read_text())["prompts"][1] == "a blue square"
    code, out, err = run_cli(
        monkeypatch, capsys, "merge", run / "adapter.safetensors", "--out", tmp_path / "merged", "--json"
    )
    assert code == 0, err
    assert json.loads(out)["format"] == "diffusers" and (tmp_path / "merged" / "model_index.json").is_file()


@pytest.mark.parametrize(
    "args, words",
    [
        (("sample", "{pipe}", "--class", "red"), "--class applies to class-conditional (DiT) models"),
        (("sample", "{pipe}", "--prompts", "{missing}"), "Cannot read the prompts file"),
        (
            ("fit", "{data}", "--base", "{pipe}", "--method", "adapter-parallel"),
            "--method adapter-parallel is not available on PixArt bases",
        ),
        (("upscale-res", "{data}", "--base", "{pipe}", "--to", "32"), "upscale-res moves DiT's fixed positional"),
        (("info", "{pipe}", "--method", "difffit", "--num-classes", "3"), "--num-classes applies to class-conditional"),
        (
            ("fit", "{data}", "--base", "{pipe}", "--mixed-precision", "fp8"),
            "--mixed-precision fp8 needs an NVIDIA GPU",
        ),
    ],
)
def test_refusals_are_one_sentence(pipeline_dir, tmp_path, monkeypatch, capsys, args, words):
    data = make_captioned_data(tmp_path / "data")
    values = {"pipe": pipeline_dir, "data": data, "missing": tmp_path / "none.txt"}
    argv = [a.format(**values) for a in args] + ["--out", str(tmp_path / "out")] * (
        args[0] in ("sample", "fit", "upscale-res")
    )
    code, out, err = run_cli(monkeypatch, capsys, *argv)
    assert code == 1 and "Traceback" not in err and words in err, err
    assert not (tmp_path / "out").exists()


def test_an_adapter_of_one_family_on_a_base_of_the_other_is_one_sentence(
    pipeline_dir, tiny_base_file, tmp_path, monkeypatch, capsys
):
    from test_pixart import trained_adapter

    from difffit.engine.methods.adapter import make_meta, save_adapter
    from difffit.engine.methods.trainable import prepare_model
    from difffit.engine.models.families import load_base

    trained_adapter(pipeline_dir, tmp_path / "pixart.safetensors")
    dit = load_base(str(tiny_base_file))
    state = {n: p.detach().clone() for n, p in dit.model.named_parameters()}
    prepare_model(dit.model, "difffit")
    save_adapter(tmp_path / "dit.safetensors", dit.model, state, make_meta(dit, dit.model, "difffit"))
    for adapter, base, words in (
        (tmp_path / "pixart.safetensors", tiny_base_file, "is a PixArt adapter, and"),
        (tmp_path / "dit.safetensors", pipeline_dir, "is a DiT adapter, and"),
    ):
        for command in (
            ("sample", adapter, "--base", base, "--out", tmp_path / "out"),
            ("merge", adapter, "--base", base, "--out", tmp_path / "out"),
        ):
            code, out, err = run_cli(monkeypatch, capsys, *command)
            assert code == 1 and "Traceback" not in err and words in err, err
            assert not (tmp_path / "out").exists()
