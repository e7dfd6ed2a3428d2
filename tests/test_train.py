"""The training loop on a tiny base and the tiny VAE: learning, frozen weights, resume, cache, failures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from difffit.engine.errors import DiffFitError
from difffit.engine.training.config import FitConfig
from difffit.engine.training.train import fit

REPO = Path(__file__).resolve().parents[1]


def config(tmp_path: Path, data: Path, base: Path, vae: Path, **overrides) -> FitConfig:
    options = dict(
        data=str(data),
        base=str(base),
        vae=str(vae),
        steps=6,
        batch_size=4,
        save_every=0,
        sample_every=0,
        num_workers=0,
        cache_dir=str(tmp_path / "cache"),
        out=str(tmp_path / "run"),
        adapter_dtype="fp32",
    )
    options.update(overrides)
    return FitConfig(**options)


@pytest.fixture
def conf(tmp_path, toy_data, tiny_base_file, tiny_vae_dir):
    """conf(**overrides) -> a small FitConfig on the toy data, tiny base and tiny VAE."""
    return lambda **overrides: config(tmp_path, toy_data, tiny_base_file, tiny_vae_dir, **overrides)


def adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_loss_falls_on_learnable_data(tmp_path, conf):
    # 60 steps: at 40, how far the loss falls depends on the draws (0.57x-0.61x of the start measured).
    result = fit(conf(steps=60, batch_size=8, lr=1e-2, ema=False), progress=False)
    losses = [json.loads(line)["loss"] for line in (result.out_dir / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 60
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:10])
    record = json.loads((result.out_dir / "log.jsonl").read_text().splitlines()[-1])
    assert set(record) >= {"step", "loss", "mse", "vb", "lr", "img_per_s", "elapsed_s"}
    assert result.images == 12 and result.classes == 2 and result.adapter.exists()


def test_frozen_tensors_bit_identical_and_outputs_written(tmp_path, conf, tiny_base_file, tiny_vae_dir):
    from difffit.engine.models.families import load_base

    base = load_base(str(tiny_base_file), vae=str(tiny_vae_dir))
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    result = fit(conf(steps=3, sample_every=2, save_every=2, lr=1e-2), base=base, progress=False)
    after = base.model.state_dict()
    trained = {n for n, p in base.model.named_parameters() if p.requires_grad}
    changed = {
        n for n in before if n in after and before[n].shape == after[n].shape and not torch.equal(before[n], after[n])
    }
    assert changed and changed <= trained
    frozen = [n for n in before if n not in trained]
    assert frozen and all(torch.equal(before[n], after[n]) for n in frozen)
    out = result.out_dir
    assert sorted(p.name for p in (out / "samples").iterdir()) == [
        "step-0000000.png",
        "step-0000002.png",
        "step-0000003.png",
    ]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002", "step-0000003"]
    import tomllib

    resolved = tomllib.loads((out / "config.toml").read_text())
    assert resolved["steps"] == 3 and resolved["resolution"] == 16 and resolved["lr"] == 1e-2


def test_resume_equals_uninterrupted_run(tmp_path, conf):
    full = fit(conf(steps=8, save_every=4, out=str(tmp_path / "full")), progress=False)
    half = conf(steps=4, save_every=4, out=str(tmp_path / "half"))
    fit(half, progress=False)
    with pytest.raises(DiffFitError, match="earlier run") as refused:
        fit(half, progress=False)  # an existing run is never overwritten silently
    assert "--resume" in refused.value.hint
    resumed = fit(FitConfig(**{**half.__dict__, "steps": 8, "resume": True}), progress=False)
    assert resumed.start_step == 4 and resumed.step == 8
    a, b = adapter_tensors(full.adapter), adapter_tensors(resumed.adapter)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)
    steps = [json.loads(line)["step"] for line in (tmp_path / "half" / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


def test_resume_of_a_changed_dit_run_is_refused_naming_the_change(tmp_path, conf, toy_data):
    first = conf(steps=2, save_every=1)
    fit(first, progress=False)
    again = {**first.__dict__, "steps": 3, "resume": True}
    for change, words in [
        ({"lr": 2e-3}, "--lr was 0.001, now 0.002"),
        ({"method": "bitfit"}, "--method was difffit"),
        ({"gamma_blocks": "0"}, "--gamma-blocks was unset, now 0"),
        ({"ema_decay": 0.99}, "--ema-decay was 0.9999, now 0.99"),
    ]:
        with pytest.raises(DiffFitError, match="is not the one checkpointed") as refused:
            fit(FitConfig(**{**again, **change}), progress=False)
        assert words in str(refused.value)
    first_class = sorted(p for p in toy_data.iterdir() if p.is_dir())[0]
    image = sorted(first_class.glob("*.png"))[0]
    image.rename(image.with_name("renamed.png"))  # the same pixels under another name: another image list
    with pytest.raises(DiffFitError, match=r"the training images changed \(as many, 12, but other files or sizes\)"):
        fit(FitConfig(**again), progress=False)
    image.with_name("renamed.png").rename(image)
    assert fit(FitConfig(**again), progress=False).start_step == 2  # unchanged, and a larger --steps: resumed


def _cli(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.Popen(
        [sys.executable, "-m", "difffit", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()[1][-2000:]
        assert time.time() < deadline, "timed out waiting for a checkpoint"
        time.sleep(0.02)


def test_resume_after_sigkill(tmp_path, conf, toy_data, tiny_base_file, tiny_vae_dir):
    common = [
        "--base",
        str(tiny_base_file),
        "--vae",
        str(tiny_vae_dir),
        "--batch-size",
        "4",
        "--sample-every",
        "0",
        "--num-workers",
        "0",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--adapter-dtype",
        "fp32",
        "--no-ema",
    ]
    killed = _cli(
        "fit", str(toy_data), *common, "--steps", "100000", "--save-every", "3", "--out", str(tmp_path / "killed")
    )
    try:
        _wait_for(tmp_path / "killed" / "checkpoints" / "step-0000003", killed)
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.communicate()
    newest = max(int(p.name[5:]) for p in (tmp_path / "killed" / "checkpoints").glob("step-*"))
    total = str(newest + 3)
    resumed = _cli(
        "fit", str(toy_data), *common, "--steps", total, "--out", str(tmp_path / "killed"), "--resume", "--json"
    )
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr[-2000:]
    summary = json.loads(stdout)
    assert summary["start_step"] == newest and summary["step"] == newest + 3

    clean = fit(conf(steps=newest + 3, ema=False, out=str(tmp_path / "clean")), progress=False)
    a, b = adapter_tensors(clean.adapter), adapter_tensors(Path(summary["adapter"]))
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path, toy_data, tiny_base_file, tiny_vae_dir):
    run = _cli(
        "fit",
        str(toy_data),
        "--base",
        str(tiny_base_file),
        "--vae",
        str(tiny_vae_dir),
        "--steps",
        "100000",
        "--batch-size",
        "4",
        "--sample-every",
        "0",
        "--save-every",
        "2",
        "--num-workers",
        "0",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--out",
        str(tmp_path / "run"),
    )
    _wait_for(tmp_path / "run" / "checkpoints" / "step-0000002", run)
    run.send_signal(signal.SIGINT)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 130 and "Traceback" not in stderr
    assert "--resume" in stderr
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    newest = max(int(p.name[5:]) for p in (tmp_path / "run" / "checkpoints").glob("step-*"))
    assert newest == steps[-1]  # the checkpoint holds the last completed step
    assert (tmp_path / "run" / "adapter.safetensors").exists()


def test_cache_is_reused_across_runs(tmp_path, conf, monkeypatch):
    from difffit.engine.models.vae import Autoencoder

    calls = []
    original = Autoencoder.encode

    def counting(self, images):
        calls.append(len(images))
        return original(self, images)

    monkeypatch.setattr(Autoencoder, "encode", counting)
    first = fit(conf(out=str(tmp_path / "a")), progress=False)
    encoded = sum(calls)
    assert encoded == 2 * 12  # every image, plain and mirrored, once
    second = fit(conf(out=str(tmp_path / "b")), progress=False)
    assert sum(calls) == encoded and first.cache == second.cache

    fit(conf(out=str(tmp_path / "c"), cache_latents=False, steps=2), progress=False)
    assert sum(calls) == encoded + 2 * 4  # on the fly: one encode per micro-batch


def test_mixed_folder_trains_on_readable_images(tmp_path, tiny_base_file, tiny_vae_dir, capsys):
    from test_data import make_mixed_folder

    good, bad = make_mixed_folder(tmp_path / "mixed")
    result = fit(config(tmp_path, tmp_path / "mixed", tiny_base_file, tiny_vae_dir, steps=2), progress=False)
    assert result.images == len(good) and result.skipped == len(bad)
    err = capsys.readouterr().err
    for name in bad:
        assert name in err
    assert f"Skipped {len(bad)} of {len(good) + len(bad)}" in err


def test_empty_folder_fails_cleanly(tmp_path, tiny_base_file):
    (tmp_path / "empty").mkdir()
    run = _cli("fit", str(tmp_path / "empty"), "--base", str(tiny_base_file), "--out", str(tmp_path / "run"))
    _, stderr = run.communicate(timeout=120)
    assert run.returncode != 0 and "Traceback" not in stderr
    assert "No images found" in stderr


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, conf, monkeypatch):
    from difffit.engine.models.diffusion import GaussianDiffusion

    original = GaussianDiffusion.training_losses
    calls = []

    def poisoned(self, *args, **kwargs):
        calls.append(1)
        out = original(self, *args, **kwargs)
        if len(calls) == 4:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(GaussianDiffusion, "training_losses", poisoned)
    with pytest.raises(DiffFitError, match=r"nan within the 1 step\(s\) before step 4.*step 2 is kept"):
        fit(conf(steps=10, save_every=2), progress=False)
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-0000002"]


def test_batch_must_split_over_accumulation(tmp_path, conf):
    with pytest.raises(DiffFitError, match="does not split evenly"):
        fit(conf(batch_size=5, grad_accum=2), progress=False)


def test_grad_accum_grad_checkpointing_and_warmup(tmp_path, conf):
    result = fit(conf(steps=2, batch_size=4, grad_accum=2, grad_checkpointing=True, warmup=4), progress=False)
    records = [json.loads(line) for line in (result.out_dir / "log.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in records] == [1e-3 * 1 / 4, 1e-3 * 2 / 4]
    assert all(np.isfinite(r["loss"]) for r in records)


def test_same_classes_keeps_the_base_table_only_when_the_classes_match():
    from difffit.engine.methods.trainable import same_classes

    wnids = [f"n{i:08d}" for i in range(1000)]
    labels = [f"label {i}" for i in range(1000)]
    assert same_classes(wnids, 1000, labels)  # ImageNet folders against DiT-XL/2's names
    assert same_classes(["a", "b"], 2, None) and same_classes(["a", "b"], 2, ["a", "b"])
    assert not same_classes(["a", "b"], 2, ["b", "a"])
    assert not same_classes(["a", "b", "c"], 2, None)
    assert not same_classes(wnids[:10], 10, labels[:10])  # wnids only mean ImageNet order at 1000


def test_bf16_training_stores_frozen_matrices_in_bf16(tmp_path, conf, tiny_base_file, tiny_vae_dir):
    from difffit.engine.models.families import load_base

    base = load_base(str(tiny_base_file), vae=str(tiny_vae_dir))
    frozen_before = base.model.blocks[0].attn.qkv.weight.detach().clone()
    result = fit(conf(steps=2, sample_every=2, mixed_precision="bf16"), base=base, progress=False)
    qkv = base.model.blocks[0].attn.qkv
    assert qkv.weight.dtype == torch.bfloat16 and qkv.bias.dtype == torch.float32  # bias trains in fp32
    assert torch.equal(qkv.weight.float(), frozen_before.to(torch.bfloat16).float())
    assert base.model.y_embedder.embedding_table.weight.dtype == torch.float32
    assert (result.out_dir / "samples" / "step-0000002.png").exists()  # previews run in bf16 too
    assert all(t.dtype == torch.float32 for t in adapter_tensors(result.adapter).values())
