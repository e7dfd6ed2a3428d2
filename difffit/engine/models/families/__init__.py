"""The model families difffit adapts, and the one place a `--base` spec is read (`resolve_base`).

The family of a diffusers pipeline comes from the classes its model_index.json and transformer config
name (the bundled `tiny-t2i` is one: Stable Diffusion 3); an original checkpoint, a `random:` spec and the
tiny base are DiT. A pipeline of any other family is refused in one sentence naming the supported ones.
Every loader takes the `BaseSpec` this gives: the spec is interpreted, and a Hub id looked up, once.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from difffit.engine.errors import DiffFitError
from difffit.engine.hub import hub_ref, hub_snapshot
from difffit.engine.io import check_readable
from difffit.engine.models.bases import ALIASES as DIT_ALIASES
from difffit.engine.models.bases import RANDOM_PREFIX, TINY, TINY_BASE, Base, dit_architecture
from difffit.engine.models.dit import DiTConfig
from difffit.engine.models.families.dit import DIT
from difffit.engine.models.families.flux import FLUX
from difffit.engine.models.families.pipeline_bases import (
    TINY_T2I,
    PipelineBase,
    bundled_folder,
    check_model_index,
    read_json,
)
from difffit.engine.models.families.pixart import PIXART
from difffit.engine.models.families.sd3 import SD3
from difffit.engine.models.family import BaseSpec, Family

if TYPE_CHECKING:
    from difffit.engine.methods.adapter import AdapterMeta

FAMILIES: dict[str, Family] = {DIT.name: DIT, PIXART.name: PIXART, SD3.name: SD3, FLUX.name: FLUX}
PIPELINE_KINDS = [family.kind for family in (PIXART, SD3, FLUX)]  # the families whose bases are pipelines
# What each family's pipelines are called in model_index.json, and its aliases.
PIPELINE_FAMILIES = {
    "DiTPipeline": DIT,
    **{pipeline: FAMILIES[kind.family] for kind in PIPELINE_KINDS for pipeline in kind.pipelines},
}
ALIAS_FAMILIES = {
    **dict.fromkeys(DIT_ALIASES, DIT),
    **{alias: FAMILIES[kind.family] for kind in PIPELINE_KINDS for alias in kind.aliases},
}
SUPPORTED = (
    "DiT (DiTPipeline, original checkpoints), PixArt-α/Σ (PixArtAlphaPipeline, PixArtSigmaPipeline), "
    "SD3/3.5 (StableDiffusion3Pipeline) and FLUX.1 (FluxPipeline)"
)


def family_named(name: str | None) -> Family:
    """The family an adapter file or a base records by name (a file that names none: DiT)."""
    family = FAMILIES.get(name or DIT.name)
    if family is None:
        raise DiffFitError(
            f"Unknown model family {name!r}; this difffit knows {', '.join(FAMILIES)}.",
            hint="A newer difffit may have written it.",
        )
    return family


def family_of(thing: Base | PipelineBase | AdapterMeta | nn.Module) -> Family:
    """The family of a loaded base, an adapter's metadata (both record it) or a model (by its class)."""
    if isinstance(thing, nn.Module):
        owners = [family for family in FAMILIES.values() if family.owns(thing)]
        if not owners:
            raise TypeError(f"no family owns a {type(thing).__name__}")
        return owners[0]
    return family_named(getattr(thing, "family", None))


