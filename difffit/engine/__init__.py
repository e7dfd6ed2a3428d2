"""difffit's engine: everything the command line does, as a Python API (no CLI needed).

    from difffit.engine import FitConfig, fit, load_base, SamplingOptions, sample_to_folder

    result = fit(FitConfig(data="examples/target", base="tiny", steps=400, batch_size=32, lr=3e-3))
    sample_to_folder(load_base("tiny"), "samples/tiny", 16, SamplingOptions(scheduler="ddim", steps=25))

The names load on first use, so importing one light module (errors, progress) does not pull in torch:
`difffit --help` stays instant.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "FitConfig": "training.config",
    "FitResult": "training.config",
    "MethodSettings": "methods.settings",
    "EvalConfig": "evaluation.options",
    "fit": "training.train",
    "load_base": "models.families",
    "SamplingOptions": "evaluation.sample",
    "generate": "evaluation.sample",
    "sample_to_folder": "evaluation.sample_folder",
    "evaluate": "evaluation.metrics",
    "merge_adapter": "methods.merge",
    "load_source": "methods.sources",
    "load_adapter": "methods.apply",
    "unload_adapter": "methods.apply",
    "DiffFitError": "errors",
    "attach_captions": "data.captions",
    "text_embeddings": "data.text_cache",
    "clip_score": "evaluation.clip_score",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return __all__
