"""Two processes (torchrun, gloo on the CPU) train what one process trains on the same global batch.

Each test runs the same `difffit fit` command once in this process and once under
`torchrun --nproc_per_node 2`, and compares their log.jsonl: the loss of step 1 (one global batch, the
same draws: only the float order of the cross-process reduction differs), every later step's, and the
validation and evaluation numbers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli
from t2i_fixtures import make_mixed_aspect_data, make_tiny_sd3

REPO = Path(__file__).resolve().parents[1]
COMMON = ("--batch-size", "4", "--sample-every", "0", "--num-workers", "0", "--device", "cpu")


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _one_and_two_processes(monkeypatch, capsys, tmp_path: Path, args: list[str]) -> tuple[list[dict], list[dict], str]:
    """(log of one process, log of two, the two-process run's stderr); each run with its own caches."""
    code, _, err = run_cli(
        monkeypatch, capsys, "fit", *args, *COMMON, "--cache-dir", tmp_path / "cache-1", "--out", tmp_path / "one"
    )
    assert code == 0, err[-2000:]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "-m",
            "difffit",
            "fit",
            *map(str, args),
            *COMMON,
            "--cache-dir",
            str(tmp_path / "cache-2"),
            "--out",
            str(tmp_path / "two"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert "Traceback" not in two.stderr
    return _records(tmp_path / "one"), _records(tmp_path / "two"), two.stderr


def _assert_same_training(one: list[dict], two: list[dict], keys: tuple[str, ...] = ()) -> None:
    losses = [(a["loss"], b["loss"]) for a, b in zip(one, two, strict=True) if "loss" in a]
    assert [r["step"] for r in one] == [r["step"] for r in two]
    assert losses[0][1] == pytest.approx(losses[0][0], rel=1e-5)
    for a, b in losses:
        assert b == pytest.approx(a, rel=1e-3)
    for key in keys:
        mine = [(a[key], b[key]) for a, b in zip(one, two, strict=True) if key in a]
        assert mine and all(b == pytest.approx(a, rel=1e-5) for a, b in mine), (key, mine)


def test_dit_on_two_processes_trains_validates_and_evaluates_as_one(
    monkeypatch, capsys, tmp_path, toy_data, tiny_base_file, tiny_vae_dir
):
    from difffit.engine.evaluation.inception import random_inception_weights
    from difffit.engine.methods.adapter import read_adapter

    weights = random_inception_weights(tmp_path / "inception.pth")
    # 3 held-out images x 4 timesteps = 12 validation pairs: 3 batches, two on process 0 and one on process 1;
    # FID of 6 samples: a batch of 4 on process 0 and of 2 on process 1
    one, two, err = _one_and_two_processes(
        monkeypatch,
        capsys,
        tmp_path,
        [
            toy_data,
            "--base",
            tiny_base_file,
            "--vae",
            tiny_vae_dir,
            "--steps",
            "4",
            "--save-every",
            "2",
            "--val-fraction",
            "0.25",
            "--val-every",
            "2",
            "--eval-every",
            "4",
            "--eval-n",
            "6",
            "--eval-reference",
            toy_data,
            "--inception-weights",
            weights,
        ],
    )
    _assert_same_training(one, two, keys=("val_loss", "fid"))
    assert [r["step"] for r in one if "val_loss" in r] == [2, 4] and [r["step"] for r in one if "fid" in r] == [4]
    assert err.count("Done: 4 steps") == 1  # process 0 speaks and writes
    tensors, meta = read_adapter(tmp_path / "two" / "adapter.safetensors")
    assert meta.training["steps"] == 4 and tensors
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir())[-1].endswith("4")


def test_sd3_with_two_buckets_on_two_processes_trains_and_validates_as_one(monkeypatch, capsys, tmp_path):
    data = make_mixed_aspect_data(tmp_path / "data", {(40, 10): 4, (20, 20): 5, (10, 40): 2})
    one, two, err = _one_and_two_processes(
        monkeypatch,
        capsys,
        tmp_path,
        [
            data,
            "--base",
            make_tiny_sd3(tmp_path / "sd3"),
            "--steps",
            "4",
            "--save-every",
            "0",
            "--val-fraction",
            "0.25",
            "--val-every",
            "2",
        ],
    )
    assert "16 x 16" in err and "32 x 8" in err  # two buckets: steps draw from either, the same on each process
    # the held-out images of each bucket, their pairs shared by the processes: the one-process validation loss
    _assert_same_training(one, two, keys=("val_loss",))
    assert [r["step"] for r in one if "val_loss" in r] == [2, 4]


def test_a_batch_the_processes_cannot_share_is_one_sentence_before_anything_is_written(
    monkeypatch, capsys, tmp_path, toy_data, tiny_base_file, tiny_vae_dir
):
    from accelerate import Accelerator

    monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: 2))
    code, _, err = run_cli(
        monkeypatch,
        capsys,
        "fit",
        toy_data,
        "--base",
        tiny_base_file,
        "--vae",
        tiny_vae_dir,
        "--steps",
        "2",
        "--batch-size",
        "3",
        "--num-workers",
        "0",
        "--device",
        "cpu",
        "--cache-dir",
        tmp_path / "cache",
        "--out",
        tmp_path / "run",
    )
    assert code != 0 and "--batch-size 3 does not split evenly over 2 process(es)" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()
