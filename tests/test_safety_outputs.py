"""Never lose a user's data through merge and sample outputs; non-finite values; one-sentence messages."""

from __future__ import annotations

import errno
import json
import shutil

import pytest
from conftest import run_cli
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_merge import adapter  # noqa: F401 - the module-scoped trained adapter fixture
from test_sample import FAST, adapters, base_file  # noqa: F401 - fixtures

from difffit.engine.errors import DiffFitError
from difffit.engine.io import atomic_path
from difffit.engine.methods.adapter import read_adapter, tensors_checksum
from difffit.engine.methods.merge import merge_adapter


@pytest.fixture
def run_folder(tmp_path, adapter):  # noqa: F811
    """A run folder as `fit` leaves it, with a user's own notes in it."""
    folder = tmp_path / "run"
    folder.mkdir()
    shutil.copy(adapter, folder / "adapter.safetensors")
    (folder / "checkpoints").mkdir()
    (folder / "notes.txt").write_text("my notes")
    return folder


def test_diffusers_merge_never_deletes_an_existing_folder(run_folder, tmp_path):
    adapter_file = run_folder / "adapter.safetensors"
    before = sorted(p.name for p in run_folder.iterdir())
    for overwrite in (False, True):  # the folder holds the input: refused even with --overwrite
        with pytest.raises(DiffFitError, match="an input is never an output"):
            merge_adapter(str(adapter_file), run_folder, fmt="diffusers", overwrite=overwrite)
    assert sorted(p.name for p in run_folder.iterdir()) == before
    other = tmp_path / "docs"
    other.mkdir()
    (other / "paper.txt").write_text("draft")
    with pytest.raises(DiffFitError, match="already exists"):
        merge_adapter(str(adapter_file), other, fmt="diffusers")
    with pytest.raises(DiffFitError, match="not written by difffit"):
        merge_adapter(str(adapter_file), other, fmt="diffusers", overwrite=True)
    assert (other / "paper.txt").read_text() == "draft"
    # A pipeline difffit wrote may be replaced with --overwrite.
    pipeline = tmp_path / "pipeline"
    merge_adapter(str(adapter_file), pipeline, fmt="diffusers")
    with pytest.raises(DiffFitError, match="already exists"):
        merge_adapter(str(adapter_file), pipeline, fmt="diffusers")
    merge_adapter(str(adapter_file), pipeline, fmt="diffusers", overwrite=True)
    assert (pipeline / "model_index.json").is_file()


def test_diffusers_merge_into_the_current_folder_is_refused(run_folder, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "thesis.tex").write_text("years of work")
    monkeypatch.chdir(work)
    code, _, err = run_cli(
        monkeypatch,
        capsys,
        "merge",
        run_folder / "adapter.safetensors",
        "--format",
        "diffusers",
        "--out",
        ".",
        "--overwrite",
    )
    assert code == 1 and "not written by difffit" in err.replace("\n", " ")
    assert [p.name for p in work.iterdir()] == ["thesis.tex"]


def test_merge_to_a_file_never_replaces_an_input_or_an_unasked_file(run_folder, tmp_path):
    adapter_file = run_folder / "adapter.safetensors"
    original = adapter_file.read_bytes()
    for overwrite in (False, True):
        with pytest.raises(DiffFitError, match="an input is never an output"):
            merge_adapter(str(adapter_file), adapter_file, overwrite=overwrite)
    assert adapter_file.read_bytes() == original
    existing = tmp_path / "merged.safetensors"
    existing.write_bytes(b"an older model")
    with pytest.raises(DiffFitError, match="already exists"):
        merge_adapter(str(adapter_file), existing)
    assert existing.read_bytes() == b"an older model"
    with pytest.raises(DiffFitError, match="not written by difffit"):  # --overwrite replaces difffit's files only
        merge_adapter(str(adapter_file), existing, overwrite=True)
    assert existing.read_bytes() == b"an older model"
    merged = tmp_path / "merged-by-difffit.safetensors"
    merge_adapter(str(adapter_file), merged)
    merge_adapter(str(adapter_file), merged, overwrite=True)
    assert merged.stat().st_size > 1000


def test_run_folder_given_as_a_model_names_its_adapter(monkeypatch, capsys, run_folder, tmp_path):
    for command in (
        ["sample", str(run_folder), *FAST],
        ["merge", str(run_folder), "--out", str(tmp_path / "m")],
        ["info", str(run_folder)],
    ):
        code, _, err = run_cli(monkeypatch, capsys, *command)
        assert code == 1 and "Traceback" not in err, err
        flat = err.replace("\n", "")  # rich wraps long paths mid-word
        assert "training run folder" in flat and "run/adapter.safetensors" in flat, err


