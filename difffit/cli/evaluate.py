"""`difffit eval-fid`: FID and friends between generated and reference images; CLIP score against prompts."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from difffit.cli import _options as opt
from difffit.cli._conditioning import check_conditioning_options
from difffit.cli._render import emit_json, print_table, say

if TYPE_CHECKING:
    from difffit.engine.evaluation.metrics import Evaluation

METRIC_NAMES = {
    "fid": "FID",
    "kid_mean": "KID",
    "kid_std": "KID std",
    "isc_mean": "Inception Score",
    "isc_std": "IS std",
    "precision": "Precision",
    "recall": "Recall",
    "clip_score": "CLIP score",
}
SKIPPED_SHOWN = 20

# eval-fid's own arguments and options (those it shares with other commands are in _options.py)
Generated = Annotated[
    str,
    typer.Argument(
        metavar="GENERATED",
        help="Image folder, .npz (arr_0 images), or an adapter / base to sample from in memory.",
        show_default=False,
    ),
]
Reference = Annotated[
    str | None,
    typer.Argument(
        metavar="REFERENCE",
        help="Image folder, ADM reference batch .npz (arr_0 and/or mu/sigma), or a --save-stats file "
        "(not needed for --metrics clip alone).",
        show_default=False,
    ),
]
Metrics = Annotated[
    str,
    typer.Option(
        help="Comma-separated: fid, kid, isc (Inception Score), prc (precision/recall), clip (CLIP score of each "
        "image against its prompt)."
    ),
]
SaveStats = Annotated[
    Path | None,
    typer.Option(
        help="Also write the reference statistics to this .npz (usable as REFERENCE later); an existing file "
        "needs --overwrite.",
        show_default=False,
    ),
]
KidSubsets = Annotated[int, typer.Option(help="KID: number of random subsets.")]
KidSubsetSize = Annotated[int, typer.Option(help="KID: images per subset (<= images per side).")]


EVAL_FID_HELP = """FID (and KID, IS, precision/recall) between generated and reference images.

Features: torch-fidelity's FID Inception (TF-ported 2015-12-05 weights, TF-exact resizing).
FIDs are comparable with published numbers.
Reference statistics are cached by content: a second evaluation extracts nothing from the reference.
The CLIP score (--metrics clip) is the mean of 100 * max(cos(image, prompt), 0) with transformers' CLIP,
over a folder written by `difffit sample --prompt`, whose sample.json records each image's prompt.
When GENERATED is an adapter or a base, the sampling options (--class, --cfg-scale, --scheduler, ...)
say how to sample it; a text-to-image one samples the prompts of --prompts FILE in turn (one image each
unless -n says more), and the clip metric scores each sample against its prompt.

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

  [dim]# prompt samples: FID against real images and the CLIP score against their prompts[/dim]
  difffit eval-fid samples/ramen data/ramen --metrics fid,clip
  difffit eval-fid samples/ramen --metrics clip --clip-model openai/clip-vit-base-patch16 --json

  [dim]# a text-to-image adapter sampled in memory from a prompts file: FID and CLIP score[/dim]
  difffit eval-fid runs/ramen/adapter.safetensors data/ramen --prompts prompts.txt --metrics fid,clip
"""


def eval_fid(
    ctx: typer.Context,
    generated: Generated,
    reference: Reference = None,
    num_samples: opt.EvalNumImages = opt.EVAL.num_samples,
    metrics: Metrics = opt.EVAL.metrics,
    clip_model: opt.ClipModel = opt.EVAL.clip_model,
    inception_weights: opt.InceptionWeights = opt.EVAL.inception_weights,
    batch_size: opt.EvalBatchSize = opt.EVAL.batch_size,
    device: opt.Device = opt.EVAL.device,
    save_stats: SaveStats = opt.EVAL.save_stats,
    kid_subsets: KidSubsets = opt.EVAL.kid_subsets,
    kid_subset_size: KidSubsetSize = opt.EVAL.kid_subset_size,
    base: opt.AdapterBase = opt.EVAL.base,
    vae: opt.Vae = opt.EVAL.vae,
    classes: opt.Classes = opt.EVAL.classes,
    prompts_file: opt.PromptsFile = None,
    cfg_scale: opt.EvalCfgScale = opt.FID.cfg_scale,
    cfg_channels: opt.CfgChannels = opt.FID.cfg_channels,
    steps: opt.SamplingSteps = opt.FID.steps,
    scheduler: opt.SampleScheduler = opt.FID.scheduler,
    seed: opt.SamplingSeed = opt.FID.seed,
    mixed_precision: opt.SamplingPrecision = opt.FID.mixed_precision,
    force_base: opt.ForceBase = opt.EVAL.force_base,
    overwrite: opt.Overwrite = opt.EVAL.overwrite,
    as_json: opt.Json = False,
) -> None:
    """`eval-fid`: the options as an EvalConfig, one `evaluate` call, its result rendered (help: EVAL_FID_HELP)."""
    from difffit.engine.evaluation.metrics import evaluate
    from difffit.engine.evaluation.options import EvalConfig
    from difffit.engine.evaluation.sample import SamplingOptions, read_prompts

    images = Path(generated).expanduser().is_dir() or generated.lower().endswith(".npz")  # not a model to sample
    check_conditioning_options(ctx, [] if images else [generated], base)
    sampling = SamplingOptions(
        cfg_scale=cfg_scale,
        cfg_channels=cfg_channels,
        scheduler=scheduler,
        steps=steps,
        seed=seed,
        batch_size=batch_size,
        mixed_precision=mixed_precision,
        device=device,
    )
    config = EvalConfig(
        metrics=metrics,
        num_samples=num_samples,
        inception_weights=inception_weights,
        batch_size=batch_size,
        device=device,
        save_stats=save_stats,
        kid_subsets=kid_subsets,
        kid_subset_size=kid_subset_size,
        sampling=sampling,
        classes=classes,
        base=base,
        vae=vae,
        force_base=force_base,
        clip_model=clip_model,
        overwrite=overwrite,
        prompts=read_prompts(prompts_file) if prompts_file is not None else None,
    )
    result = evaluate(generated, reference, config, progress=True)
    _render_skipped(result.skipped)
    if as_json:
        emit_json(result.to_json())
    else:
        _render_metrics(result)


def _render_skipped(skipped: list[tuple[Path, str]]) -> None:
    for path, reason in skipped[:SKIPPED_SHOWN]:
        say(("Skipped", "yellow"), f" {path}: {reason}")
    if skipped:
        say((f"{len(skipped)} unreadable image(s) skipped.", "yellow"))


def _render_metrics(result: Evaluation) -> None:
    from rich.table import Table

    table = Table(title="eval-fid", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result.metrics.items():
        table.add_row(METRIC_NAMES[key], f"{value:.6g}")
    table.add_row("generated images", f"{result.num_generated:,}", style="dim")
    if result.reference_source != "none":
        reference = f"{result.num_reference:,}" if result.num_reference else "unknown"
        table.add_row(f"reference images ({result.reference_source})", reference, style="dim")
    print_table(table)
