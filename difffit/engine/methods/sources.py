"""What `sample`, `eval-fid`, `merge` and `info` take as input: an adapter file (applied to its base)
or any base spec. Loading, describing and sampling such sources lives here, once.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from difffit.engine.errors import DiffFitError, require_at_most
from difffit.engine.evaluation.options import check_image_count
from difffit.engine.evaluation.sample import SamplingOptions, check_conditioning, parse_classes
from difffit.engine.evaluation.sample_folder import sample_to_folder
from difffit.engine.io import check_readable, special_kind
from difffit.engine.methods.adapter import (
    AdapterMeta,
    AdapterSwapper,
    check_base_architecture,
    is_adapter_file,
    non_finite_tensors,
    read_adapter,
    read_adapter_meta,
    refuse_run_folder,
)
from difffit.engine.methods.hub_adapters import resolve_adapter_source
from difffit.engine.methods.settings import MethodSettings
from difffit.engine.methods.trainable import describe_method
from difffit.engine.models.bases import Base
from difffit.engine.models.families import family_of, load_base, resolve_base
from difffit.engine.models.family import MAX_SIDE, Family
from difffit.engine.models.formats import WEIGHT_SUFFIXES
from difffit.engine.progress import say

# -- loading --------------------------------------------------------------------------------------


def load_source(
    source: str, *, base: str | None = None, vae: str | None = None, force_base: bool = False
) -> tuple[Base, AdapterMeta | None]:
    """An adapter file or Hub adapter (applied to its base, or to `base`) or any base spec, ready to sample from."""
    source = local_source(source)
    refuse_run_folder(source)
    if not is_adapter_file(source):  # a base (`base` only applies to adapters)
        return load_base(str(source), vae=vae), None
    tensors, meta = read_adapter(source)
    loaded = load_adapter_base(source, meta, base=base, vae=vae, force_base=force_base)
    AdapterSwapper(loaded).apply(tensors, meta)
    meta.model_family.adopt_adapter(loaded, meta)  # DiT: its class names; PixArt: its caption tokens
    return loaded, meta


def local_source(spec: str) -> str:
    """`hf://OWNER/NAME[/file]` or an adapter repo's `OWNER/NAME` -> the adapter file in the Hub cache;
    anything else unchanged (a local path, an alias, a base repo). A FIFO or a device is refused here, before
    anything opens it."""
    check_readable(spec, "source")
    return resolve_adapter_source(str(spec)) or str(spec)


def load_adapter_base(
    source: str | Path,
    meta: AdapterMeta,
    *,
    base: str | None = None,
    vae: str | None = None,
    force_base: bool = False,
) -> Base:
    """The base the adapter `source` (metadata `meta`) applies to, fingerprint-checked; nothing applied.
    (`difffit sample` with several adapters loads it once and swaps the adapters in.)"""
    loaded = base_for_adapter(meta, base=base, vae=vae)
    check_fingerprint(
        source,
        meta,
        loaded.spec,
        loaded.fingerprint,
        force_base=force_base,
        hint=f"Pass --base {meta.base_spec}, or --force-base to apply it anyway.",
        forced="--force-base",
    )
    return loaded


def check_fingerprint(
    source: str | Path,
    meta: AdapterMeta,
    spec: str,
    fingerprint: str | None,
    *,
    force_base: bool,
    hint: str,
    forced: str,
) -> None:
    """Refuse a base (`spec`) whose weights' fingerprint is not the one the adapter trained on, in one sentence;
    with `force_base` (the option spelled `forced`) warn and go on."""
    if fingerprint == meta.base_fingerprint:
        return
    message = (
        f"{source} was trained on {meta.base_spec} (fingerprint {meta.base_fingerprint}), "
        f"but {spec} has fingerprint {fingerprint}."
    )
    if not force_base:
        raise DiffFitError(message, hint=hint)
    say(("Warning:", "yellow"), f" {message} Applying it anyway ({forced}).")


def base_for_adapter(meta: AdapterMeta, *, base: str | None = None, vae: str | None = None) -> Base:
    """The base an adapter names, or `base` instead, loaded as the adapter needs it and refused when its
    architecture does not fit the adapter; the fingerprint is left to the caller."""
    spec = base or meta.base_spec
    family = meta.model_family
    if why := not_a_model(spec):
        whose = "--base" if base else "The adapter's recorded base"
        raise DiffFitError(
            f"{whose} {spec} is not a model: it is {why}.", hint="Pass --base with the base the adapter was trained on."
        )
    resolved = resolve_base(spec)
    if (given := resolved.family) is not family:
        raise DiffFitError(
            f"The adapter is a {family.title} adapter, and {spec} is a {given.title} base; an adapter "
            "applies only to its own family's base.",
            hint=f"Use its base, {meta.base_spec}.",
        )
    options = family.adapter_base_options(meta, spec)
    try:
        loaded = family.load(resolved, vae=vae or meta.vae_spec, **options)
    except DiffFitError as first:  # another base may not take the adapter's head count: load it as it is
        if base is None or not options:
            raise
        try:
            loaded = family.load(resolved, vae=vae or meta.vae_spec)
        except DiffFitError:
            raise first from None
    check_base_architecture(meta, loaded.model, spec)
    return loaded


def source_family(source: str, *, base: str | None = None) -> Family:
    """The family of a source without loading its weights: an adapter's recorded one, else its base spec's."""
    spec = local_source(source)
    refuse_run_folder(spec)
    if is_adapter_file(spec):
        return read_adapter_meta(spec).model_family
    return resolve_base(spec).family


def not_a_model(spec: str) -> str | None:
    """Why a local path cannot be a base (a FIFO, a device, a file of no weights format); None if it may be one
    (a folder, a weights file, or not a local path: an alias or a Hub id)."""
    path = Path(spec).expanduser()
    if kind := special_kind(path):
        return kind
    if path.is_file() and not path.name.lower().endswith(WEIGHT_SUFFIXES):
        return "a file of no weights format (.safetensors, .pt, .pth, .bin, .ckpt)"
    return None


def source_name(source: str) -> str:
    """A folder name for a source: the file stem (the parent's name for fit's adapter.safetensors)."""
    path = Path(source)
    if path.exists():
        name = path.parent.name if path.is_file() and path.stem in ("adapter", "model") else path.stem
        name = name or path.resolve().name
    else:  # a base spec such as "DiT-XL/2-256" or "random:DiT-S/2"
        name = source
    return re.sub(r"[^\w.-]+", "-", name).strip("-") or "samples"


def unique_names(sources: Sequence[str]) -> list[str]:
    names: list[str] = []
    for source in sources:
        name, k = source_name(source), 2
        while name in names:
            name, k = f"{source_name(source)}-{k}", k + 1
        names.append(name)
    return names


def iter_sources(
    sources: Sequence[str],
    *,
    base: str | None = None,
    vae: str | None = None,
    force_base: bool = False,
    device: str | torch.device = "cpu",
) -> Iterator[tuple[str, Base, AdapterMeta | None, list[str] | None]]:
    """(name, base on `device`, adapter meta or None, class names) per source, in order.

    Consecutive adapters of the same base share one loaded base: the next adapter's tensors are
    swapped in (milliseconds) instead of reloading the base.
    """
    key, loaded, swapper = None, None, None
    for spec, name in zip(sources, unique_names(sources), strict=True):
        source = local_source(spec)
        if not is_adapter_file(source):
            key, swapper = None, None
            loaded, _ = load_source(source, base=base, vae=vae, force_base=force_base)
            loaded.model.to(device)
            yield name, loaded, None, loaded.class_names
            continue
        tensors, meta = read_adapter(source)
        this_key = (base or meta.base_spec, meta.base_fingerprint, vae or meta.vae_spec)
        if this_key != key:
            loaded = load_adapter_base(source, meta, base=base, vae=vae, force_base=force_base)
            loaded.model.to(device)  # before swapping, so the swapper's saved base tensors live there too
            key, swapper = this_key, AdapterSwapper(loaded)
        swapper.apply(tensors, meta)
        meta.model_family.adopt_adapter(loaded, meta)
        yield name, loaded, meta, meta.class_names


# -- what the commands do with them ---------------------------------------------------------------


def describe_adapter(path: str | Path) -> dict:
    """`difffit info` for an adapter: its metadata, the model it makes, what it trained (no base needed)."""
    tensors, meta = read_adapter(path, allow_non_finite=True)
    family = meta.model_family
    trained = describe_method(
        meta.base_config,
        meta.method,
        num_classes=meta.num_classes,
        gamma_blocks=meta.gamma_blocks,
        new_classes=meta.new_class_table,
        settings=meta.method_settings,
        family=family,
    )
    classes = (
        {"num_classes": meta.num_classes, "class_names": meta.class_names, "null_index": meta.null_index}
        if family.class_table
        else {}
    )
    positions = (
        {"pos_embed": meta.pos_embed, "pos_embed_scale": meta.pos_embed_scale}
        if meta.pos_embed_scale is not None
        else {}
    )
    return {
        "kind": "adapter",
        "family": family.name,
        "path": str(path),
        "architecture": meta.architecture,
        "total_params": trained["total_params"],
        **classes,
        "latent_size": meta.latent_size,
        "resolution": meta.resolution,
        **family.channels(meta.config),
        **positions,
        "fingerprint": meta.base_fingerprint,
        "method": meta.method,
        "settings": meta.settings,
        "gamma_blocks": meta.gamma_blocks,
        "base": meta.base_spec,
        "base_fingerprint": meta.base_fingerprint,
        "base_architecture": family.architecture(meta.base_config),
        "vae": meta.vae_spec,
        "dtype": meta.dtype,
        "storage": meta.storage,
        "checksum": meta.checksum,  # None for files written before difffit stored one
        "steps": meta.training.get("steps"),
        "training": meta.training,
        "file_bytes": Path(path).stat().st_size,
        "stored_params": sum(t.numel() for t in tensors.values()),
        "non_finite_tensors": non_finite_tensors(tensors),  # not empty: the adapter is unusable
        "trainable_params": trained["trainable_params"],
        "trainable_percent": trained["trainable_percent"],
        "trainable_groups": trained["trainable_groups"],
        "difffit_version": meta.difffit_version,
        "format": f"{meta.format} v{meta.version}",
    }


def describe_source(
    source: str,
    *,
    method: str | None = None,
    num_classes: int | None = None,
    gamma_blocks: str | None = None,
    settings: MethodSettings | None = None,
    base: str | None = None,
    resolution: int | None = None,
    num_heads: int | None = None,
) -> dict:
    """The `difffit info` report: an adapter's metadata (checked against `base` if given), or a base's
    architecture and, with `method`, what that method would train on it for `num_classes` classes."""
    source = local_source(source)
    refuse_run_folder(source)
    if is_adapter_file(source):
        if method or num_classes is not None or gamma_blocks:
            raise DiffFitError("--method, --num-classes and --gamma-blocks apply to bases, not adapters.")
        report = describe_adapter(source)
        if base is not None:  # the adapter as `sample --base` would apply it: same loading, same checks
            checked = base_for_adapter(read_adapter_meta(source), base=base)
            report |= {
                "checked_base": base,
                "checked_base_fingerprint": checked.fingerprint,
                "checked_base_matches": checked.fingerprint == report["base_fingerprint"],
            }
        return report
    if base is not None:
        raise DiffFitError(f"--base applies to adapters, and {source} is a base.", hint="Leave --base out.")
    if resolution is not None:
        require_at_most("--resolution", resolution, MAX_SIDE, "the largest side difffit trains at or draws")
    # info never downloads a text-to-image base's weights: its counts come from the config (meta device)
    loaded = load_base(source, resolution=resolution, num_heads=num_heads, info=True)
    family = family_of(loaded)
    report = {"family": family.name, **family.describe(loaded)}
    if method is not None:
        if num_classes is not None and not family.class_table:
            raise DiffFitError(
                f"--num-classes applies to class-conditional bases; {source} is a {family.title} "
                "base, conditioned on text."
            )
        trained = describe_method(
            family.config_of(loaded.model),
            method,
            num_classes=num_classes,
            gamma_blocks=gamma_blocks,
            settings=settings,
            family=family,
        )
        # The base's own class count and size stay under their names; the adapted model's get these.
        if "num_classes" in trained:  # class-conditional families only
            report["target_num_classes"] = trained.pop("num_classes")
        report["adapted_total_params"] = trained.pop("total_params")
        report.update(trained)
    return report


def sample_sources(
    sources: Sequence[str],
    n: int,
    options: SamplingOptions,
    *,
    out: str | Path | None = None,
    classes: Sequence[str] | None = None,
    prompts: Sequence[str] | None = None,
    base: str | None = None,
    vae: str | None = None,
    force_base: bool = False,
    npz: bool = False,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """`difffit sample`: n images per source into a folder each, with grid.png and sample.json.

    One source goes to `out` (default samples/<source name>); several go to sub-folders of `out`
    (default samples/). `classes` are names or indices (cycled), for class-conditional sources;
    `prompts` (cycled) for text-to-image ones. Under `accelerate launch` the images are split over the
    processes. Returns the run summary, with one entry per source in "outputs".
    """
    from accelerate import PartialState

    check_image_count("-n", n)  # before any source loads
    state = PartialState(cpu=options.device == "cpu")
    root = Path(out) if out is not None else None
    outputs, used = [], []
    loaded = iter_sources(sources, base=base, vae=vae, force_base=force_base, device=state.device)
    for source, (name, source_base, meta, class_names) in zip(sources, loaded, strict=True):
        folder = (root or Path("samples")) / name if len(sources) > 1 or root is None else root
        class_ids = classes  # a text-to-image source refuses them when it samples
        if classes and family_of(source_base).class_table:
            class_ids = parse_classes(classes, class_names, source_base.model.config.num_classes)
        record = {"source": source, "adapter": meta.to_dict() if meta else None}
        check_conditioning(source_base, class_ids, prompts)  # before the folder is made
        used.append(options.for_base(source_base))
        summary = sample_to_folder(
            source_base,
            folder,
            n,
            used[-1],
            classes=class_ids,
            prompts=prompts,
            npz=npz,
            state=state,
            progress=progress,
            record=record,
            overwrite=overwrite,
        )
        outputs.append({**summary, "source": source})
    first = used[0]
    return {
        "outputs": outputs,
        "n": n,
        "scheduler": first.scheduler,
        "steps": first.num_steps,
        "seed": first.seed,
        "cfg_scale": first.cfg_scale,
        "cfg_channels": first.cfg_channels,
        "processes": state.num_processes,
    }