def test_nan_options_and_adapters_are_refused(monkeypatch, capsys, adapters, tmp_path):  # noqa: F811
    code, out, err = run_cli(
        monkeypatch, capsys, "sample", adapters[0], *FAST, "--cfg-scale", "nan", "--out", tmp_path / "s", "--json"
    )
    assert code == 1 and out == "" and "--cfg-scale must be a finite number" in err.replace("\n", " ")
    assert not (tmp_path / "s").exists()
    tensors = load_file(adapters[0])
    name = sorted(tensors)[0]
    tensors[name][0] = float("nan")
    broken = tmp_path / "broken.safetensors"
    with safe_open(adapters[0], "pt") as reader:  # keep the original header metadata
        metadata = reader.metadata()
    # As a diverged training run writes it: NaN stored, and the checksum of what is stored.
    meta = json.loads(metadata["difffit"]) | {"checksum": tensors_checksum(tensors)}
    save_file(tensors, str(broken), metadata={"difffit": json.dumps(meta)})
    with pytest.raises(DiffFitError, match="NaN or inf"):
        read_adapter(broken)
    code, _, err = run_cli(monkeypatch, capsys, "sample", broken, *FAST, "--out", tmp_path / "s2")
    assert code == 1 and "NaN or inf" in err.replace("\n", " ") and not (tmp_path / "s2").exists()
    code, out, err = run_cli(monkeypatch, capsys, "info", broken, "--json")
    assert code == 0 and json.loads(out)["non_finite_tensors"] == [name]
    code, _, err = run_cli(monkeypatch, capsys, "info", broken)
    assert "Unusable" in err


def test_every_json_output_is_strict(monkeypatch, capsys, adapters, tmp_path):  # noqa: F811
    code, out, err = run_cli(
        monkeypatch, capsys, "sample", adapters[0], *FAST, "-n", "1", "--out", tmp_path / "s", "--json"
    )
    assert code == 0, err
    json.loads(out, parse_constant=lambda word: pytest.fail(f"non-strict JSON constant {word}"))
    json.loads(
        (tmp_path / "s" / "sample.json").read_text(),
        parse_constant=lambda word: pytest.fail(f"non-strict JSON constant {word}"),
    )
    assert "Wrote 1 image to" in err.replace("\n", " ")


def test_disk_full_and_permission_problems_are_one_sentence(tmp_path, monkeypatch):
    target = tmp_path / "out" / "model.safetensors"
    with pytest.raises(DiffFitError, match=f"disk is full while writing {target}"), atomic_path(target):
        raise RuntimeError("[enforce fail at inline_container.cc:778] . unexpected pos 123 vs 456")
    with pytest.raises(DiffFitError, match="disk is full"), atomic_path(target):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert not any(p.name.startswith(".tmp-") for p in target.parent.iterdir())

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "locked"))

    monkeypatch.setattr("tempfile.mkstemp", refuse)  # as root, a folder's mode would not stop the write
    with pytest.raises(DiffFitError, match="Permission denied writing"), atomic_path(tmp_path / "locked" / "x"):
        pass


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["fit", "{data}", "--base", "random:DiT-S/2", "--resolution", "0"], "--resolution must be 1 or more"),
        (["upscale-res", "{data}", "--base", "random:DiT-S/2", "--to", "100000"], "largest supported resolution"),
        (["fit", "{data}", "--base", "random:DiT-S/2", "--seed", "-5"], "--seed must be 0 or more"),
        (["sample", "random:DiT-S/2", "--seed", "-5"], "--seed must be 0 or more"),
        (["fit", "{data}", "--base", "random:DiT-S/2", "--adapter-dtype", "int8"], "--adapter-dtype"),
        (["fit", "{data}", "--base", "tiny", "--resolution", "33", "--batch-size", "4"], "33 px does not fit"),
        (
            ["fit", "{data}", "--base", "tiny", "--resolution", "16", "--batch-size", "4"],
            "not larger than the base's 32 px",
        ),
    ],
)
def test_bad_options_are_one_sentence_before_any_work(monkeypatch, capsys, tmp_path, toy_data, args, words):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(monkeypatch, capsys, *[a.format(data=toy_data) for a in args])
    assert code == 1 and "Traceback" not in err and words in err.replace("\n", " "), err
    assert "--to" not in err or args[0] == "upscale-res"  # fit has no --to to hint at
    assert not (tmp_path / "runs").exists()


def test_diffusers_merge_of_another_mlp_ratio_is_one_sentence(tmp_path, tiny_base_file, tiny_vae_dir, toy_data):
    from difffit.engine.training.config import FitConfig
    from difffit.engine.training.train import fit

    run = fit(
        FitConfig(
            data=str(toy_data),
            base=str(tiny_base_file),
            vae=str(tiny_vae_dir),
            steps=1,
            batch_size=4,
            save_every=0,
            sample_every=0,
            num_workers=0,
            cache_dir=str(tmp_path / "cache"),
            out=str(tmp_path / "run"),
        ),
        progress=False,
    )  # the fixture base has MLP ratio 1
    with pytest.raises(DiffFitError, match="only MLP ratio 4, this model has 1"):
        merge_adapter(str(run.adapter), tmp_path / "pipeline", fmt="diffusers")
    assert not (tmp_path / "pipeline").exists()
