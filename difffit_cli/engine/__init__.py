"""difffit's engine: everything the command line does, as a Python API (no CLI needed).

    from difffit_cli.engine import FitConfig, fit, load_base, SamplingOptions, sample_to_folder

    result = fit(FitConfig(data="examples/target", base="tiny", steps=400, batch_size=32, lr=3e-3))
    sample_to_folder(load_base("tiny"), "samples/tiny", 16, SamplingOptions(scheduler="ddim", steps=25))

The names load on first use, so importing one light module (errors, progress) does not pull in torch:
`difffit --help` stays instant.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "FitConfig": "config", "FitResult": "config", "fit": "train", "load_base": "bases",
    "SamplingOptions": "sample", "generate": "sample", "sample_to_folder": "sample_folder",
    "evaluate": "metrics", "merge_adapter": "merge", "load_source": "sources",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return __all__
