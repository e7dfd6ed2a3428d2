"""What the command line shows: every --help renders its text whole and its names one way, and names with
[brackets] (paths, class folders) print as written in every command, never as Rich markup."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import typer
from conftest import make_toy_data, run_cli
from PIL import Image
from rich.text import Text
from typer.testing import CliRunner

from difffit.cli import app
from difffit.engine.methods.lora_targets import parse_lora_targets
from difffit.engine.models.lora_names import DIT_LORA
from difffit.engine.progress import say, stderr_console, track
from difffit.engine.training.config import FitConfig
from difffit.engine.training.trackers import TRACKERS
from difffit.engine.training.train import fit

REPO = Path(__file__).resolve().parents[1]
COMMANDS = typer.main.get_command(app).commands
# Rich style tags that survived rendering, or an escape that did not render: "[dim]", "[/bold]", "[/]", "\[".
MARKUP_LEFTOVER = re.compile(r"\[/?(bold|dim|italic|red|green|yellow|blue|cyan|magenta|b|i|u)( [^\]]*)?\]|\[/\]|\\\[")
METAVAR = re.compile(r"^(\{[A-Z][A-Z_/]*\}|\[[A-Z][A-Z_/]*\])(\.\.\.)?$")


def help_output(command: str) -> str:
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "1000"})  # wide: no line wraps
    assert result.exit_code == 0, result.output
    return result.output


def shown(help_text: str) -> str:
    """What Rich shows for a help string (Typer renders help as Rich markup)."""
    return Text.from_markup(help_text).plain


# -- help --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_shows_every_option_text_whole_and_no_markup(command):
    output = help_output(command)
    assert not MARKUP_LEFTOVER.search(output), MARKUP_LEFTOVER.search(output).group()
    for param in COMMANDS[command].params:
        if not param.help:
            continue
        text = shown(param.help)
        # Nothing swallowed: "a [repeats] table" once showed as "a  table".
        assert text == param.help.replace("\\[", "["), f"{param.name}: markup in {param.help!r}"
        assert "  " not in text and text in output, param.name
    prose = output.split("Examples")[0].split("╭")[0].splitlines()[1:]  # the description, above the panels
    assert [line for line in prose if "  " in line.strip()] == []


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_arguments_are_named_one_way(command):
    """Upper-case names, as in huggingface_hub's CLI; Typer marks them {required} or [optional]."""
    usage = next(line for line in help_output(command).splitlines() if "Usage:" in line)
    names = usage.split("[OPTIONS]", 1)[1].split()
    assert all(METAVAR.match(name) for name in names), usage
    arguments = [p for p in COMMANDS[command].params if p.param_type_name == "argument"]  # Typer vendors click
    assert len(names) == len(arguments)


def test_every_output_option_is_out_or_o():
    outs = {name: command.params for name, command in COMMANDS.items()}
    with_out = {name for name, params in outs.items() if any("--out" in p.opts for p in params)}
    assert with_out == {"fit", "upscale-res", "sample", "merge", "push", "report"}
    for name in with_out:
        (out,) = [p for p in outs[name] if "--out" in p.opts]
        assert set(out.opts) == {"--out", "-o"}, name


def test_lora_targets_help_lists_exactly_what_is_accepted():
    (option,) = [p for p in COMMANDS["fit"].params if p.name == "lora_targets"]
    listed = set(re.findall(r"\b\w+\b", option.help.split("among", 1)[1].split("(default")[0]))
    assert listed == set(DIT_LORA.targets) | set(DIT_LORA.groups)
    for name in listed:
        assert parse_lora_targets(name)
    with pytest.raises(Exception, match="lora-targets"):
        parse_lora_targets("final")  # listed once, never accepted


def test_log_with_help_and_docs_name_every_tracker():
    (option,) = [p for p in COMMANDS["fit"].params if p.name == "log_with"]
    assert all(name in option.help for name in TRACKERS)
    assert f"--log-with {'|'.join(TRACKERS)}" in (REPO / "docs" / "merge-share-report.md").read_text()


# -- names with brackets, in every command -----------------------------------------------------------


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch):
    monkeypatch.setattr(stderr_console, "width", 1000)  # Rich would wrap a long path mid-name


def assert_shown(code: int, err: str, expected_code: int, *texts: str) -> None:
    assert code == expected_code and "Traceback" not in err, err
    for text in texts:
        assert text in err, f"{text!r} not in {err!r}"


def test_progress_descriptions_and_lines_are_not_markup(capsys):
    with track(1, "Reading [red]x[/red]") as advance:
        advance()
    say(("Wrote", "green"), " out[/]y")
    err = capsys.readouterr().err
    assert "Reading [red]x[/red]" in err and "Wrote out[/]y" in err


