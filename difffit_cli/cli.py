"""The `difffit` command line: one thin function per subcommand (parse, call the engine, render).

Heavy libraries (torch, diffusers) are imported inside the commands, so `--help` and `--version`
answer instantly. Human output goes to stderr; `--json` prints exactly one object on stdout.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from difffit_cli import __version__
from difffit_cli.engine.errors import DiffFitError

err = Console(stderr=True)
_state = {"debug": False}

EXAMPLES = """
[bold]Examples[/bold]

  [dim]# adapt DiT-XL/2 to a folder of images (class sub-folders = classes)[/dim]
  difffit fit ./my_images --base DiT-XL/2-256

  [dim]# 64 images from the adapter, 8x8 grid in runs/.../samples[/dim]
  difffit sample runs/my_images-difffit/adapter.safetensors -n 64

  [dim]# what would train, and how much of the model that is[/dim]
  difffit info DiT-XL/2-256 --method difffit --num-classes 101

  [dim]# fold the adapter into a standalone model[/dim]
  difffit merge adapter.safetensors --out merged.safetensors
"""

app = typer.Typer(
    name="difffit",
    help="Adapt pre-trained diffusion transformers (DiT) to new image domains with DiffFit.\n\n" + EXAMPLES,
    rich_markup_mode="rich",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

TRAIN, GENERATE, EVALUATE, INSPECT = "Train", "Generate", "Evaluate", "Inspect"


def emit_json(obj: dict) -> None:
    """Exactly one JSON object on stdout."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"difffit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        Optional[bool],
        typer.Option("--version", callback=_version_callback, is_eager=True, help="Show the version and exit."),
    ] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
) -> None:
    _state["debug"] = debug


def _not_built(command: str) -> None:
    raise DiffFitError(f"`difffit {command}` is not built yet in this version ({__version__}).")


# ---------------------------------------------------------------------------------------------
# Train
# ---------------------------------------------------------------------------------------------


@app.command(rich_help_panel=TRAIN)
def fit() -> None:
    """Fine-tune a base on an image folder; writes an adapter of a few MB."""
    _not_built("fit")


@app.command("upscale-res", rich_help_panel=TRAIN)
def upscale_res() -> None:
    """Move a base to a higher resolution (positional-encoding trick), then fit."""
    _not_built("upscale-res")


# ---------------------------------------------------------------------------------------------
# Generate
# ---------------------------------------------------------------------------------------------


@app.command(rich_help_panel=GENERATE)
def sample() -> None:
    """Generate images from an adapter, a merged model or a base."""
    _not_built("sample")


@app.command(rich_help_panel=GENERATE)
def merge() -> None:
    """Fold an adapter into its base and write a standalone model."""
    _not_built("merge")


# ---------------------------------------------------------------------------------------------
# Evaluate
# ---------------------------------------------------------------------------------------------


@app.command("eval-fid", rich_help_panel=EVALUATE)
def eval_fid() -> None:
    """FID (and KID, IS, precision/recall) between generated and reference images."""
    _not_built("eval-fid")


# ---------------------------------------------------------------------------------------------
# Inspect
# ---------------------------------------------------------------------------------------------


@app.command(rich_help_panel=INSPECT)
def info() -> None:
    """Architecture, size, classes and fingerprint of a base or an adapter."""
    _not_built("info")


@app.command(rich_help_panel=INSPECT)
def env(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """Versions, devices and cache locations, for bug reports."""
    from difffit_cli.engine.environment import environment_report

    report = environment_report()
    if as_json:
        emit_json(report)
        return
    from rich.table import Table

    table = Table(show_header=False, box=None)
    for key, value in report.items():
        table.add_row(f"[bold]{key}[/bold]", str(value))
    err.print(table)


def main() -> None:
    try:
        app(prog_name="difffit")
    except DiffFitError as exc:
        if _state["debug"]:
            raise
        err.print(f"[bold red]Error:[/bold red] {exc.message}", highlight=False)
        if exc.hint:
            err.print(f"[dim]Hint:[/dim] {exc.hint}", highlight=False)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("[yellow]Interrupted.[/yellow]")
        sys.exit(130)
    except Exception as exc:  # an unexpected failure still gets one sentence, not a traceback
        if _state["debug"]:
            raise
        err.print(f"[bold red]Error:[/bold red] {type(exc).__name__}: {exc}", highlight=False)
        err.print("[dim]Hint:[/dim] run again with `difffit --debug ...` for the full traceback.", highlight=False)
        sys.exit(1)


if __name__ == "__main__":
    main()
