"""`difffit fit` and `difffit upscale-res`: the same engine call, one with a resolution move."""

from __future__ import annotations

from typing import Annotated

import typer
from typer.core import TyperCommand

from difffit.cli import _options as opt
from difffit.cli._render import emit_json, is_main_process, say
from difffit.engine.errors import DiffFitError

EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}  # the shell's 128 + signal number

FIT_HELP = """Fine-tune a base on an image folder; writes an adapter of a few MB.

Outputs in --out: adapter.safetensors, checkpoints/, samples/, log.jsonl, config.toml.

[bold]Examples[/bold]

  [dim]# DiffFit on a folder with one sub-folder per class (DiT-XL/2 at 256 px, bf16 on a GPU)[/dim]
  difffit fit ./flowers --base DiT-XL/2-256

  [dim]# a paper recipe (recipes/food101.toml); options on the command line win over the recipe[/dim]
  difffit fit --recipe food101 --steps 12000 --out runs/food101-short

  [dim]# continue the newest checkpoint up to 48k steps in total[/dim]
  difffit fit --recipe food101 --resume --steps 48000

  [dim]# 8 GPUs (--batch-size is the global batch; each GPU takes 1/8 of it)[/dim]
  accelerate launch --multi_gpu --num_processes 8 -m difffit fit ./flowers --base DiT-XL/2-256

  [dim]# hold out 10% of each class; validation loss every 1000 steps; keep best/adapter.safetensors by it[/dim]
  difffit fit ./flowers --base DiT-XL/2-256 --val-fraction 0.1 --val-every 1000 --keep-best val_loss

  [dim]# a Hugging Face dataset (downloaded once; also a save_to_disk or parquet folder)[/dim]
  difffit fit hf:OWNER/NAME:train --base DiT-XL/2-256 --image-column image --label-column label

  [dim]# text-to-image: PixArt-α 512 on captioned images (NAME.txt beside NAME.png, or metadata.jsonl)[/dim]
  difffit fit ./my_captioned_images --base PixArt-alpha/PixArt-XL-2-512x512 --validation-prompt "a bowl of ramen"

  [dim]# the same with square crops instead of aspect-ratio buckets (the default for text-to-image bases)[/dim]
  difffit fit ./my_captioned_images --base PixArt-alpha/PixArt-XL-2-512x512 --buckets none

  [dim]# a tiny CPU run to see everything work[/dim]
  difffit fit ./images --base random:DiT-S/2 --vae identity --resolution 32 --steps 50 --batch-size 8
"""

UPSCALE_HELP = """Move a base to a higher resolution with DiffFit's positional-encoding trick, then fit.

The token grid grows with the resolution (256 -> 512 px: 16x16 -> 32x32 tokens). --pe trick (the paper's) \
computes the new grid's sin-cos positions on the base grid's scale (0, 0.5, ..., 15.5), so every even position \
is one the base was trained with; --pe plain uses the standard positions of the new grid.

Only moves up are supported. Every fit option applies; the adapter records the resolution and the positional \
mode, and sample, eval-fid and merge honour them.

[bold]Examples[/bold]

  [dim]# the paper's ImageNet 512 setting from the public 256 checkpoint[/dim]
  difffit upscale-res ./imagenet --base DiT-XL/2-256 --to 512

  [dim]# the same from the shipped recipe (it names the data and the schedule)[/dim]
  difffit upscale-res --recipe imagenet512
"""

# upscale-res's own options. One function serves both commands; each command shows only its options.
To = Annotated[int | None, typer.Option(
    "--to", help="Target resolution in pixels: larger than the base's, a multiple of VAE factor x patch.",
    show_default=False)]
Pe = Annotated[str | None, typer.Option(
    "--pe", help="Positional embedding of the new grid: trick (default, the paper's) or plain.", show_default=False)]
FIT_ONLY, UPSCALE_ONLY = ("resolution",), ("to", "pe")
RENAMED = {"to": "resolution", "pe": "pos_embed"}  # upscale-res's flags -> FitConfig fields


def command_without(*names: str) -> type[TyperCommand]:
    """A command class that leaves out the named parameters (they keep their Python defaults)."""

    class Command(TyperCommand):
        def __init__(self, *args, params=None, **kwargs):
            super().__init__(*args, params=[p for p in params or () if p.name not in names], **kwargs)

    return Command


FitCommand, UpscaleCommand = command_without(*UPSCALE_ONLY), command_without(*FIT_ONLY)