@pytest.fixture(scope="module")
def bracketed(tmp_path_factory, tiny_base_file, tiny_vae_dir) -> dict:
    """A 2-step run on a data folder `data[/x]` (a folder `x]` inside `data[`) with a class `[bold]x`,
    written to `run[red]o`."""
    root = tmp_path_factory.mktemp("brackets")
    data = make_toy_data(root / "data[" / "x]")
    (data / "blue").rename(data / "[bold]x")
    result = fit(
        FitConfig(
            data=str(data),
            base=str(tiny_base_file),
            vae=str(tiny_vae_dir),
            steps=2,
            batch_size=4,
            save_every=0,
            sample_every=0,
            num_workers=0,
            cache_dir=str(root / "cache"),
            out=str(root / "run[red]o"),
        ),
        progress=False,
    )
    return {"root": root, "data": data, "adapter": result.adapter, "base": tiny_base_file, "vae": tiny_vae_dir}


def fit_args(b: dict, data: Path, out: Path) -> list:
    return [
        data,
        "--base",
        b["base"],
        "--vae",
        b["vae"],
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--save-every",
        "1",
        "--sample-every",
        "0",
        "--num-workers",
        "0",
        "--cache-dir",
        b["root"] / "cache",
        "--out",
        out,
    ]


def test_fit_shows_bracketed_paths_and_classes(bracketed, tmp_path, monkeypatch, capsys):
    data = shutil.copytree(bracketed["data"], tmp_path / "d[/i]" / "x")
    (data / "[dim]empty").mkdir()
    code, _, err = run_cli(monkeypatch, capsys, "fit", *fit_args(bracketed, data, tmp_path / "r[red]"))
    assert_shown(code, err, 0, "No images in [dim]empty;", f"adapter: {tmp_path / 'r[red]' / 'adapter.safetensors'}")
    (data / "red").rename(data / "[green]g")  # classes renamed: resuming is refused, naming both lists
    code, _, err = run_cli(
        monkeypatch, capsys, "fit", *fit_args(bracketed, data, tmp_path / "r[red]"), "--resume", "--steps", "3"
    )
    assert_shown(code, err, 1, "it was trained on [[bold]x, red], the data now has [[bold]x, [green]g].")
    code, _, err = run_cli(monkeypatch, capsys, "fit", tmp_path / "data[/x]", "--base", bracketed["base"])
    assert_shown(code, err, 1, f"{tmp_path / 'data[/x]'}")


def test_upscale_res_shows_bracketed_paths(bracketed, tmp_path, monkeypatch, capsys):
    out = tmp_path / "up[/x]"
    args = fit_args(bracketed, bracketed["data"], out)
    code, _, err = run_cli(monkeypatch, capsys, "upscale-res", *args, "--to", "32")
    assert_shown(code, err, 0, f"adapter: {out / 'adapter.safetensors'}")


def test_sample_shows_bracketed_paths(bracketed, tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "sample", tmp_path / "no[/]such.safetensors")
    assert_shown(code, err, 1, "no[/]such.safetensors")
    out = tmp_path / "out[red]y"
    code, _, err = run_cli(
        monkeypatch,
        capsys,
        "sample",
        bracketed["adapter"],
        "-n",
        "2",
        "--scheduler",
        "ddim",
        "--steps",
        "2",
        "--device",
        "cpu",
        "--out",
        out,
    )
    assert_shown(code, err, 0, f"Wrote 2 images to {out} (")


def test_merge_shows_bracketed_paths(bracketed, tmp_path, monkeypatch, capsys):
    out = tmp_path / "m[/b].safetensors"
    code, _, err = run_cli(monkeypatch, capsys, "merge", bracketed["adapter"], "-o", out)
    assert_shown(code, err, 0, f"Merged into {out}", str(bracketed["adapter"]))
    assert out.is_file()


def test_info_shows_bracketed_paths_and_classes(bracketed, tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "info", bracketed["adapter"])
    assert_shown(code, err, 0, f"adapter: {bracketed['adapter']}", "[bold]x, red")
    code, _, err = run_cli(monkeypatch, capsys, "info", tmp_path / "x[red]y.safetensors")
    assert_shown(code, err, 1, "x[red]y.safetensors")


def test_eval_fid_shows_bracketed_paths(bracketed, tmp_path, monkeypatch, capsys):
    generated = tmp_path / "gen[red]"
    generated.mkdir()
    for i, png in enumerate(sorted((bracketed["data"] / "red").glob("*.png"))[:2]):
        Image.open(png).save(generated / f"{i}.png")
    (generated / "bad[red].png").write_bytes(b"not an image")
    code, _, err = run_cli(
        monkeypatch,
        capsys,
        "eval-fid",
        generated,
        bracketed["data"] / "[bold]x",
        "--inception-weights",
        "random",
        "--device",
        "cpu",
    )
    assert_shown(code, err, 0, f"Skipped {generated / 'bad[red].png'}:")


def test_push_dry_run_shows_bracketed_paths(bracketed, tmp_path, monkeypatch, capsys):
    out = tmp_path / "up[red]"
    code, _, err = run_cli(monkeypatch, capsys, "push", bracketed["adapter"], "me/x", "--dry-run", "-o", out)
    assert_shown(code, err, 0, f"Wrote {out} (nothing uploaded)")


def test_report_shows_bracketed_paths(bracketed, tmp_path, monkeypatch, capsys):
    out = tmp_path / "r[/b].html"
    code, _, err = run_cli(monkeypatch, capsys, "report", bracketed["adapter"].parent, "-o", out)
    assert_shown(code, err, 0, f"Wrote {out} (1 run")
