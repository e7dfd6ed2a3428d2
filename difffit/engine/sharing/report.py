"""`difffit report`: one self-contained HTML page about one or more runs, and fit's loss.png.

Per run: the loss curves (loss raw and smoothed, MSE and VB smoothed, the validation loss when
logged) and the in-training FID and CLIP score when logged, as inline SVG, the preview grids as a
timeline, the training summary, the eval results found next to the run, and the resolved config.toml.
With several runs: a comparison table and the smoothed losses overlaid. Images are inline (base64), so
the file can be mailed or attached as is. Every curve in the SVGs carries an id (gid), and each run's
plotted series are embedded as JSON.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
import os
from pathlib import Path

from difffit import __version__
from difffit.engine.errors import DiffFitError
from difffit.engine.io import atomic_path, check_output
from difffit.engine.methods.sources import unique_names
from difffit.engine.training.loss_plot import eval_figure, loss_figure, save_figure
from difffit.engine.training.runs import (
    eval_results,
    format_duration,
    log_summary,
    previews,
    read_log,
    series,
    split_eval,
    training_summary,
)

REPORT_FILE = "report.html"
THUMBNAIL_PX = 320  # preview grids are shrunk to at most this size (the width they are shown at)
STYLE = """
body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:1100px;color:#222;padding:0 1rem}
table{border-collapse:collapse;margin:.5rem 0 1rem}td,th{border:1px solid #ccc;padding:.25rem .6rem;text-align:left}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
.timeline{display:flex;gap:.75rem;overflow-x:auto;padding-bottom:.5rem}
figure{margin:0;text-align:center}figure img{width:320px;image-rendering:pixelated;border:1px solid #ddd}
pre{background:#f7f7f7;padding:.75rem;overflow-x:auto;font-size:.85rem}
section.run{border-top:2px solid #ddd;margin-top:2rem}svg{max-width:100%;height:auto}
.overview{display:flex;gap:1.5rem;align-items:flex-start;flex-wrap:wrap}.plot{flex:1;min-width:420px}
"""


# -- plots ------------------------------------------------------------------------------------------


def _inline_svg(fig, figure_id: str) -> str:
    """The figure as an <svg> element to put in HTML (no XML prolog), ids made unique on the page."""
    text = save_figure(fig, "svg").decode()
    text = text[text.index("<svg") :]
    # matplotlib's clip-path and glyph ids are only unique within one file.
    return (
        text.replace('id="', f'id="{figure_id}-')
        .replace("url(#", f"url(#{figure_id}-")
        .replace('xlink:href="#', f'xlink:href="#{figure_id}-')
    )


# -- the page ---------------------------------------------------------------------------------------


def _run_info(run_dir: Path) -> dict:
    """Everything the page shows about one run folder."""
    if not run_dir.is_dir():
        raise DiffFitError(f"The run folder {run_dir} does not exist.")
    adapter = run_dir / "adapter.safetensors"
    log = run_dir / "log.jsonl"
    if not adapter.is_file() and not log.is_file():
        raise DiffFitError(f"{run_dir} is not a run folder of difffit fit (no log.jsonl, no adapter.safetensors).")
    records = read_log(log)
    summary = training_summary(adapter) if adapter.is_file() else log_summary(records)
    config = run_dir / "config.toml"
    return {
        "path": run_dir,
        "records": records,
        "summary": summary,
        "evals": eval_results(run_dir),
        "previews": previews(run_dir),
        "config": config.read_text() if config.is_file() else None,
    }


def _fid(info: dict) -> float | None:
    fids = [result["fid"] for result in info["evals"].values() if isinstance(result.get("fid"), int | float)]
    return min(fids) if fids else None


def _fmt(value, spec: str = "") -> str:
    if value is None:
        return "–"
    return format(value, spec) if spec else str(value)


def _table(rows: list[tuple[str, str]], header: tuple[str, ...] | None = None, numeric: bool = False) -> str:
    head = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>" if header else ""
    cell = '<td class="num">' if numeric else "<td>"
    body = "".join(
        "<tr>"
        + "".join(
            (f"<th>{html.escape(str(c))}</th>" if i == 0 and not header else f"{cell}{html.escape(str(c))}</td>")
            for i, c in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table>{head}{body}</table>"


COMPARISON = (
    "run",
    "method",
    "trainable params",
    "adapter bytes",
    "img/s",
    "peak memory (MB)",
    "final loss",
    "final loss (smoothed)",
    "FID",
)


def _comparison_row(name: str, info: dict) -> tuple[str, ...]:
    s = info["summary"]
    return (
        name,
        _fmt(s.get("method")),
        _fmt(s.get("trainable_params"), ","),
        _fmt(s.get("file_bytes"), ","),
        _fmt(s.get("img_per_s"), ".1f"),
        _fmt(s.get("peak_mem_mb"), ",.0f"),
        _fmt(s.get("final_loss"), ".4f"),
        _fmt(s.get("final_loss_smoothed"), ".4f"),
        _fmt(_fid(info), ".2f"),
    )


def _summary_rows(s: dict) -> list[tuple[str, str]]:
    """The run's summary table: (label, formatted value), leaving out what the run does not record."""
    training = s.get("training", {})
    elapsed = s.get("elapsed_s")
    rows = [
        ("method", s.get("method"), ""),
        ("base", s.get("base"), ""),
        ("family", s.get("family"), ""),
        ("architecture", s.get("architecture"), ""),
        ("resolution", s.get("resolution"), ""),
        ("classes", s.get("num_classes"), ""),
        ("captions", training.get("captions"), ","),
        ("trainable params", s.get("trainable_params"), ","),
        ("adapter bytes", s.get("file_bytes"), ","),
        ("steps", training.get("steps", s.get("logged_steps")), ","),
        ("batch size", training.get("batch_size"), ""),
        ("learning rate", training.get("lr"), ""),
        ("training images", training.get("images"), ","),
        ("training time", format_duration(elapsed) if elapsed is not None else None, ""),
        ("img/s (median)", s.get("img_per_s"), ".1f"),
        ("peak memory (MB)", s.get("peak_mem_mb"), ",.0f"),
        ("final loss", s.get("final_loss"), ".4f"),
        ("final val_loss", s.get("final_val_loss"), ".4f"),
    ]
    return [(label, _fmt(value, spec)) for label, value, spec in rows if value is not None]


def _timeline(found: list[tuple[int, Path]]) -> str:
    from PIL import Image

    figures = []
    for step, path in found:
        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
        data = base64.b64encode(buffer.getvalue()).decode()
        figures.append(
            f'<figure><img alt="step {step}" src="data:image/png;base64,{data}">'
            f"<figcaption>step {step:,}</figcaption></figure>"
        )
    return f'<div class="timeline">{"".join(figures)}</div>'


def _run_section(i: int, name: str, info: dict) -> str:
    parts = [
        f'<section class="run" id="run-{i}"><h2>{html.escape(name)}</h2>',
        f"<p><code>{html.escape(str(info['path']))}</code></p>",
        '<div class="overview">',
        _table(_summary_rows(info["summary"])),
    ]
    if info["records"]:
        plotted = {
            key: dict(zip(("step", "value"), series(info["records"], key), strict=True))
            for key in ("loss", "mse", "vb", "val_loss", "fid", "kid", "clip")
        }
        parts.append(f'<div class="plot">{_inline_svg(loss_figure({name: info["records"]}), f"loss-{i}")}')
        if (evaluation := eval_figure(info["records"])) is not None:  # in-training FID / CLIP score
            parts.append(_inline_svg(evaluation, f"eval-{i}"))
        parts += ["</div>", f'<script type="application/json" class="log-data">{json.dumps(plotted)}</script>']
    parts.append("</div>")
    if info["previews"]:
        parts += ["<h3>Samples during training</h3>", _timeline(info["previews"])]
    for file, result in info["evals"].items():
        metrics, settings = split_eval(result)
        parts += [
            f"<h3>Evaluation: {html.escape(file)}</h3>",
            _table([(k, f"{v:.6g}") for k, v in metrics.items()] + [(k, _fmt(v)) for k, v in settings.items()]),
        ]
    if info["config"]:
        parts += ["<h3>Resolved config (config.toml)</h3>", f"<pre>{html.escape(info['config'])}</pre>"]
    return "".join(parts) + "</section>"


def write_report(run_dirs: list[str | Path], out: str | Path, *, overwrite: bool = False) -> Path:
    """Write the HTML report of `run_dirs` to `out` (refused if it exists, unless `overwrite`). An `out` that
    is a folder, or ends in a slash, gets report.html inside it."""
    if not run_dirs:
        raise DiffFitError("No run folder given.", hint="Pass one or more folders written by difffit fit.")
    if str(out).endswith(("/", os.sep)) or Path(out).expanduser().is_dir():
        out = Path(out) / REPORT_FILE
    out = check_output(out, overwrite=overwrite, inputs=run_dirs)
    paths = [Path(p) for p in run_dirs]
    infos = [_run_info(p) for p in paths]
    names = unique_names([str(p) for p in paths])
    count = f"{len(infos)} run{'s' if len(infos) > 1 else ''}"
    body = [f"<h1>difffit report</h1><p>{count}; written {datetime.date.today()} by difffit {__version__}.</p>"]
    if len(infos) > 1:
        body += [
            "<h2>Comparison</h2>",
            _table([_comparison_row(n, i) for n, i in zip(names, infos, strict=True)], header=COMPARISON, numeric=True),
        ]
        runs = {n: i["records"] for n, i in zip(names, infos, strict=True) if i["records"]}
        if runs:
            body += ["<h3>Smoothed loss</h3>", _inline_svg(loss_figure(runs), "overlay")]
    body += [_run_section(i, n, info) for i, (n, info) in enumerate(zip(names, infos, strict=True))]
    title = html.escape(f"difffit report: {', '.join(names)}")
    page = (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>\n"
    )
    with atomic_path(out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return out
