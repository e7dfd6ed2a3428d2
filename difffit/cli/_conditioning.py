"""Which options of each command belong to one kind of conditioning, and the one check that refuses them on a
model of the other kind.

A class-conditional model (DiT) samples classes through its own VAE and reference samplers; a text-to-image
model (PixArt, SD3, FLUX) samples prompts through its pipeline. An option of the other kind would be accepted
and ignored, so each command lists its own here (by parameter name; `fit` checks its config the same way in
`engine/training/conditions.py`) and `check_conditioning_options` refuses one the user typed, in one sentence,
before anything loads. Options in neither list apply to both kinds.
"""

from __future__ import annotations

from collections.abc import Iterable

import typer

from difffit.engine.errors import DiffFitError

# command -> {conditioning the options belong to: parameter names}
CONDITIONING_OPTIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "sample": {
        "class": ("classes", "cfg_channels", "vae", "compile"),
        "text": ("prompts", "prompts_file", "negative_prompt", "width", "height"),
    },
    "eval-fid": {"class": ("classes", "cfg_channels", "vae"), "text": ("prompts_file",)},
    "info": {"class": ("num_classes", "resolution", "num_heads"), "text": ()},
    "merge": {"class": (), "text": ()},
}
KINDS = {"class": "class-conditional (DiT)", "text": "text-to-image"}


def typed_options(ctx: typer.Context) -> dict[str, str]:
    """{parameter name: its flag} of the options given on the command line (or by environment), not defaulted."""
    flags = {param.name: param.opts[0] for param in ctx.command.params}
    return {
        name: flags[name]
        for name in ctx.params
        if getattr(ctx.get_parameter_source(name), "name", None) in ("COMMANDLINE", "ENVIRONMENT")
    }


def check_conditioning_options(ctx: typer.Context, sources: Iterable[str], base: str | None = None) -> None:
    """Refuse an option of `ctx`'s command that belongs to the other conditioning than a source's model's
    (`sources`: the models the command loads; eval-fid passes none for a folder or an .npz of images)."""
    from difffit.engine.methods.sources import source_family

    table = CONDITIONING_OPTIONS[ctx.info_name]
    typed = typed_options(ctx)
    if not any(name in typed for names in table.values() for name in names):
        return
    for source in sources:
        family = source_family(source, base=base)
        for kind, names in table.items():
            given = [name for name in names if name in typed]
            if kind != family.conditioning and given:
                raise DiffFitError(
                    f"{typed[given[0]]} applies to {KINDS[kind]} models, and {source} is a "
                    f"{family.title} model, conditioned on {'text' if kind == 'class' else 'classes'}.",
                    hint="Leave it out.",
                )
