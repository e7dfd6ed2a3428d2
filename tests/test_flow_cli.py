"""SD3 and FLUX through the command line, as a user types it: fit on captioned images with the family's own
defaults, info on the adapter and on a gated alias, sample by prompt, merge, and the one-sentence refusals
(no traceback, nothing written)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from t2i_fixtures import make_captioned_data
from test_flow_families import CASES
from test_sample import run_cli


@pytest.fixture(params=list(CASES), scope="module")
def case(request):
    return CASES[request.param]


@pytest.fixture(scope="module")
def pipeline_dir(case, tmp_path_factory):
    return case.pipeline(tmp_path_factory.mktemp(f"{case.family.name}-cli") / "pipe")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_captioned_data(tmp_path_factory.mktemp("data") / "data", per_caption=2)


def test_fit_info_sample_merge(case, pipeline_dir, data, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    code, out, err = run_cli(
        monkeypatch,
        capsys,
        "fit",
        data,
        "--base",
        pipeline_dir,
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--sample-every",
        "0",
        "--compile",
        "off",
        "--out",
        run,
        "--cache-dir",
        tmp_path / "cache",
        "--timestep-sampling",
        "uniform",
        "--json",
    )
    assert code == 0, err
    assert json.loads(out)["step"] == 2
    code, out, err = run_cli(monkeypatch, capsys, "info", run / "adapter.safetensors", "--json")
    info = json.loads(out)
    assert info["family"] == case.family.name and (info["resolution"], info["latent_size"]) == (16, 8)
    # Each family's own defaults, recorded: SD3 trains the guidance branch, FLUX has none to train.
    assert info["training"]["caption_dropout"] == case.family.caption_dropout
    assert info["training"]["timestep_sampling"] == "uniform"
    code, out, err = run_cli(
        monkeypatch,
        capsys,
        "sample",
        run / "adapter.safetensors",
        "--prompt",
        "a red square",
        "-n",
        "2",
        "--steps",
        "2",
        "--device",
        "cpu",
        "--out",
        tmp_path / "samples",
    )
    assert code == 0, err
    assert len(list((tmp_path / "samples").glob("0*.png"))) == 2  # and grid.png
    code, out, err = run_cli(
        monkeypatch, capsys, "merge", run / "adapter.safetensors", "--out", tmp_path / "merged", "--json"
    )
    assert code == 0, err
    index = json.loads((tmp_path / "merged" / "model_index.json").read_text())
    assert index["_class_name"] == json.loads((pipeline_dir / "model_index.json").read_text())["_class_name"]


@pytest.mark.parametrize(
    "args, words",
    [
        (("fit", "{data}", "--base", "{pipe}", "--snr-gamma", "5"), "--snr-gamma weights the epsilon-prediction loss"),
        (
            ("fit", "{data}", "--base", "{pipe}", "--timestep-sampling", "cosine"),
            "Unknown --timestep-sampling 'cosine'",
        ),
        (("fit", "{data}", "--base", "{pipe}", "--method", "vpt-deep"), "--method vpt-deep is not available on"),
        (
            ("fit", "{data}", "--base", "{pipe}", "--lora-targets", "qkv", "--method", "lora", "--batch-size", "2"),
            "Unknown --lora-targets entry 'qkv'",
        ),
        (("sample", "{pipe}", "--class", "red"), "--class applies to class-conditional (DiT) models"),
        (("sample", "{pipe}", "--prompt", "a cat", "--width", "18"), "--width 18 is not a multiple of 8 px"),
    ],
)
def test_refusals_are_one_sentence(case, pipeline_dir, data, tmp_path, monkeypatch, capsys, args, words):
    values = {"pipe": pipeline_dir, "data": data}
    argv = [a.format(**values) for a in args] + ["--out", str(tmp_path / "out")]
    code, out, err = run_cli(monkeypatch, capsys, *argv)
    assert code == 1 and "Traceback" not in err and words in err, err
    assert not (tmp_path / "out").exists()


def test_negative_prompts_are_refused_on_flux_only(case, pipeline_dir, tmp_path, monkeypatch, capsys):
    code, out, err = run_cli(
        monkeypatch,
        capsys,
        "sample",
        pipeline_dir,
        "--prompt",
        "a cat",
        "--negative-prompt",
        "blurry",
        "-n",
        "1",
        "--steps",
        "1",
        "--device",
        "cpu",
        "--out",
        tmp_path / "out",
    )
    if case.family.negative_prompts:
        assert code == 0, err
    else:
        assert code == 1 and "--negative-prompt has nothing to steer on FLUX bases" in err and "Traceback" not in err
        assert not (tmp_path / "out").exists()


def test_a_gated_alias_is_one_sentence_naming_its_licence_page(case, tmp_path, monkeypatch, capsys):
    """`fit` on an alias whose repo is gated (huggingface_hub raises its gated-repo error, as for an account
    that has not accepted the licence): one sentence with the page, nothing written."""
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    def gated(repo_id, **kwargs):
        raise GatedRepoError(
            f"401 Client Error. Cannot access gated repo for url https://huggingface.co/{repo_id}.",
            response=SimpleNamespace(headers={}, status_code=401, request=None),
        )

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    alias, repo = next((name, a.transformer) for name, a in case.family.kind.aliases.items())
    data = make_captioned_data(tmp_path / "data", per_caption=1)
    code, out, err = run_cli(
        monkeypatch, capsys, "fit", data, "--base", alias, "--batch-size", "2", "--out", tmp_path / "out"
    )
    assert code == 1 and "Traceback" not in err, err
    assert "gated Hub repo" in err and f"https://huggingface.co/{repo}" in err
    assert not (tmp_path / "out").exists()
