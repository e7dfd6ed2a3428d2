"""The `difffit` command line: one thin function per subcommand (parse, call the engine, render).

Heavy libraries (torch, diffusers) are imported inside the commands, so `--help` and `--version`
answer instantly. Human output goes to stderr; `--json` prints exactly one object on stdout.
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path
from typing import Annotated

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
        bool | None,
        typer.Option("--version", callback=_version_callback, is_eager=True, help="Show the version and exit."),
    ] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
) -> None:
    _state["debug"] = debug


# ---------------------------------------------------------------------------------------------
# Train
# ---------------------------------------------------------------------------------------------


FIT_EXAMPLES = """
[bold]Examples[/bold]

  [dim]# DiffFit on a folder with one sub-folder per class (DiT-XL/2 at 256 px, bf16 on a GPU)[/dim]
  difffit fit ./flowers --base DiT-XL/2-256

  [dim]# a paper recipe (recipes/food101.toml); options on the command line win over the recipe[/dim]
  difffit fit --recipe food101 --steps 12000 --out runs/food101-short

  [dim]# continue the newest checkpoint up to 48k steps in total[/dim]
  difffit fit --recipe food101 --resume --steps 48000

  [dim]# 8 GPUs (--batch-size is the global batch; each GPU takes 1/8 of it)[/dim]
  accelerate launch --multi_gpu --num_processes 8 -m difffit_cli fit ./flowers --base DiT-XL/2-256

  [dim]# a tiny CPU run to see everything work[/dim]
  difffit fit ./images --base random:DiT-S/2 --vae identity --resolution 32 --steps 50 --batch-size 8
