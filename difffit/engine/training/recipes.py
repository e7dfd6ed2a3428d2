"""Recipes: TOML files whose top-level keys are `fit`'s option names, and the resolved config.toml.

Precedence, highest first: options given on the command line, the recipe, the resolved config of
the run being resumed (DIR/config.toml), the built-in defaults of FitConfig.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from difffit.engine.errors import DiffFitError
from difffit.engine.io import check_readable
from difffit.engine.training.config import FitConfig
from difffit.engine.training.options import option_fields

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# Recipes shipped with the source tree (recipes/*.toml); `--recipe food101` finds them by name.
SHIPPED = Path(__file__).resolve().parents[3] / "recipes"
_FIELDS = option_fields()
_TYPES = {"int": int, "float": float, "bool": bool, "str": str}
_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def find_recipe(spec: str) -> Path:
    path = Path(spec).expanduser()
    check_readable(path, "recipe")
    if path.is_file():
        return path
    shipped = SHIPPED / f"{spec}.toml"
    if shipped.is_file() and "/" not in spec:
        return shipped
    known = ", ".join(sorted(p.stem for p in SHIPPED.glob("*.toml"))) if SHIPPED.is_dir() else "none"
    raise DiffFitError(f"Recipe {spec} not found (a .toml file path, or a shipped name: {known}).")


def _coerce(key: str, value, source: str):
    """Check a recipe value against the option's type (int where a float is written as 24000.0 too)."""
    declared = str(_FIELDS[key].type)
    if declared.startswith("list[str]"):  # a list of strings, or one string as a list of one
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise DiffFitError(f"{source}: `{key}` should be a string or a list of strings, not {value!r}.")
        return values
    if declared.startswith("tuple[str"):  # --lora-targets: comma-separated, or a list of names
        if not (isinstance(value, str) or isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise DiffFitError(
                f"{source}: `{key}` should be a comma-separated string or a list of strings, not {value!r}."
            )
        return value
    if isinstance(value, dict) and "dict[str, int]" in declared:  # a table such as [repeats]: class = count
        return {str(k): _coerce(key, v, f"{source}, [{key}] {k}") for k, v in value.items()}
    kind = _TYPES[declared.split("|")[0].strip()]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise DiffFitError(f"{source}: `{key}` should be {_TYPE_WORDS[kind]}, not {value!r}.")
    return value


def read_options(path: str | Path, source: str | None = None) -> dict:
    """A TOML file's options, validated against FitConfig (keys may use - or _)."""
    path = Path(path)
    source = source or str(path)
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise DiffFitError(f"Cannot read the recipe {path}: {exc}.") from None
    options = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in _FIELDS or name == "resume":
            raise DiffFitError(
                f"{source}: unknown option `{key}`; recipe keys are `difffit fit` option "
                "names such as data, base, method, steps, batch_size, lr, resolution."
            )
        if name == "compile" and isinstance(value, bool):  # difffit 0.1 wrote compile = true / false
            value = "on" if value else "off"
        options[name] = _coerce(name, value, source)
    return options


def resolve_fit_config(given: dict, recipe: str | None = None) -> FitConfig:
    """FitConfig from the options given on the command line, over the recipe, over a resumed run's
    config.toml, over the defaults."""
    options = read_options(find_recipe(recipe), f"recipe {recipe}") if recipe else {}
    options.update(given)
    if options.get("resume"):
        out = FitConfig.from_options(options).out_dir()
        if (out / "config.toml").exists():
            options = read_options(out / "config.toml") | options
    return FitConfig.from_options(options)


# --------------------------------------------------------------------------------------------
# A tiny TOML writer (tomllib only reads): flat tables of strings, numbers, booleans and lists.
# --------------------------------------------------------------------------------------------


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return ("-" if value < 0 else "") + ("nan" if math.isnan(value) else "inf")
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value), ensure_ascii=False)  # a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table, so it can sit among the flat keys
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def write_toml(mapping: dict, header: str | None = None) -> str:
    """TOML text for a flat mapping; None values are left out (TOML has no null)."""
    lines = [f"# {header}"] if header else []
    lines += [f"{key} = {_toml_value(value)}" for key, value in mapping.items() if value is not None]
    return "\n".join(lines) + "\n"
