"""Options of the other conditioning are refused, not ignored (issue 28, item 4): every option of sample, eval-fid,
info and merge, read from the Typer app, is given to a class-conditional (DiT) and to each text-to-image family's
adapter. An option in a command's class (text) list is refused on a text (class) model in one sentence, before
anything loads; every other option gets past the check. The engine calls are replaced by a stop, so each
invocation costs only the check."""

from __future__ import annotations

import pytest
import typer.main
from bounded_cli import cli_run
from family_adapters import FAMILIES, make_adapter

import difffit.engine.evaluation.metrics as metrics
import difffit.engine.methods.merge as merge
import difffit.engine.methods.sources as sources
from difffit.cli import app
from difffit.cli._conditioning import CONDITIONING_OPTIONS

COMMANDS = ("sample", "eval-fid", "info", "merge")
# Values that parse for options whose text is checked before the engine call.
VALUES = {
    "--cfg-channels": "all",
    "--scheduler": "ddim",
    "--mixed-precision": "no",
    "--device": "cpu",
    "--compile": "off",
    "--metrics": "fid",
    "--method": "difffit",
    "--gamma-placement": "branch",
    "--lora-targets": "qkv",
    "--class": "0",
    "--format": "diffusers",
    "--inception-weights": "random",
    "--gamma-blocks": "half",
    "--base": None,
}


class Reached(BaseException):  # past main's handler of unexpected errors
    """The command got past its option checks to the engine."""


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_base_file, tiny_vae_dir):
    folder = tmp_path_factory.mktemp("adapters")
    return {family: make_adapter(family, folder, tiny_base_file, tiny_vae_dir) for family in FAMILIES}


@pytest.fixture
def stopped_engine(monkeypatch):
    def stop(*args, **kwargs):
        raise Reached

    for module, name in (
        (sources, "sample_sources"),
        (sources, "describe_source"),
        (metrics, "evaluate"),
        (merge, "merge_adapter"),
    ):
        monkeypatch.setattr(module, name, stop)


def option_argv(param, tmp_path) -> list[str] | None:
    """The option with a value that parses; None for --base (another model: the check reads the adapter's)."""
    flag = param.opts[0]
    if flag in VALUES:
        return None if VALUES[flag] is None else [flag, VALUES[flag]]
    annotation = param.type_descriptor.annotation
    if annotation is bool:
        return [flag]
    if annotation is int:
        return [flag, "16"]
    if annotation is float:
        return [flag, "1.5"]
    if getattr(annotation, "__name__", "") == "Path" or "Path" in str(annotation) or flag in ("--out", "-o"):
        path = tmp_path / f"value{flag.strip('-')}"
        if flag not in ("--out", "--save-stats"):
            path.write_text("a cat\n")
        return [flag, str(path)]
    return [flag, "a cat"]


def command_line(command: str, adapter, tmp_path) -> list[str]:
    if command == "merge":
        return ["merge", adapter, "--out", tmp_path / "merged"]
    if command == "eval-fid":
        return ["eval-fid", adapter, tmp_path]
    return [command, adapter]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_is_checked_against_each_familys_conditioning(
    command, adapters, stopped_engine, tmp_path, monkeypatch, capsys
):
    from difffit.engine.models.families import FAMILIES as KNOWN

    table = CONDITIONING_OPTIONS[command]
    params = [p for p in typer.main.get_command(app).commands[command].params if p.param_type_name == "option"]
    assert {name for names in table.values() for name in names} <= {p.name for p in params}  # no stale entries
    checked = 0
    for param in params:
        extra = option_argv(param, tmp_path)
        if extra is None or param.name == "out":
            continue
        for family, adapter in adapters.items():
            conditioning = KNOWN[family].conditioning
            argv = [*command_line(command, adapter, tmp_path), *extra]
            try:
                code, _, err = cli_run(monkeypatch, capsys, *argv)
            except Reached:
                code, err = None, ""
            other = next((kind for kind, names in table.items() if param.name in names), None)
            if other is not None and other != conditioning:
                wanted = "class-conditional (DiT)" if other == "class" else "text-to-image"
                assert code == 1 and f"{param.opts[0]} applies to {wanted} models" in err, (command, family, err)
                checked += 1
            else:
                assert "applies to" not in err, (command, param.opts[0], family, err)
                assert code is None, (command, param.opts[0], family, err)  # the check let it through
    assert checked >= sum(len(names) for names in table.values()) * (len(FAMILIES) - 1) // 2


def test_sample_cfg_channels_on_a_text_adapter_is_refused_before_loading(adapters, tmp_path, monkeypatch, capsys):
    loaded = []
    monkeypatch.setattr(sources, "iter_sources", lambda *a, **k: loaded.append(1) or iter(()))
    for family in ("pixart", "sd3", "flux"):
        code, _, err = cli_run(
            monkeypatch,
            capsys,
            "sample",
            adapters[family],
            "--prompt",
            "a cat",
            "--cfg-channels",
            "all",
            "--out",
            tmp_path / family,
        )
        assert code == 1 and "--cfg-channels applies to class-conditional (DiT) models" in err, err
    code, _, err = cli_run(monkeypatch, capsys, "sample", adapters["dit"], "--width", "64", "--out", tmp_path / "d")
    assert code == 1 and "--width applies to text-to-image models" in err, err
    code, _, err = cli_run(monkeypatch, capsys, "info", adapters["pixart"], "--num-classes", "3")
    assert code == 1 and "--num-classes applies to class-conditional (DiT) models" in err, err
    assert not loaded and not list(tmp_path.iterdir())
