"""`difffit sample` and `difffit merge`: images from a model, and a standalone model from an adapter."""

from __future__ import annotations

from typing import Annotated

import typer

from difffit.cli import _options as opt
from difffit.cli._conditioning import check_conditioning_options
from difffit.cli._render import emit_json, is_main_process, print_fields, say

# sample's own arguments and options (those it shares with other commands are in _options.py)
Sources = Annotated[
    list[str],
    typer.Argument(
        metavar="SOURCE",
        help="Adapter file(s), a merged model, or a base (alias, hub id, file, random:...).",
        show_default=False,
    ),
]
Npz = Annotated[bool, typer.Option("--npz", help="Also write samples.npz (N x H x W x 3 uint8).")]

SAMPLE_HELP = """Generate images from an adapter, a merged model or a base.

Writes OUT/000000.png ..., OUT/grid.png, OUT/sample.json (the settings, and each image's prompt) and,
with --npz, OUT/samples.npz for OpenAI's ADM evaluator. Several adapters of one base load it once.
Under `accelerate launch` the images are split over the processes. Image i depends only on the seed,
its class or prompt, and i.

[bold]Examples[/bold]

  [dim]# 16 images, 4x4 grid, in samples/food101[/dim]
  difffit sample runs/food101/adapter.safetensors

  [dim]# two named classes, 25 DPM-Solver steps[/dim]
  difffit sample adapter.safetensors --class pizza --class sushi --scheduler dpm-solver

  [dim]# a text-to-image adapter (PixArt): 4 images of one prompt, at the pipeline's guidance and steps[/dim]
  difffit sample runs/ramen/adapter.safetensors --prompt "a bowl of ramen, studio light" -n 4

  [dim]# prompts from a file, 768x512, 30 steps, guidance 5[/dim]
  difffit sample adapter.safetensors --prompts prompts.txt --width 768 --height 512 --steps 30 --cfg-scale 5

  [dim]# FID samples (paper setting) on 8 GPUs, one npz[/dim]
  accelerate launch --num_processes 8 -m difffit sample adapter.safetensors \\
      -n 50000 --cfg-scale 1.5 --npz

  [dim]# compare adapters of one base (swapped, not reloaded)[/dim]
  difffit sample runs/a/adapter.safetensors runs/b/adapter.safetensors --out samples/compare

  [dim]# sample again into the same folder: replaces (and removes) only difffit's own earlier samples[/dim]
  difffit sample runs/food101/adapter.safetensors -n 8 --overwrite
"""


def sample(
    ctx: typer.Context,
    sources: Sources,
    n: opt.NumImages = 16,
    base: opt.AdapterBase = None,
    vae: opt.Vae = None,
    classes: opt.Classes = None,
    prompts: opt.Prompts = None,
    prompts_file: opt.PromptsFile = None,
    negative_prompt: opt.NegativePrompt = opt.SAMPLE.negative_prompt,
    width: opt.Width = opt.SAMPLE.width,
    height: opt.Height = opt.SAMPLE.height,
    cfg_scale: opt.SampleCfgScale = opt.SAMPLE.cfg_scale,
    cfg_channels: opt.CfgChannels = opt.SAMPLE.cfg_channels,
    steps: opt.SamplingSteps = opt.SAMPLE.steps,
    scheduler: opt.SampleScheduler = opt.SAMPLE.scheduler,
    seed: opt.SamplingSeed = opt.SAMPLE.seed,
    batch_size: opt.SamplingBatchSize = opt.SAMPLE.batch_size,
    mixed_precision: opt.SamplingPrecision = opt.SAMPLE.mixed_precision,
    device: opt.Device = opt.SAMPLE.device,
    compile: opt.Compile = opt.SAMPLE.compile,
    out: opt.SampleOut = None,
    npz: Npz = False,
    force_base: opt.ForceBase = False,
    overwrite: opt.Overwrite = False,
    as_json: opt.Json = False,
) -> None:
    """`sample`: the options as SamplingOptions, one `sample_sources` call, what it wrote (help: SAMPLE_HELP)."""
    from difffit.engine.evaluation.sample import SamplingOptions, read_prompts
    from difffit.engine.methods.sources import sample_sources

    check_conditioning_options(ctx, sources, base)
    options = SamplingOptions(
        cfg_scale=cfg_scale,
        cfg_channels=cfg_channels,
        scheduler=scheduler,
        steps=steps,
        seed=seed,
        batch_size=batch_size,
        mixed_precision=mixed_precision,
        device=device,
        compile=compile,
        negative_prompt=negative_prompt,
        width=width,
        height=height,
    )
    prompts = [*(prompts or []), *(read_prompts(prompts_file) if prompts_file is not None else [])]
    summary = sample_sources(
        sources,
        n,
        options,
        out=out,
        classes=classes,
        prompts=prompts,
        base=base,
        vae=vae,
        force_base=force_base,
        npz=npz,
        overwrite=overwrite,
    )
    if not is_main_process():
        return
    for output in summary["outputs"]:
        say(
            ("Wrote", "green"),
            f" {n} image{'s' if n != 1 else ''} to {output['dir']} ({output['images_per_second']:.2f} img/s)",
        )
    if as_json:
        emit_json(summary)


def merge(
    ctx: typer.Context,
    adapter: Annotated[
        str,
        typer.Argument(
            metavar="ADAPTER", help="The adapter.safetensors to fold into its base, or a Hub adapter (hf://OWNER/NAME)."
        ),
    ],
    out: opt.MergeOut,
    base: opt.AdapterBase = None,
    fmt: Annotated[
        str | None,
        typer.Option(
            "--format",
            help="original (DiT's default): one .safetensors that --base accepts; diffusers (the "
            "text-to-image default): a pipeline folder that diffusers loads; peft: a LoRA adapter folder for "
            "peft.PeftModel.from_pretrained; comfyui (PixArt, SD3, FLUX): one small .safetensors for ComfyUI's "
            "Load LoRA node (put it in ComfyUI/models/loras)",
            show_default=False,
        ),
    ] = None,
    force_base: opt.ForceBase = False,
    overwrite: opt.Overwrite = False,
    as_json: opt.Json = False,
) -> None:
    """Fold an adapter into its base and write a standalone model.

    gamma is folded into attn.proj and mlp.fc2 (gamma * (W x + b) = (gamma W) x + gamma b), so the merged
    model runs at the base's speed with no adapter code. DiTPipeline runs with diffusers' numerics, which
    differ slightly from the reference DiT that difffit sample uses.

    [bold]Examples[/bold]

    difffit merge runs/food/adapter.safetensors --out food.safetensors

    difffit sample food.safetensors -n 16   [dim]# the merged file is a base[/dim]

    difffit merge runs/food/adapter.safetensors --format diffusers --out food-pipeline/

    difffit merge runs/food-lora/adapter.safetensors --format peft --out food-lora-peft/

    difffit merge runs/flux-style/adapter.safetensors --format comfyui --out flux-style.safetensors

    difffit merge runs/food/adapter.safetensors --out food.safetensors --overwrite   [dim]# replace it[/dim]
    """
    from difffit.engine.methods.merge import merge_adapter

    check_conditioning_options(ctx, [adapter], base)
    summary = merge_adapter(adapter, out, base=base, fmt=fmt, force_base=force_base, overwrite=overwrite)
    if as_json:
        emit_json(summary)
    else:
        print_fields(f"Merged into {summary['out']}", summary)
