"""What a run folder of `difffit fit` holds, read back for the report and the model card.

A run folder: adapter.safetensors, config.toml, log.jsonl (one JSON object per logged step),
samples/step-NNNNNNN.png (preview grids), checkpoints/, and whatever the user put next to it,
such as eval.json from `difffit eval-fid --json > eval.json`.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

from difffit.engine.errors import DiffFitError
from difffit.engine.methods.adapter import read_adapter_meta
from difffit.engine.methods.merge import merge_formats
from difffit.engine.methods.sources import describe_adapter

PREVIEW = re.compile(r"^step-(\d+)\.png$")
EVAL_FILES = "eval*.json"
METRIC_KEYS = ("fid", "kid_mean", "kid_std", "isc_mean", "isc_std", "precision", "recall")
SMOOTHING = 0.95  # the same exponential smoothing as the loss shown by fit's progress bar


def read_log(path: str | Path) -> list[dict]:
    """The records of a log.jsonl, in file order. Lines that are not JSON objects with a "step"
    (a foreign tool's line, a line cut short by a crash) are skipped."""
    records = []
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that hold a number under `key`."""
    pairs = [(r["step"], float(r[key])) for r in records if isinstance(r.get(key), int | float)]
    return [s for s, _ in pairs], [v for _, v in pairs]


def smooth(values: list[float], weight: float = SMOOTHING) -> list[float]:
    """Exponential moving average, started at the first value."""
    out, current = [], None
    for value in values:
        current = value if current is None else weight * current + (1 - weight) * value
        out.append(current)
    return out


def previews(run_dir: str | Path) -> list[tuple[int, Path]]:
    """The preview grids fit wrote (samples/step-NNNNNNN.png), by step."""
    folder = Path(run_dir) / "samples"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := PREVIEW.match(p.name)) and p.is_file()]
    return sorted(found)


def eval_results(run_dir: str | Path) -> dict[str, dict]:
    """eval*.json files next to the run (`difffit eval-fid --json > eval.json`): name -> the object.
    Files that are not a JSON object with a metric are left out."""
    out = {}
    for path in sorted(Path(run_dir).glob(EVAL_FILES)):
        result = read_eval_json(path, strict=False)
        if result is not None:
            out[path.name] = result
    return out


def read_eval_json(path: str | Path, *, strict: bool = True) -> dict | None:
    """An `eval-fid --json` result; `strict`: a DiffFitError for an unreadable file, else None."""
    path = Path(path)
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        if strict:
            raise DiffFitError(
                f"Could not read the eval result {path} ({exc}).",
                hint="Write it with `difffit eval-fid ... --json > eval.json`.",
            ) from None
        return None
    if not isinstance(result, dict) or not any(key in result for key in METRIC_KEYS):
        if strict:
            raise DiffFitError(
                f"{path} holds no metric ({', '.join(METRIC_KEYS)}); it is not an eval-fid --json result.",
                hint="Write it with `difffit eval-fid ... --json > eval.json`.",
            )
        return None
    return result


def split_eval(result: dict) -> tuple[dict, dict]:
    """(metrics, settings) of an eval result: the known metric keys, and every other scalar field."""
    metrics = {k: result[k] for k in METRIC_KEYS if k in result}
    settings = {k: v for k, v in result.items() if k not in METRIC_KEYS and not isinstance(v, dict | list)}
    return metrics, settings


def training_summary(adapter: str | Path) -> dict:
    """`describe_adapter`, the formats `merge` writes for it, and what the run's log.jsonl next to the
    adapter adds: the training time, the median img/s, the peak memory (when logged as peak_mem_mb) and
    the final losses."""
    adapter = Path(adapter)
    summary = describe_adapter(adapter) | {"merge_formats": merge_formats(read_adapter_meta(adapter))}
    records = read_log(adapter.parent / "log.jsonl")
    summary.update(log_summary(records))
    return summary


def log_summary(records: list[dict]) -> dict:
    """Training time, speed, memory and final losses of one run's log records (empty: {})."""
    if not records:
        return {}
    _, losses = series(records, "loss")
    _, rates = series(records[1:], "img_per_s")  # the first step includes start-up
    _, memory = series(records, "peak_mem_mb")
    _, elapsed = series(records, "elapsed_s")
    _, val = series(records, "val_loss")
    return {
        "logged_steps": records[-1]["step"],
        "elapsed_s": elapsed[-1] if elapsed else None,
        "img_per_s": statistics.median(rates) if rates else None,
        "peak_mem_mb": max(memory) if memory else None,
        "final_loss": losses[-1] if losses else None,
        "final_loss_smoothed": smooth(losses)[-1] if losses else None,
        "final_val_loss": val[-1] if val else None,
    }


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"