def resolve_base(spec: str, *, offline: bool = False) -> BaseSpec | None:
    """A base spec read once: its family and where its files are (an alias, the tiny base, a random: name, a
    local file or folder, a Hub repo, whose configs are fetched, no weights). `offline`: a Hub id is None
    instead (nothing is known of it without the network). Every family's loader takes the result."""
    spec = str(spec)
    if spec in DIT_ALIASES:
        return BaseSpec(spec, DIT, "alias", repo_id=DIT_ALIASES[spec])
    if spec in ALIAS_FAMILIES:
        return BaseSpec(spec, ALIAS_FAMILIES[spec], "alias")
    if spec == TINY_T2I:
        path = bundled_folder(spec)
        return BaseSpec(spec, _family_of_folder(path, spec), "bundled", path)
    check_readable(spec, "base")
    if spec.startswith(RANDOM_PREFIX):
        return BaseSpec(spec, DIT, "random")
    if spec == TINY:
        return BaseSpec(spec, DIT, "bundled", TINY_BASE)
    path = Path(spec).expanduser()
    if path.is_file():
        return _dit(spec, "file", path)
    if path.is_dir():
        family = _family_of_folder(path, spec)
        return _dit(spec, "folder", path) if family is DIT else BaseSpec(spec, family, "folder", path)
    ref = None if spec.startswith("DiT-") else hub_ref(spec)
    if ref is None:
        _dit(spec, "file", path)  # a DiT- name that is no alias is named as one
        raise DiffFitError(f"{spec} does not exist (no such file or folder).")
    if ref.filename:
        raise DiffFitError(
            f"{spec} names a file in a hub repo; a base on the Hub is a whole diffusers repo.",
            hint=f"Pass --base {ref.repo_id}, or download the file and pass its local path.",
        )
    if offline:
        return None
    folder = hub_snapshot(
        ref.repo_id,
        ["model_index.json", "config.json", "transformer/config.json"],
        what=f"the base {spec} (no such local path, so read as a hub repo id)",
        instead="pass --base a local checkpoint file or folder",
    )
    return BaseSpec(spec, _family_of_folder(folder, spec), "hub", folder, ref.repo_id)


def _dit(spec: str, source: str, path: Path) -> BaseSpec:
    if spec.startswith("DiT-"):
        raise DiffFitError(f"Unknown base alias {spec!r}; known aliases: {', '.join(DIT_ALIASES)}.")
    return BaseSpec(spec, DIT, source, path)


def _family_of_folder(folder: Path, spec: str) -> Family:
    index = folder / "model_index.json"
    if index.is_file():
        pipeline = read_json(index).get("_class_name")
        if isinstance(pipeline, list):  # [module, class]: a class defined by Python code in the folder or its repo
            raise DiffFitError(
                f"{spec} names custom pipeline code ({pipeline!r} in model_index.json), which difffit "
                f"does not load; it supports {SUPPORTED}."
            )
        if not isinstance(pipeline, str):
            raise DiffFitError(
                f"{index} names no pipeline class (_class_name is {pipeline!r}); it supports {SUPPORTED}."
            )
        check_model_index(index, read_json(index))
        if pipeline not in PIPELINE_FAMILIES:
            raise DiffFitError(f"{spec} is a {pipeline}, which difffit does not adapt; it supports {SUPPORTED}.")
        return PIPELINE_FAMILIES[pipeline]
    config = folder / "config.json"
    lone = next((kind for kind in PIPELINE_KINDS if config.is_file() and kind.is_transformer(read_json(config))), None)
    if lone is not None:
        raise DiffFitError(
            f"{spec} holds a {lone.title} transformer alone; difffit needs the whole pipeline (text "
            "encoders, VAE, scheduler).",
            hint=f"Pass the pipeline folder or its Hub id, or an alias such as {next(iter(lone.aliases))}.",
        )
    if config.is_file() and read_json(config).get("_class_name") not in ("DiTTransformer2DModel", "Transformer2DModel"):
        raise DiffFitError(
            f"{spec} holds a {read_json(config).get('_class_name')}, which difffit does not adapt; "
            f"it supports {SUPPORTED}."
        )
    return DIT


def load_base(spec: str | BaseSpec, **options: Any) -> Base | PipelineBase:
    """Any base spec of any family (or one resolved already), loaded by its family (`options`: the loaders'
    keywords; each family takes the ones it has: DiT resolution, num_classes, num_heads, vae; the text families
    info)."""
    base = spec if isinstance(spec, BaseSpec) else resolve_base(spec)
    return base.family.load(base, **options)


def base_architecture(
    spec: str, *, resolution: int | None = None, vae: str | None = None, num_heads: int | None = None
) -> DiTConfig | None:
    """The DiT architecture `load_base(spec)` gives where it is cheap to read (see `dit_architecture`), without
    the network; None otherwise, and for anything `load_base` would refuse (it says why)."""
    try:
        base = resolve_base(spec, offline=True)
    except DiffFitError:
        return None
    if base is None or base.family is not DIT:
        return None
    return dit_architecture(base, resolution=resolution, vae=vae, num_heads=num_heads)
