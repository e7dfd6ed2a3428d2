"""`difffit info` and `difffit env`: what a model is, and what this machine has."""

from __future__ import annotations

from typing import Annotated

import typer

from difffit import __version__
from difffit.cli import _options as opt
from difffit.cli._conditioning import check_conditioning_options
from difffit.cli._render import emit_json, print_fields, print_table, say


def info(
    ctx: typer.Context,
    source: Annotated[
        str,
        typer.Argument(
            metavar="SOURCE", help="An adapter file, or a base (alias, hub id, local checkpoint, random:...)."
        ),
    ],
    method: opt.MethodToDescribe = None,
    num_classes: Annotated[
        int | None,
        typer.Option("--num-classes", help="Classes of the target dataset (with --method).", show_default=False),
    ] = None,
    gamma_blocks: opt.GammaBlocks = None,
    gamma_placement: opt.GammaPlacement = opt.METHOD.gamma_placement,
    rank: opt.Rank = opt.METHOD.rank,
    lora_alpha: opt.LoraAlpha = opt.METHOD.lora_alpha,
    lora_targets: opt.LoraTargets = opt.METHOD.lora_targets,
    adapter_dim: opt.AdapterDim = opt.METHOD.adapter_dim,
    prompt_tokens: opt.PromptTokens = opt.METHOD.prompt_tokens,
    base: opt.AdapterBase = None,
    resolution: opt.Resolution = None,
    num_heads: opt.NumHeads = None,
    as_json: opt.Json = False,
) -> None:
    """Architecture, size, classes and fingerprint of a base or an adapter; what a method would train.

    [bold]Examples[/bold]

    difffit info DiT-XL/2-256

    difffit info random:DiT-XL/2 --method difffit --num-classes 101

    difffit info random:DiT-XL/2 --method lora --rank 16 --num-classes 101   [dim]# next to the paper's count[/dim]

    difffit info runs/food/adapter.safetensors --json
    """
    from difffit.engine.methods.settings import MethodSettings
    from difffit.engine.methods.sources import describe_source

    check_conditioning_options(ctx, [source], base)
    settings = MethodSettings.from_dict(
        dict(
            gamma_placement=gamma_placement,
            rank=rank,
            lora_alpha=lora_alpha,
            lora_targets=lora_targets,
            adapter_dim=adapter_dim,
            prompt_tokens=prompt_tokens,
        )
    ).validate()
    report = describe_source(
        source,
        method=method,
        num_classes=num_classes,
        gamma_blocks=gamma_blocks,
        settings=settings,
        base=base,
        resolution=resolution,
        num_heads=num_heads,
    )
    if as_json:
        emit_json(report)
    else:
        _render_info(report)


def _render_info(report: dict) -> None:
    from rich.table import Table

    report = dict(report)
    groups = report.pop("trainable_groups", None)
    print_fields(f"{report['kind']}: {report.get('path') or report.get('spec', '')}", report)
    if groups:
        total = report.get("adapted_total_params", report["total_params"])
        trained = Table(title=f"What {report['method']} trains")
        trained.add_column("group")
        trained.add_column("parameters", justify="right")
        trained.add_column("% of model", justify="right")
        for name, count in [*groups.items(), ("total", sum(groups.values()))]:
            trained.add_row(name, f"{count:,}", f"{100 * count / total:.4f}")
        print_table(trained)
    if "checked_base" in report:
        checked = report["checked_base"]
        if report["checked_base_matches"]:
            say((f"--base {checked} is the adapter's base", "green"), f" (fingerprint {report['base_fingerprint']}).")
        else:
            say(
                (f"--base {checked} is not the adapter's base:", "yellow"),
                f" its fingerprint is {report['checked_base_fingerprint']}, the adapter's ({report['base']}) is "
                f"{report['base_fingerprint']}; sample and merge refuse it without --force-base.",
            )
    if report.get("non_finite_tensors"):
        say(
            ("Unusable:", "bold red"),
            f" NaN or inf in {', '.join(report['non_finite_tensors'][:5])}; "
            "sample, merge and eval-fid refuse this adapter.",
        )


def env(as_json: opt.Json = False) -> None:
    """Versions, devices and cache locations, for bug reports."""
    from difffit.engine.environment import environment_report

    report = environment_report()
    if as_json:
        emit_json(report)
    else:
        print_fields(f"difffit {__version__}", report)
