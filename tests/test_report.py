"""`difffit report`, fit's loss.png and preview images for trackers: parsed back, not eyeballed."""

from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from difffit.engine.errors import DiffFitError
from difffit.engine.sharing.report import write_report
from difffit.engine.training.config import FitConfig
from difffit.engine.training.loss_plot import write_loss_plot
from difffit.engine.training.runs import read_log, smooth
from difffit.engine.training.train import fit


@pytest.fixture(scope="module")
def real_run(tmp_path_factory, tiny_base_file, tiny_vae_dir) -> Path:
    """A real 4-step fit with previews at steps 0, 2 and 4, and an eval result beside it."""
    from conftest import make_toy_data

    root = tmp_path_factory.mktemp("report")
    config = FitConfig(
        data=str(make_toy_data(root / "data")),
        base=str(tiny_base_file),
        vae=str(tiny_vae_dir),
        steps=4,
        batch_size=4,
        save_every=0,
        sample_every=2,
        num_workers=0,
        cache_dir=str(root / "cache"),
        out=str(root / "run"),
        lr=1e-2,
    )
    out = fit(config, progress=False).out_dir
    (out / "eval.json").write_text(json.dumps({"fid": 42.125, "num_generated": 64, "num_reference": 12}))
    return out


def fake_run(folder: Path, losses: list[float], val: dict[int, float] | None = None) -> Path:
    """A run folder written by hand: a log (with a foreign line and a cut-off line), one preview, no adapter."""
    folder.mkdir(parents=True)
    lines = [
        json.dumps(
            {
                "step": i + 1,
                "loss": v,
                "mse": v * 0.9,
                "vb": v * 0.1,
                "img_per_s": 100.0 + i,
                "elapsed_s": 2.0 * (i + 1),
                "peak_mem_mb": 1000 + i,
            }
        )
        for i, v in enumerate(losses)
    ]
    lines += [json.dumps({"step": s, "val_loss": v}) for s, v in (val or {}).items()]
    lines.insert(1, json.dumps({"event": "from another tool"}))
    (folder / "log.jsonl").write_text("\n".join(lines) + '\n{"step": 99, "loss": 0.')
    (folder / "samples").mkdir()
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(folder / "samples" / "step-0000000.png")
    (folder / "config.toml").write_text('method = "difffit"\nsteps = 5\n')
    return folder


class Page(HTMLParser):
    """The parts of the report the tests read: tables, images, element ids, JSON blocks."""

    def __init__(self, text: str):
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.images: list[str] = []
        self.ids: list[str] = []
        self.json: list[dict] = []
        self._cell: list[str] | None = None
        self._script = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.append(attrs["id"])
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(attrs["src"])
        elif tag == "script" and attrs.get("type") == "application/json":
            self._script = True

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append("".join(self._cell))
            self._cell = None
        elif tag == "script":
            self._script = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._script:
            self.json.append(json.loads(data))


def decode(src: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix)
    return Image.open(io.BytesIO(base64.b64decode(src[len(prefix) :])))


def test_report_of_one_real_run(real_run, tmp_path):
    out = write_report([real_run], tmp_path / "report.html")
    page = Page(out.read_text())
    assert len(page.images) == 3  # the preview timeline: steps 0, 2 and 4
    assert all(decode(src).size == Image.open(real_run / "samples" / "step-0000000.png").size for src in page.images)
    log = [json.loads(line) for line in (real_run / "log.jsonl").read_text().splitlines()]
    (data,) = page.json
    assert data["loss"] == {"step": [r["step"] for r in log], "value": [r["loss"] for r in log]}
    assert data["vb"]["value"] == [r["vb"] for r in log] and data["val_loss"] == {"step": [], "value": []}
    assert {"loss-0-loss", "loss-0-loss-smoothed", "loss-0-mse-smoothed", "loss-0-vb-smoothed"} <= set(page.ids)
    summary = dict(row for row in page.tables[0])
    assert summary["method"] == "difffit" and summary["steps"] == "4" and summary["batch size"] == "4"
    assert summary["final loss"] == f"{log[-1]['loss']:.4f}"
    assert ["fid", "42.125"] in page.tables[1]  # eval.json found next to the run
    assert "steps = 4" in out.read_text()  # the resolved config.toml


