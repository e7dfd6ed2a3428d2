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
To = Annotated[
    int | None,
    typer.Option(
        "--to",
        help="Target resolution in pixels: larger than the base's, a multiple of VAE factor x patch.",
        show_default=False,
    ),
]
Pe = Annotated[
    str | None,
    typer.Option(
        "--pe", help="Positional embedding of the new grid: trick (default, the paper's) or plain.", show_default=False
    ),
]
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
    data: opt.Data = opt.FIT.data,
    to: To = opt.FIT.resolution,
    pe: Pe = opt.FIT.pos_embed,
    base: opt.FitBase = opt.FIT.base,
    vae: opt.Vae = opt.FIT.vae,
    method: opt.Method = opt.FIT.method,
    recipe: opt.Recipe = None,
    out: opt.FitOut = opt.FIT.out,
    steps: opt.FitSteps = opt.FIT.steps,
    batch_size: opt.FitBatchSize = opt.FIT.batch_size,
    lr: opt.LearningRate = opt.FIT.lr,
    seed: opt.FitSeed = opt.FIT.seed,
    resolution: opt.Resolution = opt.FIT.resolution,
    num_heads: opt.NumHeads = opt.FIT.num_heads,
    mixed_precision: opt.FitPrecision = opt.FIT.mixed_precision,
    device: opt.Device = opt.FIT.device,
    save_every: opt.SaveEvery = opt.FIT.save_every,
    sample_every: opt.SampleEvery = opt.FIT.sample_every,
    resume: opt.Resume = opt.FIT.resume,
    gamma_blocks: opt.GammaBlocks = opt.FIT.gamma_blocks,
    gamma_placement: opt.GammaPlacement = opt.METHOD.gamma_placement,
    rank: opt.Rank = opt.METHOD.rank,
    lora_alpha: opt.LoraAlpha = opt.METHOD.lora_alpha,
    lora_targets: opt.LoraTargets = opt.METHOD.lora_targets,
    adapter_dim: opt.AdapterDim = opt.METHOD.adapter_dim,
    prompt_tokens: opt.PromptTokens = opt.METHOD.prompt_tokens,
    ema: opt.Ema = opt.FIT.ema,
    ema_decay: opt.EmaDecay = opt.FIT.ema_decay,
    cache_latents: opt.CacheLatents = opt.FIT.cache_latents,
    cache_dir: opt.CacheDir = opt.FIT.cache_dir,
    grad_checkpointing: opt.GradCheckpointing = opt.FIT.grad_checkpointing,
    compile: opt.Compile = opt.FIT.compile,
    keep: opt.Keep = opt.FIT.keep,
    log_every: opt.LogEvery = opt.FIT.log_every,
    warmup: opt.Warmup = opt.FIT.warmup,
    grad_accum: opt.GradAccum = opt.FIT.grad_accum,
    adapter_dtype: opt.AdapterDtype = opt.FIT.adapter_dtype,
    log_with: opt.LogWith = opt.FIT.log_with,
    num_workers: opt.NumWorkers = opt.FIT.num_workers,
    image_column: opt.ImageColumn = opt.FIT.image_column,
    label_column: opt.LabelColumn = opt.FIT.label_column,
    caption_column: opt.CaptionColumn = opt.FIT.caption_column,
    caption_template: opt.CaptionTemplate = opt.FIT.caption_template,
    caption_dropout: opt.CaptionDropout = opt.FIT.caption_dropout,
    max_text_tokens: opt.MaxTextTokens = opt.FIT.max_text_tokens,
    validation_prompts: opt.ValidationPrompts = opt.FIT.validation_prompts,
    buckets: opt.Buckets = opt.FIT.buckets,
    class_balance: opt.ClassBalance = opt.FIT.class_balance,
    repeats: opt.Repeats = opt.FIT.repeats,
    snr_gamma: opt.SnrGamma = opt.FIT.snr_gamma,
    p2_gamma: opt.P2Gamma = opt.FIT.p2_gamma,
    timestep_sampling: opt.TimestepSampling = opt.FIT.timestep_sampling,
    val_fraction: opt.ValFraction = opt.FIT.val_fraction,
    val_data: opt.ValData = opt.FIT.val_data,
    val_every: opt.ValEvery = opt.FIT.val_every,
    eval_every: opt.EvalEvery = opt.FIT.eval_every,
    eval_n: opt.EvalN = opt.FIT.eval_n,
    eval_reference: opt.EvalReference = opt.FIT.eval_reference,
    eval_metrics: opt.EvalMetrics = opt.FIT.eval_metrics,
    eval_prompts: opt.EvalPrompts = opt.FIT.eval_prompts,
    clip_model: opt.ClipModel = opt.FIT.clip_model,
    inception_weights: opt.InceptionWeights = opt.FIT.inception_weights,
    keep_best: opt.KeepBest = opt.FIT.keep_best,
    as_json: opt.Json = False,
) -> None:
    """`fit`, and `upscale-res` (the same run with --to as its resolution)."""
    given = {RENAMED.get(name, name): value for name, value in _given_options(ctx).items()}
    _run(given, recipe, as_json, needs_resolution=ctx.info_name == "upscale-res")


def _given_options(ctx: typer.Context) -> dict:
    """The options typed on the command line (defaults must not override a recipe)."""
    return {
        name: value
        for name, value in ctx.params.items()
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
            say(
                f"Best {config.keep_best} {result.best_metric:.4f} at step {result.best_step}: "
                f"{result.out_dir / 'best' / 'adapter.safetensors'}"
            )
    if result.interrupted:
        raise typer.Exit(EXIT_CODES.get(result.stop_signal, 130))
