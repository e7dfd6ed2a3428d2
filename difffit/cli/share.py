"""`difffit push` and `difffit report`: share an adapter on the Hub, and look at runs as one HTML page.

Plain Typer command functions; the app registers them (rich_help_panel "Share").
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from difffit.cli import _options as opt
from difffit.cli._render import emit_json, say
from difffit.engine.errors import DiffFitError

PUSH_HELP = """Upload an adapter (or the model merged from it) to the Hugging Face Hub with a model card.

The repo gets adapter.safetensors, grid.png (sampled now with --grid-classes, else the run's last \
preview grid) and a README.md model card: base model, method, trainable parameters, classes, the \
training summary, FID with --eval, and how to sample and merge. Log in first with `hf auth login`. \
Anyone can then use the adapter as hf://OWNER/NAME with sample, eval-fid, merge and info.

[bold]Examples[/bold]

  [dim]# see exactly what would be uploaded, upload nothing[/dim]
  difffit push runs/food101/adapter.safetensors me/food101-difffit --dry-run --out upload/

  [dim]# upload, with the FID of `difffit eval-fid ... --json > eval.json` in the card[/dim]
  difffit push runs/food101/adapter.safetensors me/food101-difffit --eval runs/food101/eval.json

  [dim]# a private repo, a fresh sample grid of two classes, on a branch[/dim]
  difffit push adapter.safetensors me/food101-difffit --private --grid-classes pizza --grid-classes sushi \\
      --revision v2 --message "24k steps"

  [dim]# then, anywhere[/dim]
  difffit sample hf://me/food101-difffit -n 16
"""


def push(
    adapter: Annotated[
        Path, typer.Argument(metavar="ADAPTER", help="The adapter.safetensors to share.", show_default=False)
    ],
    repo_id: Annotated[
        str, typer.Argument(metavar="OWNER/NAME", help="Hub model repo (created if missing).", show_default=False)
    ],
    private: Annotated[bool, typer.Option("--private", help="Create the repo private.")] = False,
    revision: Annotated[
        str | None, typer.Option(help="Branch to push to (created if missing; default main).", show_default=False)
    ] = None,
    message: Annotated[str | None, typer.Option("--message", "-m", help="Commit message.", show_default=False)] = None,
    eval_json: Annotated[
        Path | None, typer.Option("--eval", help="An `eval-fid --json` result to show in the card.", show_default=False)
    ] = None,
    grid_classes: Annotated[
        list[str] | None,
        typer.Option(
            "--grid-classes",
            help="Sample a fresh grid of this class (name or index); repeat for more.",
            show_default=False,
        ),
    ] = None,
    merged: Annotated[
        bool,
        typer.Option("--merged", help="Upload the merged model as a diffusers DiTPipeline instead of the adapter."),
    ] = False,
    license: Annotated[
        str | None,
        typer.Option(
            help="License id for the card (default: the base's, cc-by-nc-4.0 for DiT; else other).", show_default=False
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Write the upload folder to --out; upload nothing.")
    ] = False,
    out: opt.PushOut = None,
    as_json: opt.Json = False,
) -> None:
    from difffit.engine.sharing.push import push_adapter

    if dry_run != (out is not None):
        raise DiffFitError("--dry-run and --out go together.", hint="Pass both, e.g. --dry-run --out upload/.")
    result = push_adapter(
        adapter,
        repo_id,
        private=private,
        revision=revision,
        message=message,
        eval_json=eval_json,
        grid_classes=grid_classes,
        merged=merged,
        license=license,
        dry_run_out=out,
    )
    if as_json:
        emit_json(result)
    elif dry_run:
        say(("Wrote", "green"), f" {result['out']} (nothing uploaded): {', '.join(result['files'])}")
    else:
        say(("Pushed", "green"), f" {', '.join(result['files'])} to {result['url']}")


REPORT_HELP = """One self-contained HTML page about one or more runs of `difffit fit`.

Per run: loss curves (loss, mse, vb, smoothed; val_loss when logged), the preview grids step by step, \
the training summary, eval*.json results found in the run folder (`difffit eval-fid --json > eval.json`) \
and the resolved config. With several runs: a comparison table (method, trainable parameters, adapter \
bytes, img/s, peak memory, final loss, FID) and their loss curves overlaid. Images are inline: the file \
opens anywhere, offline.

[bold]Examples[/bold]

  difffit report runs/quickstart

  [dim]# compare methods[/dim]
  difffit report runs/food101-difffit runs/food101-bitfit runs/food101-full --out food101.html
"""


def report(
    run_dirs: Annotated[
        list[Path], typer.Argument(metavar="RUN_DIR", help="Run folders written by difffit fit.", show_default=False)
    ],
    out: opt.ReportOut = "report.html",
    overwrite: opt.Overwrite = False,
    as_json: opt.Json = False,
) -> None:
    from difffit.engine.sharing.report import write_report

    path = write_report(run_dirs, out, overwrite=overwrite)
    size = path.stat().st_size
    if as_json:
        emit_json({"out": str(path), "runs": [str(p) for p in run_dirs], "bytes": size})
    else:
        runs = f"{len(run_dirs)} run{'s' if len(run_dirs) > 1 else ''}"
        say(("Wrote", "green"), f" {path} ({runs}, {size / 1024:.0f} KB)")
