"""How the commands show results: one JSON object on stdout, or tables and lines on stderr.

Everything human goes through the engine's one stderr console, so progress bars, warnings and
tables interleave correctly and stdout stays clean for `--json`.
"""

from __future__ import annotations

import json
import math
import sys

from difffit.engine.progress import print_table, say

__all__ = ["emit_json", "is_main_process", "print_fields", "print_table", "say"]


def emit_json(obj: dict) -> None:
    """Exactly one strict JSON object on stdout (a NaN or infinity, e.g. a diverged loss, becomes null)."""
    sys.stdout.write(json.dumps(_finite(obj), indent=2, default=str, allow_nan=False) + "\n")
    sys.stdout.flush()


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def print_fields(title: str, fields: dict) -> None:
    """A key/value table on stderr; long lists and dicts are shortened to one line."""
    from rich.table import Table

    table = Table(title=title, show_header=False, box=None, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in fields.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        elif isinstance(value, list):
            more = f" ... ({len(value)} in all)" if len(value) > 10 else ""
            value = ", ".join(map(str, value[:10])) + more
        elif isinstance(value, int) and not isinstance(value, bool):
            value = f"{value:,}"
        elif isinstance(value, float):
            value = f"{value:.4g}"
        table.add_row(key, str(value))
    print_table(table)


def is_main_process() -> bool:
    """False in all but one process of an `accelerate launch` / torchrun run, so a run reports once."""
    from accelerate import PartialState

    return PartialState().is_main_process
