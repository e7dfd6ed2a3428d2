"""The benchmark helpers that decide what gets quoted: interleaving, spreads, the scaling model."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import _timing  # noqa: E402
import scaling  # noqa: E402


def test_interleave_rotates_the_order_and_keeps_round_order():
    calls = []
    contenders = {name: (lambda n=name: calls.append(n) or float(len(calls))) for name in "abc"}
    times = _timing.interleave(contenders, repeats=3, warmup=1)
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
    assert times == {"a": [4.0, 9.0, 11.0], "b": [5.0, 7.0, 12.0], "c": [6.0, 8.0, 10.0]}


def test_spread_paired_ratio_and_the_reproduction_rule():
    assert _timing.spread([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert _timing.paired_ratio([1.0, 2.0], [2.0, 2.0]) == {"median": 0.75, "min": 0.5, "max": 1.0, "n": 2}
    first, second = {"median": 0.6, "min": 0.5, "max": 0.7}, {"median": 0.65, "min": 0.55, "max": 0.8}
    assert _timing.reproduces(first, second)
    assert not _timing.reproduces(first, {"median": 0.76, "min": 0.7, "max": 0.8})


def test_result_name_has_gpu_torch_and_date():
    env = {"gpu": "NVIDIA H200", "torch": "2.14.1+cu130", "date": "2026-11-29T01:00:00Z"}
    assert _timing.result_name(env) == "NVIDIA-H200_torch-2.14.1_2026-11-29"


def test_ring_allreduce_volume_and_the_scaling_table():
    # 2(N-1)/N of the bytes over the link, plus 2(N-1) hops.
    assert scaling.allreduce_seconds(10**9, 4, 1e9, 0.0, 4) == pytest.approx(2 * 3 / 4 * 4.0)
    assert scaling.allreduce_seconds(10**9, 1, 1e9, 1.0, 4) == 0.0
    out = scaling.model(
        argparse.Namespace(difffit_img_s=368.0, full_img_s=282.0, batch=32, classes=101, bytes_per_value=4)
    )
    assert 600_000 < out["inputs"]["trainable_values"]["difffit"] < 700_000
    assert out["inputs"]["trainable_values"]["full"] > 674_000_000
    one_gpu = out["table"]["nvlink-900GB/s"][0]["no_overlap"]["full/difffit_step"]
    assert one_gpu == pytest.approx(368 / 282, abs=1e-3)
    assert max(r["gpus"] for r in out["table"]["nvlink-900GB/s"]) == 8  # NVLink: one node
    assert out["peak_advantage"]["ethernet-100Gb/s"]["full/difffit_step_no_overlap"] > 2


def run_at_toy_size(script: str, *args: str) -> dict:
    """A benchmark script run as the GPU stage runs it, at toy sizes on the CPU (DIFFFIT_BENCH_SMALL): its JSON."""
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "DIFFFIT_BENCH_SMALL": "1", "PYTHONPATH": str(repo)}
    result = subprocess.run(
        [sys.executable, str(repo / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=600,
    )
    return json.loads(result.stdout)


def test_pixart_train_runs_at_toy_size_on_the_cpu():
    """The GPU stage's script end to end (DIFFFIT_BENCH_SMALL: the tiny PixArt and T5, batches 1 and 2)."""
    report = run_at_toy_size("pixart_train.py", "--text", "cached,encode", "--repeats", "1", "--threads", "1")
    assert report["benchmark"] == "pixart_train" and report["batch"] == 2
    contenders = report["contenders"]
    assert set(contenders) == {"difffit cached", "difffit encode", "full cached", "full encode"}
    assert all(c["largest_batch"] == 2 and c["peak_mem_mb"] > 0 and c["img_per_s"] > 0 for c in contenders.values())
    assert contenders["difffit cached"]["trainable_params"] < contenders["full cached"]["trainable_params"] / 10
    assert {"difffit cached / full cached step time", "difffit encode / difffit cached peak memory"} <= set(
        report["ratios"]
    )


def test_t2i_memory_runs_at_toy_size_on_the_cpu():
    """The t2i_memory GPU stage's script end to end on tiny configurations: live tensor bytes on the CPU,
    fp8 frozen weights hold half of bf16's, checkpointing keeps fewer activations, full fp8 is skipped."""
    report = run_at_toy_size("t2i_memory.py", "--configs", "pixart-tiny", "--methods", "difffit,full", "--threads", "1")
    assert report["benchmark"] == "t2i_memory" and report["measure"] == "live tensor bytes counted op by op"
    runs = report["contenders"]
    ran = (("difffit", "bf16"), ("difffit", "fp8"), ("full", "bf16"))
    assert set(runs) == {f"pixart-tiny {m} {p} {c}" for m, p in ran for c in ("ckpt", "no-ckpt")}
    assert all(
        r["status"] == "ok" and 0 < r["resident_mib"] <= r["peak_mib"] and r["img_per_s"] > 0 for r in runs.values()
    )
    assert report["skipped"] == {
        f"pixart-tiny full fp8 {c}": "full fine-tuning trains every weight; fp8 is for frozen ones"
        for c in ("ckpt", "no-ckpt")
    }
    bf16, fp8 = runs["pixart-tiny difffit bf16 no-ckpt"], runs["pixart-tiny difffit fp8 no-ckpt"]
    assert fp8["resident_mib"] < 0.75 * bf16["resident_mib"]  # the block matrices at 1 byte a value, not 2
    assert runs["pixart-tiny difffit bf16 ckpt"]["peak_mib"] < bf16["peak_mib"]
    assert bf16["trainable_params"] < runs["pixart-tiny full bf16 no-ckpt"]["trainable_params"] / 10
    assert "pixart-tiny difffit no-ckpt: fp8/bf16 peak" in report["ratios"]


def test_t2i_step_runs_at_toy_size_on_the_cpu():
    """The t2i_step GPU stage's script end to end on the tiny FLUX: every method against the floor, which trains
    one value and holds no weight gradient or optimizer state, so it needs the least memory."""
    report = run_at_toy_size("t2i_step.py", "--configs", "flux-tiny", "--repeats", "1", "--threads", "1")
    assert report["benchmark"] == "t2i_step" and report["lora_rank"] == 16
    flux = report["configs"]["flux-tiny"]
    rows = flux["contenders"]
    assert list(rows) == ["floor", "difffit", "lora", "bitfit", "full"] and rows["floor"]["trainable_params"] == 1
    assert all(r["step_s"]["median"] > 0 and r["peak_mib"] > 0 for r in rows.values())
    assert rows["floor"]["peak_mib"] < rows["difffit"]["peak_mib"] < rows["full"]["peak_mib"]
    assert rows["bitfit"]["trainable_params"] < rows["difffit"]["trainable_params"] < rows["full"]["trainable_params"]
    # no weight gradient: DiffFit's matrix products are the floor's, LoRA adds its factors', full every weight's
    flops = {m: r["matmul_gflop"] for m, r in rows.items()}
    assert flops["floor"] <= flops["difffit"] < flops["lora"] < flops["full"]
    assert {"difffit/floor step", "difffit/lora step", "full/floor step"} <= set(flux["ratios"])
    assert flux["goal"]["difffit/floor"] == flux["ratios"]["difffit/floor step"]["median"]


def test_t2i_memory_reports_out_of_memory_as_a_result(monkeypatch):
    import t2i_memory

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(t2i_memory, "build", out_of_memory)
    args = argparse.Namespace(device="cpu", threads=0, estimate=False)
    assert t2i_memory.measure(args, ("flux-dev", "full", "bf16", True)) == {
        "status": "out of memory",
        "during": "build",
    }
