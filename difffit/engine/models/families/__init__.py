"""The model families difffit adapts, and the one place a `--base` spec is matched to its family.

The family of a diffusers pipeline comes from the classes its model_index.json and transformer
config name (the bundled `tiny-t2i` is one: PixArt-α); an original checkpoint, a `random:` spec and the
tiny base are DiT. A pipeline of any
other family is refused in one sentence naming the supported ones.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from difffit.engine.errors import DiffFitError
from difffit.engine.hub import hub_ref, hub_snapshot
from difffit.engine.io import check_readable
from difffit.engine.models.bases import ALIASES as DIT_ALIASES
from difffit.engine.models.bases import RANDOM_PREFIX
from difffit.engine.models.families.dit import DIT
from difffit.engine.models.families.flux import FLUX
from difffit.engine.models.families.pipelines import TINY_T2I, bundled_folder, check_model_index, read_json
from difffit.engine.models.families.pixart import PIXART
from difffit.engine.models.families.sd3 import SD3
from difffit.engine.models.family import Family
from difffit.engine.models.formats import WEIGHT_SUFFIXES

FAMILIES: dict[str, Family] = {DIT.name: DIT, PIXART.name: PIXART, SD3.name: SD3, FLUX.name: FLUX}
PIPELINE_KINDS = [family.kind for family in (PIXART, SD3, FLUX)]  # the families whose bases are pipelines
# What each family's pipelines are called in model_index.json, and its aliases.
PIPELINE_FAMILIES = {"DiTPipeline": DIT, **{pipeline: FAMILIES[kind.family] for kind in PIPELINE_KINDS
                                            for pipeline in kind.pipelines}}
ALIAS_FAMILIES = {**dict.fromkeys(DIT_ALIASES, DIT), **{alias: FAMILIES[kind.family] for kind in PIPELINE_KINDS
                                                        for alias in kind.aliases}}
SUPPORTED = ("DiT (DiTPipeline, original checkpoints), PixArt-α/Σ (PixArtAlphaPipeline, PixArtSigmaPipeline), "
             "SD3/3.5 (StableDiffusion3Pipeline) and FLUX.1 (FluxPipeline)")


def family_named(name: str | None) -> Family:
    """The family an adapter file or a base records by name (files from before families: DiT)."""
    family = FAMILIES.get(name or DIT.name)
    if family is None:
        raise DiffFitError(f"Unknown model family {name!r}; this difffit knows {', '.join(FAMILIES)}.",
                           hint="A newer difffit may have written it.")
    return family


def family_of(thing: object) -> Family:
    """The family of a loaded base, an adapter's metadata (both record it) or a model (by its class)."""
    if isinstance(thing, nn.Module):
        owners = [family for family in FAMILIES.values() if family.owns(thing)]
        if not owners:
            raise TypeError(f"no family owns a {type(thing).__name__}")
        return owners[0]
    return family_named(getattr(thing, "family", None))


def family_of_spec(spec: str) -> Family:
    """The family of a base spec, reading at most its configs (a Hub repo's are fetched, no weights)."""
    if spec in ALIAS_FAMILIES:
        return ALIAS_FAMILIES[spec]
    if spec == TINY_T2I:
        return _family_of_folder(bundled_folder(spec), spec)
    check_readable(spec, "base")
    path = Path(spec).expanduser()
    if spec.startswith(RANDOM_PREFIX) or spec == "tiny" or path.is_file() or spec.lower().endswith(WEIGHT_SUFFIXES):
        return DIT
    if path.is_dir():
        return _family_of_folder(path, spec)
    ref = None if spec.startswith("DiT-") else hub_ref(spec)
    if ref is None or ref.filename:
        return DIT  # DiT's loader names what is wrong with it (a missing path, a file in a repo, ...)
    folder = hub_snapshot(ref.repo_id, ["model_index.json", "config.json", "transformer/config.json"],
                          what=f"the base {spec} (no such local path, so read as a hub repo id)",
                          instead="pass --base a local checkpoint file or folder")
    return _family_of_folder(folder, spec)


def _family_of_folder(folder: Path, spec: str) -> Family:
    index = folder / "model_index.json"
    if index.is_file():
        pipeline = read_json(index).get("_class_name")
        if isinstance(pipeline, list):  # [module, class]: a class defined by Python code in the folder or its repo
            raise DiffFitError(f"{spec} names custom pipeline code ({pipeline!r} in model_index.json), which difffit "
                               f"does not load; it supports {SUPPORTED}.")
        if not isinstance(pipeline, str):
            raise DiffFitError(f"{index} names no pipeline class (_class_name is {pipeline!r}); it supports "
                               f"{SUPPORTED}.")
        check_model_index(index, read_json(index))
        if pipeline not in PIPELINE_FAMILIES:
            raise DiffFitError(f"{spec} is a {pipeline}, which difffit does not adapt; it supports {SUPPORTED}.")
        return PIPELINE_FAMILIES[pipeline]
    config = folder / "config.json"
    lone = next((kind for kind in PIPELINE_KINDS if config.is_file() and kind.is_transformer(read_json(config))), None)
    if lone is not None:
        raise DiffFitError(f"{spec} holds a {lone.title} transformer alone; difffit needs the whole pipeline (text "
                           "encoders, VAE, scheduler).", hint="Pass the pipeline folder or its Hub id, or an alias "
                           f"such as {next(iter(lone.aliases))}.")
    if config.is_file() and read_json(config).get("_class_name") not in ("DiTTransformer2DModel", "Transformer2DModel"):
        raise DiffFitError(f"{spec} holds a {read_json(config).get('_class_name')}, which difffit does not adapt; "
                           f"it supports {SUPPORTED}.")
    return DIT


def load_base(spec: str, **options):
    """Any base spec of any family, loaded by its family (`options`: the loaders' keywords; each family
    takes the ones it has: DiT resolution, num_classes, num_heads, vae; the pipeline families info)."""
    return family_of_spec(str(spec)).load(str(spec), **options)