def test_two_runs_give_two_rows_and_two_curves(real_run, tmp_path):
    other = fake_run(tmp_path / "runs" / "other", [1.0, 0.8, 0.6, 0.5, 0.45], val={5: 0.7})
    page = Page(write_report([real_run, other], tmp_path / "both.html").read_text())
    header, *rows = page.tables[0]
    assert header[:3] == ["run", "method", "trainable params"] and len(rows) == 2
    assert rows[0][0] == real_run.name and rows[1][0] == "other"
    assert rows[1][1:4] == ["–", "–", "–"]  # no adapter in the hand-made run
    assert rows[1][4] == "102.5"  # median img/s of steps 2-5 (101..104): the first step includes start-up
    assert rows[1][5] == "1,004" and rows[1][6] == "0.4500"
    assert rows[1][7] == f"{smooth([1.0, 0.8, 0.6, 0.5, 0.45])[-1]:.4f}"
    assert rows[0][8] == "42.12" and rows[1][8] == "–"
    assert [i for i in page.ids if i.startswith("overlay-run-")] == ["overlay-run-0", "overlay-run-1"]
    assert "loss-1-val_loss" in page.ids  # the validation loss of the second run is drawn
    assert page.json[1]["val_loss"] == {"step": [5], "value": [0.7]}
    assert page.json[1]["loss"]["step"] == [1, 2, 3, 4, 5]  # the foreign and the cut-off lines are skipped
    assert len(page.images) == 4


def test_report_refusals(real_run, tmp_path):
    out = tmp_path / "r.html"
    out.write_text("mine")
    with pytest.raises(DiffFitError, match="already exists"):
        write_report([real_run], out)
    assert out.read_text() == "mine"
    image = tmp_path / "data" / "img05.png"  # a training image: never replaced, even with --overwrite
    image.parent.mkdir()
    image.write_bytes(b"\x89PNG a training image")
    for target in (out, image):
        with pytest.raises(DiffFitError, match="not written by difffit"):
            write_report([real_run], target, overwrite=True)
    assert out.read_text() == "mine" and image.read_bytes() == b"\x89PNG a training image"
    ours = write_report([real_run], tmp_path / "ours.html")
    write_report([real_run], ours, overwrite=True)  # a report difffit wrote is replaced
    assert ours.read_text().startswith("<!DOCTYPE html>")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DiffFitError, match="not a run folder"):
        write_report([tmp_path / "empty"], tmp_path / "x.html")
    with pytest.raises(DiffFitError, match="does not exist"):
        write_report([tmp_path / "nope"], tmp_path / "x.html")
    assert not (tmp_path / "x.html").exists()


def test_loss_png_decodes(real_run, tmp_path):
    path = write_loss_plot(real_run / "log.jsonl", tmp_path / "loss.png")
    with Image.open(path) as image:
        image.load()
        assert image.format == "PNG" and image.size == (800, 400)
    (tmp_path / "foreign.jsonl").write_text('{"event": 1}\n')
    assert write_loss_plot(tmp_path / "foreign.jsonl", tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
    assert read_log(tmp_path / "missing.jsonl") == []


def test_tensorboard_events_hold_the_preview_image(real_run, tmp_path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    EventAccumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator").EventAccumulator

    from difffit.engine.training.trackers import log_preview

    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(cpu=True, log_with="tensorboard", project_dir=str(tmp_path))
    accelerator.init_trackers("difffit")
    log_preview(accelerator, real_run / "samples" / "step-0000002.png", step=2)
    log_preview(accelerator, np.zeros((6, 10, 3), np.uint8), step=4)
    accelerator.end_training()
    (events,) = list(tmp_path.rglob("events.out.tfevents.*"))
    accumulator = EventAccumulator(str(events.parent), size_guidance={"images": 0})
    accumulator.Reload()
    assert accumulator.Tags()["images"] == ["preview"]
    shown = accumulator.Images("preview")
    assert [e.step for e in shown] == [2, 4] and (shown[1].width, shown[1].height) == (10, 6)
    grid = Image.open(real_run / "samples" / "step-0000002.png")
    assert (shown[0].width, shown[0].height) == grid.size


def test_log_with_checks(monkeypatch):
    import importlib.util
    import os

    from difffit.engine.training.trackers import check_log_with

    check_log_with(None)
    check_log_with("tensorboard")
    with pytest.raises(DiffFitError, match="choose tensorboard or wandb"):
        check_log_with("mlflow")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "wandb" else real_find_spec(name))
    with pytest.raises(DiffFitError, match="needs the wandb package, which is not installed") as error:
        check_log_with("wandb")
    assert error.value.hint == "pip install wandb"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    monkeypatch.setenv("WANDB_MODE", "online")
    check_log_with("wandb")
    assert os.environ["WANDB_MODE"] == "online"  # the user's choice stays
    monkeypatch.delenv("WANDB_MODE")
    check_log_with("wandb")  # downloads are off in the tests: no network, so offline
    assert os.environ["WANDB_MODE"] == "offline"
