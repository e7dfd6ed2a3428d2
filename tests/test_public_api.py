"""`import difffit`: the public API at the top level, each name documented, loaded lazily (no torch on import)."""

from __future__ import annotations

import inspect
import subprocess
import sys

import difffit

PUBLIC = (
    "fit",
    "FitConfig",
    "load_base",
    "generate",
    "sample_to_folder",
    "evaluate",
    "merge_adapter",
    "load_adapter",
    "unload_adapter",
)


def test_import_difffit_loads_no_heavy_library():
    code = (
        "import sys, difffit; print(sorted(m for m in ('torch', 'accelerate', 'diffusers', 'transformers', 'peft') "
        "if m in sys.modules)); print(sorted(difffit.__all__))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded, names = result.stdout.splitlines()
    assert loaded == "[]"
    assert set(PUBLIC) <= set(eval(names))  # the names are listed without importing them


def test_every_public_name_resolves_to_a_documented_object():
    assert set(PUBLIC) <= set(difffit.__all__) and set(difffit.__all__) <= set(dir(difffit))
    for name in difffit.__all__:
        obj = getattr(difffit, name)
        assert obj.__name__ == name, name
        doc = inspect.getdoc(obj) or ""
        # a dataclass without a docstring gets its signature as __doc__: that is no documentation
        assert len(doc) > 40 and not doc.startswith(f"{name}("), name
    assert difffit.load_adapter is difffit.engine.load_adapter