"""


FIT_HELP = (
    "Fine-tune a base on an image folder; writes an adapter of a few MB.\n\n"
    "Outputs in --out: adapter.safetensors, checkpoints/, samples/, log.jsonl, config.toml.\n" + FIT_EXAMPLES
)


@app.command(rich_help_panel=TRAIN, help=FIT_HELP)
def fit(
    ctx: typer.Context,
    data: Annotated[str | None, typer.Argument(
        help="Image folder: one sub-folder per class, or flat (one class).", show_default=False)] = None,
    base: Annotated[str | None, typer.Option(
        help="Base model: alias (DiT-XL/2-256), hub id, local file or folder, or random:DiT-S/2.")] = None,
    vae: Annotated[str | None, typer.Option(help="VAE spec (default: the base's).")] = None,
    method: Annotated[str, typer.Option(help="difffit, bitfit or full.")] = "difffit",
    recipe: Annotated[str | None, typer.Option(
        help="TOML recipe (path or shipped name, e.g. food101); command-line options win.")] = None,
    out: Annotated[str | None, typer.Option(help="Output folder (default: runs/<data>-<method>).")] = None,
    steps: Annotated[int, typer.Option(
        help="Total optimizer steps (a resumed run trains up to it).")] = 24000,
    batch_size: Annotated[int, typer.Option(
        help="Global batch per step (split over GPUs, --grad-accum).")] = 32,
    lr: Annotated[float | None, typer.Option(help="Learning rate (default: 1e-3; 1e-4 for full).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of data order, noise and label dropout.")] = 0,
    resolution: Annotated[int | None, typer.Option(
        help="Image size in pixels (default: the base's).")] = None,
    num_heads: Annotated[int | None, typer.Option(
        help="Attention heads, for a base of non-standard width that does not record them.",
        show_default=False)] = None,
    mixed_precision: Annotated[str, typer.Option(
        help="auto (bf16 on CUDA, no on CPU), no, fp16, bf16.")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    save_every: Annotated[int, typer.Option(help="Checkpoint every N steps (0: only at the end).")] = 1000,
    sample_every: Annotated[int, typer.Option(
        help="Preview grid every N steps and at step 0 (0: no).")] = 2000,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue the newest checkpoint in --out.")] = False,
    gamma_blocks: Annotated[str | None, typer.Option(
        help="Blocks with scale factors: half (default), all, none or ranges like 0-5,20.")] = None,
    ema: Annotated[bool, typer.Option(
        "--ema/--no-ema", help="Keep an EMA of the trained tensors; the adapter uses it.")] = True,
    ema_decay: Annotated[float, typer.Option(
        help="EMA decay (warmed up as (1+s)/(10+s) early on).")] = 0.9999,
    cache_latents: Annotated[bool, typer.Option("--cache-latents/--no-cache-latents",
                                                help="Encode each image once and reuse the latents.")] = True,
    cache_dir: Annotated[str | None, typer.Option(
        help="Latent cache folder (default: <user cache>/latents).")] = None,
    grad_checkpointing: Annotated[bool, typer.Option(
        "--grad-checkpointing", help="Recompute activations: less memory, slower.")] = False,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the model.")] = False,
    keep: Annotated[int, typer.Option(help="Checkpoints to keep (the newest).")] = 2,
    log_every: Annotated[int, typer.Option(help="Write log.jsonl every N steps.")] = 1,
    warmup: Annotated[int, typer.Option(help="Linear learning-rate warmup steps.")] = 0,
    grad_accum: Annotated[int, typer.Option(help="Gradient accumulation micro-steps per step.")] = 1,
    adapter_dtype: Annotated[str, typer.Option(help="fp16 (stored as differences) or fp32.")] = "fp16",
    log_with: Annotated[str | None, typer.Option(help="Also log to tensorboard (if installed).")] = None,
    num_workers: Annotated[int | None, typer.Option(
        help="Image-loading processes (default: min(8, CPUs)).")] = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print the run summary as one JSON object.")] = False,
) -> None:
    _run_fit(_given_options(ctx), recipe, as_json)


def _given_options(ctx: typer.Context) -> dict:
    """The options typed on the command line (defaults must not override a recipe)."""
    return {
        name: value for name, value in ctx.params.items()
        if name not in ("recipe", "as_json")
        # Typer vendors click, so compare the source by name.
        and getattr(ctx.get_parameter_source(name), "name", None) in ("COMMANDLINE", "ENVIRONMENT")
    }


def _run_fit(given: dict, recipe: str | None, as_json: bool, upscale: bool = False) -> None:
    from difffit_cli.engine.recipes import resolve_fit_config
    from difffit_cli.engine.train import fit as run_fit

    config = resolve_fit_config(given, recipe)
    base = None
    if upscale:
        from difffit_cli.engine.bases import load_base
        from difffit_cli.engine.resolution import check_upscale

        if config.base is None:
            raise DiffFitError("No base given.", hint="Pass --base, e.g. --base DiT-XL/2-256.")
        if config.resolution is None:
            raise DiffFitError("upscale-res needs a target resolution.", hint="Pass --to PX, e.g. --to 512.")
        base = load_base(config.base, vae=config.vae, num_heads=config.num_heads)
        check_upscale(base, config.resolution)
    result = run_fit(config, base=base)
    from accelerate import PartialState

    if not PartialState().is_main_process:  # under accelerate launch / torchrun, one report
        return
    if as_json:
        emit_json(result.to_dict())
    elif result.interrupted:
        err.print(f"[yellow]Stopped at step {result.step}; checkpoint saved; go on with --resume.[/yellow]")
    else:
        loss = f", last loss {result.loss:.4f}" if result.loss is not None else ""
        err.print(f"[green]Done:[/green] {result.step} steps{loss}; adapter: {result.adapter}")
    if result.interrupted:
        raise typer.Exit(130)


UPSCALE_HELP = (
    "Move a base to a higher resolution with DiffFit's positional-encoding trick, then fit.\n\n"
    "The token grid grows with the resolution (256 -> 512 px: 16x16 -> 32x32 tokens). "
    "--pe trick (the paper's) computes the new grid's sin-cos positions on the base grid's scale "
    "(0, 0.5, ..., 15.5), so every even position is one the base was trained with; --pe plain uses the "
    "standard positions of the new grid.\n\n"
    "Only moves up are supported. Every fit option applies; the adapter records the resolution and the "
    "positional mode, and sample, eval-fid and merge honour them.\n"
    """
[bold]Examples[/bold]

  [dim]# the paper's ImageNet 512 setting from the public 256 checkpoint[/dim]
  difffit upscale-res ./imagenet --base DiT-XL/2-256 --to 512

  [dim]# the same from the shipped recipe (it names the data and the schedule)[/dim]
  difffit upscale-res --recipe imagenet512
