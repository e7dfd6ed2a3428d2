"""The loss curves of one or more runs as a matplotlib figure: fit's loss.png and the report's plots."""

from __future__ import annotations

import io
from pathlib import Path

from difffit.engine.io import atomic_path
from difffit.engine.training.runs import read_log, series, smooth

CURVES = (  # (log key, label, smoothed?, style)
    ("loss", "loss", False, {"color": "C0", "alpha": 0.3, "linewidth": 0.8}),
    ("loss", "loss (smoothed)", True, {"color": "C0", "linewidth": 1.8}),
    ("mse", "mse (smoothed)", True, {"color": "C1", "linewidth": 1.2}),
    ("vb", "vb (smoothed)", True, {"color": "C2", "linewidth": 1.2}),
    ("val_loss", "val_loss", False, {"color": "C3", "marker": "o", "markersize": 3}),
)
MAX_POINTS = 2000  # points per plotted curve; longer series are thinned after smoothing


def _thin(steps: list[int], values: list[float]) -> tuple[list[int], list[float]]:
    every = max(1, -(-len(steps) // MAX_POINTS))
    return steps[::every], values[::every]


def loss_figure(runs: dict[str, list[dict]]):
    """One run: its curves (CURVES). Several: each run's smoothed loss. Lines get gids for readers."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    if len(runs) == 1:
        records = next(iter(runs.values()))
        for key, label, smoothed, style in CURVES:
            steps, values = series(records, key)
            if values:
                (line,) = ax.plot(*_thin(steps, smooth(values) if smoothed else values), label=label, **style)
                line.set_gid(label.replace(" (smoothed)", "-smoothed"))
    else:
        for i, (name, records) in enumerate(runs.items()):
            steps, values = series(records, "loss")
            if values:
                (line,) = ax.plot(*_thin(steps, smooth(values)), label=f"{name} (smoothed loss)", linewidth=1.6)
                line.set_gid(f"run-{i}")
    if ax.lines:
        positive = all(v > 0 for line in ax.lines for v in line.get_ydata())
        ax.set_yscale("log" if positive else "linear")
        ax.legend(fontsize="small")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    return fig


EVAL_CURVES = (("fid", "FID (lower is better)", "C4"), ("clip", "CLIP score (higher is better)", "C5"))


def eval_figure(records: list[dict]):
    """The in-training evaluation of one run: a panel per metric logged (fid, clip), None when none was.
    Lines get gids (the metric's log key)."""
    from matplotlib.figure import Figure

    logged = [(key, label, color, series(records, key)) for key, label, color in EVAL_CURVES]
    logged = [curve for curve in logged if curve[3][1]]
    if not logged:
        return None
    fig = Figure(figsize=(4 * len(logged), 3), dpi=100, layout="constrained")
    for ax, (key, label, color, (steps, values)) in zip(
        fig.subplots(1, len(logged), squeeze=False)[0], logged, strict=True
    ):
        (line,) = ax.plot(steps, values, color=color, marker="o", markersize=3, label=label)
        line.set_gid(key)
        ax.set_xlabel("step")
        ax.set_title(label, fontsize="medium")
        ax.grid(alpha=0.3)
    return fig


def save_figure(fig, fmt: str) -> bytes:
    import matplotlib

    buffer = io.BytesIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "difffit"}):
        fig.savefig(buffer, format=fmt)
    return buffer.getvalue()


def write_loss_plot(log_path: str | Path, png_path: str | Path) -> Path | None:
    """loss.png of a run's log.jsonl (fit calls it at each preview and at the end); None with no losses yet."""
    records = read_log(log_path)
    if not series(records, "loss")[1]:
        return None
    png_path = Path(png_path)
    data = save_figure(loss_figure({"": records}), "png")
    with atomic_path(png_path) as tmp:
        tmp.write_bytes(data)
    return png_path
