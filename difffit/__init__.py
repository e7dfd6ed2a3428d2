"""difffit: adapt pre-trained diffusion transformers (DiT, PixArt, SD3, FLUX) to new domains with DiffFit.

    import difffit

    result = difffit.fit(difffit.FitConfig(data="examples/target", base="tiny", steps=400, lr=3e-3))
    difffit.sample_to_folder(difffit.load_base("tiny"), "samples/tiny", 16)

The public names load on first use, so `import difffit` (and `difffit --help`) does not pull in torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.2.0"

__all__ = [
    "DiffFitError",
    "EvalConfig",
    "FitConfig",
    "FitResult",
    "MethodSettings",
    "SamplingOptions",
    "attach_captions",
    "clip_score",
    "evaluate",
    "fit",
    "generate",
    "load_adapter",
    "load_base",
    "load_source",
    "merge_adapter",
    "sample_to_folder",
    "text_embeddings",
    "unload_adapter",
]


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module("difffit.engine"), name)


def __dir__() -> list[str]:
    return [*__all__, "__version__"]
