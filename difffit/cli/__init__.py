"""The `difffit` command line: the app, its commands and the one place errors become sentences.

Each command module parses its options, makes one engine call and renders the result. Heavy
libraries (torch, diffusers, accelerate) are imported inside the commands, so `--help` and
`--version` answer instantly. Human output goes to stderr; `--json` prints one object on stdout.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Annotated

import typer

from difffit import __version__
from difffit.cli import evaluate, generate, inspect, share, train
from difffit.cli._render import say
from difffit.engine.errors import DiffFitError

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


ERROR, HINT = ("Error:", "bold red"), ("Hint:", "dim")  # the styled labels of a failure's two lines


@dataclass
class Session:
    """Settings of one invocation that `main` needs after the command has run (or failed)."""

    debug: bool = False


app = typer.Typer(
    name="difffit",
    help="Adapt pre-trained diffusion transformers (DiT; text-to-image PixArt-α/Σ, SD3/3.5, FLUX.1) to new image "
    "domains with DiffFit.\n\n" + EXAMPLES,
    rich_markup_mode="rich",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"difffit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    version: Annotated[
        bool | None,
        typer.Option("--version", callback=_version_callback, is_eager=True, help="Show the version and exit."),
    ] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
) -> None:
    ctx.ensure_object(Session).debug = debug


app.command(rich_help_panel="Train", help=train.FIT_HELP, cls=train.FitCommand)(train.fit)
app.command("upscale-res", rich_help_panel="Train", help=train.UPSCALE_HELP, cls=train.UpscaleCommand)(train.fit)
app.command(rich_help_panel="Generate", help=generate.SAMPLE_HELP)(generate.sample)
app.command(rich_help_panel="Generate")(generate.merge)
app.command("eval-fid", rich_help_panel="Evaluate", help=evaluate.EVAL_FID_HELP)(evaluate.eval_fid)
app.command(rich_help_panel="Inspect")(inspect.info)
app.command(rich_help_panel="Inspect")(inspect.env)
app.command(rich_help_panel="Share", help=share.PUSH_HELP)(share.push)
app.command(rich_help_panel="Share", help=share.REPORT_HELP)(share.report)


def main() -> None:
    session = Session()
    try:
        app(prog_name="difffit", obj=session)
    except DiffFitError as exc:
        if session.debug:
            raise
        say(ERROR, f" {exc.message}")
        if exc.hint:
            say(HINT, f" {exc.hint}")
        sys.exit(1)
    except KeyboardInterrupt:
        say(("Interrupted.", "yellow"))
        sys.exit(130)
    except OSError as exc:  # the file system said no (permissions, a missing folder, a full disk)
        if session.debug:
            raise
        where = f": {exc.filename}" if exc.filename else ""
        say(ERROR, f" {exc.strerror or exc}{where}.")
        sys.exit(1)
    except Exception as exc:  # an unexpected failure gets one sentence too, not a traceback
        if session.debug:
            raise
        say(ERROR, f" {type(exc).__name__}: {exc}")
        say(HINT, " run again with `difffit --debug ...` for the full traceback.")
        sys.exit(1)