"""
)


def upscale_res(
    ctx: typer.Context,
    to: Annotated[int | None, typer.Option(
        "--to", help="Target resolution in pixels: larger than the base's, a multiple of VAE factor x patch.",
        show_default=False)] = None,
    pe: Annotated[str | None, typer.Option(
        "--pe", help="Positional embedding of the new grid: trick (default, the paper's) or plain.",
        show_default=False)] = None,
    **fit_options,
) -> None:
    given = _given_options(ctx)
    if "to" in given:
        given["resolution"] = given.pop("to")
    if "pe" in given:
        given["pos_embed"] = given.pop("pe")
    _run_fit(given, fit_options["recipe"], fit_options["as_json"], upscale=True)


def _with_fit_options(command):
    """Give `command` fit's options after its own (one definition of every fit option)."""
    own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.kind != p.VAR_KEYWORD]
    fit_params = [p for name, p in inspect.signature(fit, eval_str=True).parameters.items()
                  if name not in ("ctx", "resolution")]
    command.__signature__ = inspect.Signature(own + fit_params)
    command.__annotations__ = {p.name: p.annotation for p in own + fit_params}
    return command


app.command("upscale-res", rich_help_panel=TRAIN, help=UPSCALE_HELP)(_with_fit_options(upscale_res))


# ---------------------------------------------------------------------------------------------
# Generate
# ---------------------------------------------------------------------------------------------


