"""A tiny difffit adapter of each family (DiT, PixArt, SD3, FLUX), made in place: the base is loaded, DiffFit's
modules added untrained, and the adapter saved as fit saves one. `base_spec` overrides the base an adapter
records (to test what a recorded base from a stranger does)."""

from __future__ import annotations

from pathlib import Path

from t2i_fixtures import PIPELINES

FAMILIES = ("dit", *PIPELINES)


def make_base(family: str, folder: Path, dit_base: Path, dit_vae: Path) -> tuple[str, dict]:
    """(base spec, load options) of a tiny base of `family`; pipelines are written under `folder`."""
    if family == "dit":
        return str(dit_base), {"vae": str(dit_vae)}
    return str(PIPELINES[family](folder / f"{family}-pipe")), {}


def make_adapter(family: str, folder: Path, dit_base: Path, dit_vae: Path, *, base_spec: str | None = None) -> Path:
    """folder/<family>.safetensors: an untrained difffit adapter of a tiny `family` base."""
    import dataclasses

    from difffit.engine.methods.adapter import make_meta, save_adapter
    from difffit.engine.methods.trainable import prepare_model
    from difffit.engine.models.families import load_base

    spec, options = make_base(family, folder, dit_base, dit_vae)
    base = load_base(spec, **options)
    state = {name: p.detach().clone() for name, p in base.model.named_parameters()}
    prepare_model(base.model, "difffit")
    meta = make_meta(base, base.model, "difffit")
    if base_spec is not None:
        meta = dataclasses.replace(meta, base_spec=base_spec)
    path = folder / f"{family}.safetensors"
    save_adapter(path, base.model, state, meta, "fp32")
    return path
