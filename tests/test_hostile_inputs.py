"""Hostile and malformed inputs (issue 28, items 5, 8, 9): each is one sentence, never a traceback, a hang or
escape sequences reaching the terminal.

- a model_index.json naming custom pipeline code, or malformed but parseable pipeline files (wrong types,
  components not listed as [library, class]);
- text from files (an adapter's recorded base) printed with its control characters escaped, and still valid
  JSON with --json;
- FIFOs where files are read, metadata nested without bound, a recorded base that is not a model, a --cache-dir
  that cannot be a folder.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from bounded_cli import cli_run, refused_in_one_sentence, run_bounded
from family_adapters import FAMILIES, PIPELINES, make_adapter

from difffit.engine.errors import DiffFitError

HOSTILE = "/nonexistent/\x1b[2J\x1b]0;TITLE\x07x"


@pytest.fixture(scope="module", params=list(PIPELINES))
def pipeline(request, tmp_path_factory):
    return PIPELINES[request.param](tmp_path_factory.mktemp(request.param) / "pipe")


def damaged_copy(pipeline, tmp_path, name: str, edit) -> str:
    """A copy of `pipeline` whose file `name` (model_index.json, transformer/config.json) `edit` rewrites."""
    folder = tmp_path / "damaged"
    shutil.copytree(pipeline, folder)
    path = folder / name
    path.write_text(edit(json.loads(path.read_text())))
    return str(folder)


def with_key(key, value):
    return lambda config: json.dumps({**config, key: value})


# -- item 5: malformed pipeline files ----------------------------------------------------------------------------

MALFORMED = [
    (
        "model_index.json",
        with_key("_class_name", ["custom_module", "CustomPipeline"]),
        "names custom pipeline code .* which difffit does not load; it supports DiT .*FLUX",
    ),
    ("model_index.json", lambda config: "[1, 2]", "holds a JSON list, not the object"),
    ("model_index.json", with_key("_class_name", 5), "names no pipeline class"),
    ("model_index.json", with_key("vae", "AutoencoderKL"), "lists the component vae as 'AutoencoderKL', not as"),
    ("model_index.json", with_key("scheduler", ["diffusers"]), "lists the component scheduler as"),
    ("transformer/config.json", lambda config: "[]", "holds a JSON list"),
    ("transformer/config.json", with_key("num_layers", "four"), "gives num_layers as 'four'.* positive whole number"),
    ("transformer/config.json", with_key("in_channels", None), "gives in_channels as None"),
    ("transformer/config.json", with_key("patch_size", 0), "gives patch_size as 0"),
    ("transformer/config.json", with_key("num_attention_heads", "two"), "gives num_attention_heads as 'two'"),
]


@pytest.mark.parametrize("name, edit, words", MALFORMED, ids=[f"{m[0]}-{m[2][:24]}" for m in MALFORMED])
def test_malformed_pipeline_files_are_one_sentence(pipeline, tmp_path, name, edit, words):
    from difffit.engine.models.families import load_base

    folder = damaged_copy(pipeline, tmp_path, name, edit)
    with pytest.raises(DiffFitError, match=words):
        load_base(folder)


def test_custom_pipeline_code_is_named_by_every_command(pipeline, tmp_path, monkeypatch, capsys):
    folder = damaged_copy(
        pipeline, tmp_path, "model_index.json", with_key("_class_name", ["custom_module", "CustomPipeline"])
    )
    for argv in (
        ["info", folder],
        ["sample", folder, "--prompt", "a cat", "--out", tmp_path / "s"],
        ["fit", tmp_path, "--base", folder, "--out", tmp_path / "f"],
    ):
        code, _, err = cli_run(monkeypatch, capsys, *argv)
        assert code == 1 and "names custom pipeline code" in err and "TypeError" not in err, err


# -- item 8: text from files is printed escaped ------------------------------------------------------------------


@pytest.fixture(scope="module")
def hostile_adapters(tmp_path_factory, tiny_base_file, tiny_vae_dir):
    folder = tmp_path_factory.mktemp("hostile")
    return {
        family: make_adapter(family, folder, tiny_base_file, tiny_vae_dir, base_spec=HOSTILE) for family in FAMILIES
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_control_characters_from_metadata_never_reach_the_terminal(
    family, hostile_adapters, tmp_path, monkeypatch, capsys
):
    adapter = hostile_adapters[family]
    code, _, err = cli_run(monkeypatch, capsys, "info", adapter)
    assert code == 0, err
    assert "\x1b" not in err and "\x07" not in err
    assert "\\x1b[2J\\x1b]0;TITLE\\x07x" in err  # shown, escaped
    code, out, err = cli_run(monkeypatch, capsys, "info", adapter, "--json")
    assert code == 0 and json.loads(out)["base"] == HOSTILE  # JSON keeps the value, escaped the JSON way
    assert "\x1b" not in out
    code, _, err = cli_run(monkeypatch, capsys, "merge", adapter, "--out", tmp_path / "merged")
    assert code == 1 and "Error:" in err and "\x1b" not in err and "\x07" not in err
    assert "\\x1b" in err


def test_say_and_tables_escape_control_characters(capsys):
    from rich.table import Table

    from difffit.engine.progress import print_table, printable, say

    assert printable("a\x1b[2Jb\x07\r\n\u202e\tc") == "a\\x1b[2Jb\\x07\\r\\n\\u202e\tc"
    say(("Error:", "red"), f" {HOSTILE}")
    table = Table(title=f"title {HOSTILE}")
    table.add_column("name")
    table.add_row(HOSTILE)
    print_table(table)
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\x07" not in err and err.count("\\x1b[2J") == 3


# -- item 9: FIFOs, deep metadata, a recorded base that is not a model, --cache-dir -------------------------------


def test_a_fifo_where_a_file_is_read_is_refused_not_waited_on(tmp_path, tiny_base_file, tiny_vae_dir, toy_data):
    fifo = tmp_path / "x.safetensors"
    os.mkfifo(fifo)
    prompts = tmp_path / "prompts.txt"
    os.mkfifo(prompts)
    cases = [
        ["info", fifo],
        ["sample", fifo, "--out", tmp_path / "s"],
        ["merge", fifo, "--out", tmp_path / "m"],
        ["eval-fid", fifo, toy_data, "--inception-weights", "random"],
        ["eval-fid", toy_data, tmp_path / "x.safetensors", "--inception-weights", "random"],
        ["sample", PIPELINES["pixart"](tmp_path / "pixart"), "--prompts", prompts, "--out", tmp_path / "p"],
        ["fit", toy_data, "--base", fifo, "--out", tmp_path / "f"],
    ]
    for result in run_bounded(cases, seconds=30):
        assert refused_in_one_sentence(result), result
        assert "FIFO (named pipe)" in result["err"] and "does not exist" not in result["err"], result
    assert not any((tmp_path / d).exists() for d in "smpf")


def test_metadata_nested_without_bound_is_one_sentence(tmp_path, tiny_base_file, tiny_vae_dir, monkeypatch, capsys):
    from safetensors.torch import load_file, save_file

    from difffit.engine.methods.adapter import METADATA_KEY
    from difffit.engine.models.formats import read_safetensors_header

    adapter = make_adapter("dit", tmp_path, tiny_base_file, tiny_vae_dir)
    meta = json.loads(read_safetensors_header(adapter)[1][METADATA_KEY])
    deep = json.dumps(meta)[:-1] + ', "extra": ' + "[" * 100_000 + "]" * 100_000 + "}"
    save_file(load_file(adapter), tmp_path / "deep.safetensors", metadata={METADATA_KEY: deep})
    for command in ("info", "sample", "merge"):
        argv = [command, tmp_path / "deep.safetensors", *(["--out", tmp_path / "o"] if command != "info" else [])]
        code, _, err = cli_run(monkeypatch, capsys, *argv)
        assert code == 1 and "nested 100,001 levels deep" in err and "RecursionError" not in err, err


@pytest.mark.parametrize("family", FAMILIES)
def test_a_recorded_base_that_is_not_a_model_is_said_to_be_none(
    family, tmp_path, tiny_base_file, tiny_vae_dir, monkeypatch, capsys
):
    fifo = tmp_path / "base.safetensors"
    os.mkfifo(fifo)
    for recorded, kind in (
        ("/dev/zero", "a character device"),
        ("/etc/passwd", "a file of no weights format"),
        (str(fifo), "a FIFO"),
    ):
        folder = tmp_path / recorded.replace("/", "_")
        folder.mkdir()
        adapter = make_adapter(family, folder, tiny_base_file, tiny_vae_dir, base_spec=recorded)
        code, _, err = cli_run(monkeypatch, capsys, "merge", adapter, "--out", tmp_path / "m")
        assert code == 1 and f"The adapter's recorded base {recorded} is not a model: it is {kind}" in err, err
        assert "DiT base" not in err and "Use its base" not in err


@pytest.mark.parametrize(
    "cache_dir, words", [("/dev/null", "it is a character device"), ("file", "it is a file"), ("file/sub", "is a file")]
)
def test_a_cache_dir_that_cannot_be_a_folder_is_refused_first(
    cache_dir, words, tmp_path, toy_data, tiny_base_file, tiny_vae_dir, monkeypatch, capsys
):
    (tmp_path / "file").write_text("mine\n")
    given = cache_dir if cache_dir.startswith("/") else str(tmp_path / cache_dir)
    code, _, err = cli_run(
        monkeypatch,
        capsys,
        "fit",
        toy_data,
        "--base",
        tiny_base_file,
        "--vae",
        tiny_vae_dir,
        "--steps",
        "1",
        "--batch-size",
        "4",
        "--cache-dir",
        given,
        "--out",
        tmp_path / "run",
    )
    assert code == 1 and f"--cache-dir {given} cannot be a folder" in err and words in err, err
    assert "File exists" not in err and not (tmp_path / "run").exists()
    assert (tmp_path / "file").read_text() == "mine\n"