@app.command(rich_help_panel=GENERATE)
def sample(
    sources: Annotated[
        list[str],
        typer.Argument(help="Adapter file(s), a merged model, or a base (alias, hub id, file, random:...).",
                       show_default=False),
    ],
    n: Annotated[int, typer.Option("-n", "--num-images", help="Images per source.")] = 16,
    base: Annotated[str | None, typer.Option(help="Base for adapters (default: from the adapter).")] = None,
    vae: Annotated[str | None, typer.Option(help="VAE spec (default: the base's / adapter's).")] = None,
    classes: Annotated[
        list[str] | None,
        typer.Option("--class", help="Class name or index; repeat to cycle (default: all classes in turn)."),
    ] = None,
    cfg_scale: Annotated[float, typer.Option(help="Guidance: 4.0 to look at, 1.5 for FID; 1 = none.")] = 4.0,
    cfg_channels: Annotated[str, typer.Option(help="Guide '3' latent channels (reference) or 'all'.")] = "3",
    steps: Annotated[
        int | None, typer.Option(help="Sampling steps (default: ddpm 250, ddim 50, dpm-solver 25).")
    ] = None,
    scheduler: Annotated[str, typer.Option(help="ddpm (reference), ddim or dpm-solver.")] = "ddpm",
    seed: Annotated[int, typer.Option(help="Image i depends only on (seed, i), not on the batch size.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass (per process).")] = 16,
    mixed_precision: Annotated[str, typer.Option(help="no (exact fp32), fp16 or bf16 autocast.")] = "no",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    out: Annotated[
        Path | None, typer.Option(help="Output folder (default samples/<source>; a sub-folder per source).")
    ] = None,
    npz: Annotated[bool, typer.Option("--npz", help="Also write samples.npz (N x H x W x 3 uint8).")] = False,
    force_base: Annotated[bool, typer.Option(help="Apply adapters to a base of other weights.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """Generate images from an adapter, a merged model or a base.

    Writes OUT/000000.png ..., OUT/grid.png, OUT/sample.json (the settings) and, with --npz,
    OUT/samples.npz for OpenAI's ADM evaluator. Several adapters of one base load it once.
    Under `accelerate launch` the images are split over the processes.

    [bold]Examples[/bold]

      [dim]# 16 images, 4x4 grid, in samples/food101[/dim]
      difffit sample runs/food101/adapter.safetensors

      [dim]# two named classes, 25 DPM-Solver steps[/dim]
      difffit sample adapter.safetensors --class pizza --class sushi --scheduler dpm-solver

      [dim]# FID samples (paper setting) on 8 GPUs, one npz[/dim]
      accelerate launch --num_processes 8 -m difffit_cli sample adapter.safetensors \\
          -n 50000 --cfg-scale 1.5 --npz

      [dim]# compare adapters of one base (swapped, not reloaded)[/dim]
      difffit sample runs/a/adapter.safetensors runs/b/adapter.safetensors --out samples/compare
    """
    from accelerate import PartialState

    from difffit_cli.engine.devices import resolve_device
    from difffit_cli.engine.io import atomic_path
    from difffit_cli.engine.sample import DEFAULT_STEPS, iter_sources, parse_classes, sample_to_folder

    channels, dtype = _sampling_numerics(cfg_channels, mixed_precision)
    resolve_device(device)  # a clear error for an unknown device or a missing GPU
    state = PartialState(cpu=device == "cpu")
    steps = DEFAULT_STEPS.get(scheduler) if steps is None else steps  # an unknown scheduler is refused below
    options = {
        "cfg_scale": cfg_scale, "cfg_channels": channels, "scheduler": scheduler,
        "steps": steps, "seed": seed, "batch_size": batch_size, "device": state.device, "dtype": dtype,
    }
    results = []
    loaded = iter_sources(sources, base=base, vae=vae, force_base=force_base, device=state.device)
    for name, source_base, meta, class_names in loaded:
        folder = (out or Path("samples")) / name if len(sources) > 1 or out is None else out
        class_ids = parse_classes(classes or [], class_names, source_base.model.config.num_classes)
        summary = sample_to_folder(source_base, folder, n, npz=npz, state=state, classes=class_ids, **options)
        summary["source"] = sources[len(results)]
        if state.is_main_process:
            settings = {
                "source": summary["source"], "base": source_base.spec,
                "base_fingerprint": source_base.fingerprint, "vae": source_base.vae_spec,
                "adapter": meta.to_dict() if meta else None, "n": n, "classes": class_ids,
                **{k: str(v) if k in ("device", "dtype") else v for k, v in options.items()},
            }
            with atomic_path(folder / "sample.json") as tmp:
                tmp.write_text(json.dumps(settings, indent=2, default=str) + "\n")
            err.print(f"[green]Wrote[/green] {n} images to {folder} "
                      f"({summary['images_per_second']:.2f} img/s)", highlight=False)
        results.append(summary)
    if as_json and state.is_main_process:
        emit_json({"outputs": results, "n": n, "scheduler": scheduler, "steps": steps, "seed": seed,
                   "cfg_scale": cfg_scale, "cfg_channels": cfg_channels, "processes": state.num_processes})


def _sampling_numerics(cfg_channels: str, mixed_precision: str):
    """--cfg-channels and --mixed-precision, checked: (3 or "all", the sampler's torch dtype)."""
    import torch

    from difffit_cli.engine.devices import autocast_dtype

    if cfg_channels not in ("3", "all"):
        raise DiffFitError(f"--cfg-channels must be 3 or all (got {cfg_channels!r}).")
    return ("all" if cfg_channels == "all" else 3), autocast_dtype(mixed_precision) or torch.float32


@app.command(rich_help_panel=GENERATE)
def merge(
    adapter: Annotated[Path, typer.Argument(help="The adapter.safetensors to fold into its base.")],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output: a .safetensors file, or a folder for diffusers.")
    ],
    base: Annotated[
        str | None, typer.Option("--base", help="Base to merge into (default: the one the adapter names).")
    ] = None,
    fmt: Annotated[
        str,
        typer.Option(
            "--format", help="original: one .safetensors that --base accepts; diffusers: a DiTPipeline folder"
        ),
    ] = "original",
    force_base: Annotated[
        bool, typer.Option("--force-base", help="Merge even if the base's fingerprint is not the adapter's.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """Fold an adapter into its base and write a standalone model.

    gamma is folded into attn.proj and mlp.fc2 (gamma * (W x + b) = (gamma W) x + gamma b), so the merged
    model runs at the base's speed with no adapter code. DiTPipeline runs with diffusers' numerics, which
    differ slightly from the reference DiT that difffit sample uses.

    [bold]Examples[/bold]

    difffit merge runs/food/adapter.safetensors --out food.safetensors

    difffit sample food.safetensors -n 16   [dim]# the merged file is a base[/dim]

    difffit merge runs/food/adapter.safetensors --format diffusers --out food-pipeline/
    """
    from difffit_cli.engine.merge import merge_adapter

    summary = merge_adapter(str(adapter), out, base=base, fmt=fmt, force_base=force_base)
    if as_json:
        emit_json(summary)
        return
    _print_fields(f"Merged into {summary['out']}", summary)


def _print_fields(title: str, fields: dict) -> None:
    """A key/value table on stderr; long lists and dicts are shortened to one line."""
    from rich.table import Table

    table = Table(title=title, show_header=False, box=None, title_justify="left")
    for key, value in fields.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        elif isinstance(value, list):
            more = f" ... ({len(value)} in all)" if len(value) > 10 else ""
            value = ", ".join(map(str, value[:10])) + more
        elif isinstance(value, int) and not isinstance(value, bool):
            value = f"{value:,}"
        elif isinstance(value, float):
            value = f"{value:.4g}"
        table.add_row(f"[bold]{key}[/bold]", str(value))
    err.print(table, highlight=False)


# ---------------------------------------------------------------------------------------------
# Evaluate
# ---------------------------------------------------------------------------------------------


@app.command("eval-fid", rich_help_panel=EVALUATE)
def eval_fid(
    generated: Annotated[str, typer.Argument(
        help="Image folder, .npz (arr_0 images), or an adapter / base to sample from in memory.",
        show_default=False)],
    reference: Annotated[str, typer.Argument(
        help="Image folder, ADM reference batch .npz (arr_0 and/or mu/sigma), or a --save-stats file.",
        show_default=False)],
    n: Annotated[int | None, typer.Option(
        "-n", "--num-images", help="Generated images to use: the first N of a folder/npz (default all), "
        "or N samples from a model (default 50,000).", show_default=False)] = None,
    metrics: Annotated[str, typer.Option(help="Comma-separated: fid, kid, isc (Inception Score), prc "
                                         "(precision/recall).")] = "fid",
    inception_weights: Annotated[Path | None, typer.Option(
        help="FID Inception weights (torch-fidelity's weights-inception-2015-12-05-6726825d.pth); default: "
        "the torch hub cache, downloaded once.", show_default=False)] = None,
    batch_size: Annotated[int, typer.Option(help="Images per Inception (and sampling) batch.")] = 64,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    save_stats: Annotated[Path | None, typer.Option(
        help="Also write the reference statistics to this .npz (usable as REFERENCE later).",
        show_default=False)] = None,
    kid_subsets: Annotated[int, typer.Option(help="KID: number of random subsets.")] = 100,
    kid_subset_size: Annotated[int, typer.Option(help="KID: images per subset (<= images per side).")] = 1000,
    base: Annotated[str | None, typer.Option(help="Model input: base for an adapter (default: its own).",
                                                show_default=False)] = None,
    vae: Annotated[str | None, typer.Option(help="Model input: VAE spec.", show_default=False)] = None,
    classes: Annotated[list[str] | None, typer.Option(
        "--class", help="Model input: class name or index; repeat to cycle (default: all in turn).",
        show_default=False)] = None,
    cfg_scale: Annotated[float, typer.Option(help="Model input: guidance (1.5: the paper's FID).")] = 1.5,
    cfg_channels: Annotated[str, typer.Option(help="Model input: guide '3' channels (reference) or 'all'.")
                            ] = "3",
    steps: Annotated[int | None, typer.Option(help="Model input: sampling steps (default per scheduler).",
                                                 show_default=False)] = None,
    scheduler: Annotated[str, typer.Option(help="Model input: ddpm (reference), ddim, dpm-solver.")] = "ddpm",
    seed: Annotated[int, typer.Option(help="Model input: sample i depends only on (seed, i).")] = 0,
    mixed_precision: Annotated[str, typer.Option(help="Model input: no (exact fp32), fp16 or bf16.")] = "no",
    force_base: Annotated[bool, typer.Option(help="Model input: apply an adapter to a base of other weights.")
                          ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """FID (and KID, IS, precision/recall) between generated and reference images.

    Features: torch-fidelity's FID Inception (TF-ported 2015-12-05 weights, TF-exact resizing).
    FIDs are comparable with published numbers.
    Reference statistics are cached by content: a second evaluation extracts nothing from the reference.

    [bold]Examples[/bold]

      [dim]# a folder of samples against a folder of real images[/dim]
      difffit eval-fid samples/food101 data/food101/test --metrics fid,kid,prc

      [dim]# paper protocol: 50k samples at cfg 1.5 as an npz, against OpenAI's ADM reference batch[/dim]
      difffit sample adapter.safetensors -n 50000 --cfg-scale 1.5 --npz --out samples/fid
      difffit eval-fid samples/fid/samples.npz VIRTUAL_imagenet256_labeled.npz --json

      [dim]# sample 10k images in memory (nothing written) and score them[/dim]
      difffit eval-fid adapter.safetensors data/food101/test -n 10000 --metrics fid,isc

      [dim]# keep the reference statistics in a file and reuse it; weights from a local file[/dim]
      difffit eval-fid samples/ data/test --save-stats test-stats.npz
      difffit eval-fid samples2/ test-stats.npz --inception-weights weights-inception-2015-12-05-6726825d.pth
    """

    from difffit_cli.engine.metrics import evaluate

    channels, dtype = _sampling_numerics(cfg_channels, mixed_precision)
    sample_options = {
        "base": base, "vae": vae, "force_base": force_base, "classes": classes, "cfg_scale": cfg_scale,
        "cfg_channels": channels, "scheduler": scheduler, "steps": steps, "seed": seed, "dtype": dtype,
    }
    result = evaluate(
        generated, reference, metrics=metrics, num_samples=n,
        inception_weights=str(inception_weights) if inception_weights else None, batch_size=batch_size,
        device=device, save_stats=save_stats, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size,
        sample_options=sample_options, progress=True,
    )
    for path, reason in result.skipped[:20]:
        err.print(f"[yellow]Skipped[/yellow] {path}: {reason}", highlight=False)
    if result.skipped:
        err.print(f"[yellow]{len(result.skipped)} unreadable image(s) skipped.[/yellow]", highlight=False)
    if as_json:
        emit_json(result.to_json())
        return
    from rich.table import Table

    names = {"fid": "FID", "kid_mean": "KID", "kid_std": "KID std", "isc_mean": "Inception Score",
             "isc_std": "IS std", "precision": "Precision", "recall": "Recall"}
    table = Table(title="eval-fid", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result.metrics.items():
        table.add_row(names[key], f"{value:.6g}")
    table.add_row("generated images", f"{result.num_generated:,}", style="dim")
    table.add_row(f"reference images ({result.reference_source})", f"{result.num_reference:,}" if
                  result.num_reference else "unknown", style="dim")
    err.print(table)


# ---------------------------------------------------------------------------------------------
# Inspect
# ---------------------------------------------------------------------------------------------


@app.command(rich_help_panel=INSPECT)
def info(
    source: Annotated[
        str, typer.Argument(help="An adapter file, or a base (alias, hub id, local checkpoint, random:...).")
    ],
    method: Annotated[
        str | None, typer.Option("--method", help="Show what this method would train: difffit, bitfit, full.")
    ] = None,
    num_classes: Annotated[
        int | None, typer.Option("--num-classes", help="Classes of the target dataset (with --method).")
    ] = None,
    gamma_blocks: Annotated[
        str | None,
        typer.Option("--gamma-blocks", help="Blocks with gamma: half (default), all, none, 0-5,20.")
    ] = None,
    base: Annotated[
        str | None, typer.Option("--base", help="For an adapter: check this base's fingerprint against it.")
    ] = None,
    resolution: Annotated[
        int | None, typer.Option("--resolution", help="Image size in pixels, for random: bases.")
    ] = None,
    num_heads: Annotated[
        int | None, typer.Option("--num-heads", help="Attention heads, for a base of non-standard width.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """Architecture, size, classes and fingerprint of a base or an adapter; what a method would train.

    [bold]Examples[/bold]

    difffit info DiT-XL/2-256

    difffit info random:DiT-XL/2 --method difffit --num-classes 101

    difffit info runs/food/adapter.safetensors --json
    """
    from difffit_cli.engine.adapter import describe_adapter, is_adapter_file
    from difffit_cli.engine.difffit import describe_method

    if is_adapter_file(source):
        if method or num_classes or gamma_blocks:
            raise DiffFitError("--method, --num-classes and --gamma-blocks apply to bases, not adapters.")
        report = describe_adapter(source)
        if base is not None:
            from difffit_cli.engine.bases import load_base

            report["checked_base"] = base
            report["checked_base_matches"] = load_base(base).fingerprint == report["base_fingerprint"]
    else:
        from difffit_cli.engine.bases import describe_base, load_base

        loaded = load_base(source, resolution=resolution, num_heads=num_heads)
        report = describe_base(loaded)
        if method is not None:
            trained = describe_method(
                loaded.config, method, num_classes=num_classes, gamma_blocks=gamma_blocks
            )
            report["target_num_classes"] = trained.pop("num_classes")
            report["adapted_total_params"] = trained.pop("total_params")
            report.update(trained)
    if as_json:
        emit_json(report)
        return
    _render_info(report)


def _render_info(report: dict) -> None:
    from rich.table import Table

    groups = report.pop("trainable_groups", None)
    _print_fields(f"{report['kind']}: {report.get('path') or report.get('spec', '')}", report)
    if groups:
        total = report.get("adapted_total_params", report["total_params"])
        trained = Table(title=f"What {report['method']} trains")
        trained.add_column("group")
        trained.add_column("parameters", justify="right")
        trained.add_column("% of model", justify="right")
        for name, count in [*groups.items(), ("total", sum(groups.values()))]:
            trained.add_row(name, f"{count:,}", f"{100 * count / total:.4f}")
        err.print(trained)


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
    _print_fields(f"difffit {__version__}", report)


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