def fit(
    ctx: typer.Context,
    data: opt.Data = None,
    to: To = None,
    pe: Pe = None,
    base: opt.FitBase = None,
    vae: opt.Vae = None,
    method: opt.Method = "difffit",
    recipe: opt.Recipe = None,
    out: opt.FitOut = None,
    steps: opt.FitSteps = 24000,
    batch_size: opt.FitBatchSize = 32,
    lr: opt.LearningRate = None,
    seed: opt.FitSeed = 0,
    resolution: opt.Resolution = None,
    num_heads: opt.NumHeads = None,
    mixed_precision: opt.FitPrecision = "auto",
    device: opt.Device = "auto",
    save_every: opt.SaveEvery = 1000,
    sample_every: opt.SampleEvery = 2000,
    resume: opt.Resume = False,
    gamma_blocks: opt.GammaBlocks = None,
    gamma_placement: opt.GammaPlacement = "branch",
    rank: opt.Rank = 8,
    lora_alpha: opt.LoraAlpha = None,
    lora_targets: opt.LoraTargets = None,
    adapter_dim: opt.AdapterDim = 64,
    prompt_tokens: opt.PromptTokens = 8,
    ema: opt.Ema = True,
    ema_decay: opt.EmaDecay = 0.9999,
    cache_latents: opt.CacheLatents = True,
    cache_dir: opt.CacheDir = None,
    grad_checkpointing: opt.GradCheckpointing = False,
    compile: opt.Compile = "auto",
    keep: opt.Keep = 2,
    log_every: opt.LogEvery = 1,
    warmup: opt.Warmup = 0,
    grad_accum: opt.GradAccum = 1,
    adapter_dtype: opt.AdapterDtype = "fp16",
    log_with: opt.LogWith = None,
    num_workers: opt.NumWorkers = None,
    image_column: opt.ImageColumn = None,
    label_column: opt.LabelColumn = None,
    caption_column: opt.CaptionColumn = None,
    caption_template: opt.CaptionTemplate = None,
    caption_dropout: opt.CaptionDropout = None,
    max_text_tokens: opt.MaxTextTokens = None,
    validation_prompts: opt.ValidationPrompts = None,
    buckets: opt.Buckets = None,
    class_balance: opt.ClassBalance = False,
    repeats: opt.Repeats = 1,
    snr_gamma: opt.SnrGamma = None,
    p2_gamma: opt.P2Gamma = None,
    timestep_sampling: opt.TimestepSampling = None,
    val_fraction: opt.ValFraction = 0.0,
    val_data: opt.ValData = None,
    val_every: opt.ValEvery = 0,
    eval_every: opt.EvalEvery = 0,
    eval_n: opt.EvalN = None,
    eval_reference: opt.EvalReference = None,
    eval_metrics: opt.EvalMetrics = "fid",
    eval_prompts: opt.EvalPrompts = None,
    clip_model: opt.ClipModel = None,
    inception_weights: opt.InceptionWeights = None,
    keep_best: opt.KeepBest = None,
    as_json: opt.Json = False,
) -> None:
    """`fit`, and `upscale-res` (the same run with --to as its resolution)."""
    given = {RENAMED.get(name, name): value for name, value in _given_options(ctx).items()}
    _run(given, recipe, as_json, needs_resolution=ctx.info_name == "upscale-res")


def _given_options(ctx: typer.Context) -> dict:
    """The options typed on the command line (defaults must not override a recipe)."""
    return {
        name: value for name, value in ctx.params.items()
        if name not in ("recipe", "as_json")
        # Typer vendors click, so compare the source by name.
        and getattr(ctx.get_parameter_source(name), "name", None) in ("COMMANDLINE", "ENVIRONMENT")
    }


def _run(given: dict, recipe: str | None, as_json: bool, needs_resolution: bool = False) -> None:
    from difffit.engine.training import train
    from difffit.engine.training.recipes import resolve_fit_config

    config = resolve_fit_config(given, recipe)
    if needs_resolution and config.resolution is None:  # --to or the recipe's `resolution`
        raise DiffFitError("upscale-res needs a target resolution.", hint="Pass --to PX, e.g. --to 512.")
    if needs_resolution:
        config.pos_embed = config.pos_embed or "trick"  # a positional mode: the base must move up
    result = train.fit(config)
    if not is_main_process():  # under accelerate launch / torchrun, one report
        return
    if as_json:
        emit_json(result.to_dict())
    elif result.interrupted:
        say((f"Stopped at step {result.step}; checkpoint saved; go on with --resume.", "yellow"))
    else:
        loss = f", last loss {result.loss:.4f}" if result.loss is not None else ""
        say(("Done:", "green"), f" {result.step} steps{loss}; adapter: {result.adapter}")
        if result.best_step is not None:
            say(f"Best {config.keep_best} {result.best_metric:.4f} at step {result.best_step}: "
                f"{result.out_dir / 'best' / 'adapter.safetensors'}")
    if result.interrupted:
        raise typer.Exit(EXIT_CODES.get(result.stop_signal, 130))
