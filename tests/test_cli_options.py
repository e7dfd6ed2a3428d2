"""The command line's options: shared ones are one declaration, and no default drifted."""

from __future__ import annotations

import inspect as pyinspect
import subprocess
import sys

import click
import typer

from difffit.cli import app, train


def params(name: str) -> dict[str, click.Parameter]:
    command = typer.main.get_command(app).commands[name]
    return {p.name: p for p in command.params}


def describe(p: click.Parameter) -> tuple:
    return (tuple(p.opts), tuple(p.secondary_opts), p.default, p.help if isinstance(p, click.Option) else None)


def test_upscale_res_takes_every_fit_option_as_fit_declares_it():
    fit, upscale = params("fit"), params("upscale-res")
    assert set(upscale) - set(fit) == {"to", "pe"}
    assert set(fit) - set(upscale) == {"resolution"}  # --to sets it
    for name in set(fit) & set(upscale):
        assert describe(fit[name]) == describe(upscale[name]), name
    # One typed function serves both commands; each command class leaves out the other's own options.
    assert set(pyinspect.signature(train.fit).parameters) - {"ctx"} == set(fit) | set(upscale)


def test_shared_flags_keep_each_commands_default():
    assert params("fit")["mixed_precision"].default == "auto"
    assert params("sample")["mixed_precision"].default == params("eval-fid")["mixed_precision"].default == "no"
    assert params("fit")["steps"].default == 24000 and params("sample")["steps"].default is None
    assert (
        params("fit")["batch_size"].default,
        params("sample")["batch_size"].default,
        params("eval-fid")["batch_size"].default,
    ) == (32, 16, 64)
    # sample's None is the base's family's default, resolved when it samples (DiT 4.0, a pipeline's own:
    # test_pixart_sample.py checks both); eval-fid's None is the paper's FID setting on DiT (cfg 1.5, ddpm) and a
    # pipeline's own on a text-to-image base (test_t2i_validation.py checks both).
    assert params("sample")["cfg_scale"].default is None and params("eval-fid")["cfg_scale"].default is None
    assert params("sample")["scheduler"].default is None and params("eval-fid")["scheduler"].default is None
    for name in ("sample", "merge", "eval-fid", "info", "env", "fit"):
        assert describe(params(name)["as_json"])[:2] == (("--json",), ()), name
    for name in ("sample", "merge", "eval-fid"):
        assert describe(params(name)["force_base"]) == describe(params("sample")["force_base"])
        assert describe(params(name)["base"]) == describe(params("info")["base"])


def test_cli_imports_no_heavy_library():
    code = (
        "import sys; from difffit.cli import app; "
        "print(sorted(m for m in ('torch', 'accelerate', 'diffusers') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
