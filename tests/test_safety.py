"""Never lose or silently corrupt a user's data: run folders, the lock, resume checks, the latent cache, signals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from test_train import REPO, _cli, _wait_for, adapter_tensors

from difffit.engine.data.cache_files import remove_stale_builds
from difffit.engine.data.images import scan_image_folder
from difffit.engine.data.latents import latent_cache
from difffit.engine.errors import DiffFitError
from difffit.engine.io import MARKER, atomic_path, check_output, run_lock, write_marker
from difffit.engine.models.vae import load_vae
from difffit.engine.training.config import FitConfig
from difffit.engine.training.train import fit


@pytest.fixture
def conf(tmp_path, toy_data, tiny_base_file, tiny_vae_dir):
    def make(**overrides) -> FitConfig:
        options = dict(
            data=str(toy_data),
            base=str(tiny_base_file),
            vae=str(tiny_vae_dir),
            steps=4,
            batch_size=4,
            save_every=0,
            sample_every=0,
            num_workers=0,
            cache_dir=str(tmp_path / "cache"),
            out=str(tmp_path / "run"),
            adapter_dtype="fp32",
            ema=False,
        )
        return FitConfig(**{**options, **overrides})

    return make


# -- outputs: never replace what difffit did not write, never write over an input --------------------


def test_check_output_refuses_inputs_existing_outputs_and_foreign_folders(tmp_path):
    adapter = tmp_path / "run" / "adapter.safetensors"
    adapter.parent.mkdir()
    adapter.write_bytes(b"x")
    for out in (adapter, adapter.parent):  # the input itself, or the folder holding it
        with pytest.raises(DiffFitError, match="input"):
            check_output(out, overwrite=True, inputs=[adapter], folder=out.is_dir())
    existing = tmp_path / "merged.safetensors"
    existing.write_bytes(b"mine")
    with pytest.raises(DiffFitError, match="already exists") as refused:
        check_output(existing, overwrite=False, inputs=[adapter])
    assert "--overwrite" in refused.value.hint
    with pytest.raises(DiffFitError, match="not written by difffit"):  # --overwrite replaces difffit's files only
        check_output(existing, overwrite=True, inputs=[adapter])
    save_file({"w": torch.zeros(1)}, existing, metadata={"difffit.vae": "x"})  # a merged model difffit wrote
    assert check_output(existing, overwrite=True, inputs=[adapter]) == existing
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("keep me")
    with pytest.raises(DiffFitError, match="not written by difffit"):
        check_output(foreign, overwrite=True, folder=True)
    with pytest.raises(DiffFitError, match="existing file"):
        check_output(existing, overwrite=True, folder=True)
    write_marker(foreign, "merge")
    assert check_output(foreign, overwrite=True, folder=True) == foreign


def test_atomic_folder_swap_never_replaces_a_foreign_folder(tmp_path):
    target = tmp_path / "pipeline"
    target.mkdir()
    (target / "notes.txt").write_text("a user's file")
    with pytest.raises(DiffFitError, match="not written by difffit"), atomic_path(target) as tmp:
        tmp.mkdir()
    assert (target / "notes.txt").read_text() == "a user's file"
    assert [p.name for p in tmp_path.iterdir()] == ["pipeline"]  # no temporary left behind


def _write_pipeline(target, files: dict[str, str]) -> None:
    with atomic_path(target, kind="merge") as tmp:
        for name, text in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text)


def _tree(folder) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): p.read_text() for p in folder.rglob("*") if p.is_file() and p.name != MARKER
    }


def test_replacing_a_folder_difffit_wrote_keeps_the_files_a_user_added(tmp_path):
    target = tmp_path / "pipeline"
    _write_pipeline(target, {"model_index.json": "1", "transformer/weights": "1", "old-part/x": "1"})
    (target / "NOTES.md").write_text("my notes")
    (target / "my-extras").mkdir()
    (target / "my-extras" / "eval.json").write_text("{}")
    (target / "transformer" / "mine.txt").write_text("mine too")
    (target / "empty-mine").mkdir()
    _write_pipeline(target, {"model_index.json": "2", "transformer/weights": "2"})
    assert _tree(target) == {
        "model_index.json": "2",
        "transformer/weights": "2",
        "NOTES.md": "my notes",
        "my-extras/eval.json": "{}",
        "transformer/mine.txt": "mine too",
    }  # old-part/x: gone
    assert (target / "empty-mine").is_dir() and [p.name for p in tmp_path.iterdir()] == ["pipeline"]
    # A user's file where the new output writes one: refused, nothing changed.
    (target / "scheduler").mkdir()
    (target / "scheduler" / "config.json").write_text("hand-edited")
    before = _tree(target)
    with pytest.raises(DiffFitError, match="not written by difffit"):
        _write_pipeline(target, {"model_index.json": "3", "scheduler/config.json": "3"})
    assert _tree(target) == before and [p.name for p in tmp_path.iterdir()] == ["pipeline"]
    shutil.rmtree(target / "scheduler")
    (target / "extra").mkdir()
    (target / "extra" / "x").write_text("mine")  # in a folder where the new output writes a file
    before = _tree(target)
    with pytest.raises(DiffFitError, match="not written by difffit"):
        _write_pipeline(target, {"model_index.json": "3", "extra": "3"})
    assert _tree(target) == before and [p.name for p in tmp_path.iterdir()] == ["pipeline"]
    # A folder whose marker does not list what difffit wrote (an older version's): only a like-for-like
    # replacement; anything else might be a user's.
    write_marker(target, "merge")
    with pytest.raises(DiffFitError, match="may not be difffit's"):
        _write_pipeline(target, {"model_index.json": "4"})
    assert _tree(target) == before


def test_only_files_difffit_wrote_count_as_its_own(tmp_path):
    from difffit.engine.io import written_by_difffit

    np.savez(tmp_path / "stats.npz", mu=np.zeros(2), difffit_stats=np.array("{}"))
    np.savez(tmp_path / "other.npz", mu=np.zeros(2))
    save_file({"w": torch.zeros(1)}, tmp_path / "adapter.safetensors", metadata={"difffit": "{}"})
    save_file({"w": torch.zeros(1)}, tmp_path / "merged.safetensors", metadata={"difffit.vae": "x"})
    save_file({"w": torch.zeros(1)}, tmp_path / "someone.safetensors", metadata={"format": "pt"})
    (tmp_path / "report.html").write_text("<!DOCTYPE html><html><head><title>difffit report: run</title>")
    (tmp_path / "page.html").write_text("<!DOCTYPE html><html><head><title>my page</title>")
    Image.new("RGB", (4, 4)).save(tmp_path / "img05.png")
    (tmp_path / "short").write_bytes(b"\x05\x00")
    ours = {p.name for p in tmp_path.iterdir() if written_by_difffit(p)}
    assert ours == {"stats.npz", "adapter.safetensors", "merged.safetensors", "report.html"}


def test_fit_refuses_a_foreign_out_folder_and_the_data_folder(conf, tmp_path, toy_data):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "log.jsonl").write_text('{"not": "difffit"}\n')
    with pytest.raises(DiffFitError, match="did not write"):
        fit(conf(out=str(foreign)), progress=False)
    with pytest.raises(DiffFitError, match="an input is never an output"):
        fit(conf(out=str(toy_data)), progress=False)
    existing_file = tmp_path / "file"
    existing_file.write_text("x")
    with pytest.raises(DiffFitError, match="existing file"):
        fit(conf(out=str(existing_file)), progress=False)
    assert (foreign / "log.jsonl").read_text() == '{"not": "difffit"}\n'


def test_fit_inside_the_data_folder_never_reads_its_own_output(conf, tmp_path, toy_data):
    result = fit(conf(out=str(toy_data / "runs" / "data-difffit"), sample_every=2), progress=False)
    assert (result.out_dir / MARKER).is_file()
    assert list((result.out_dir / "samples").glob("*.png"))  # image files difffit wrote under the data folder
    folder = scan_image_folder(toy_data)
    assert folder.class_names == ["blue", "red"] and len(folder) == 12


def test_empty_class_folder_is_named(tmp_path, toy_data, capsys):
    (toy_data / "green").mkdir()
    folder = scan_image_folder(toy_data)
    assert folder.class_names == ["blue", "red"]
    assert "No images in green" in capsys.readouterr().err


# -- the run lock ---------------------------------------------------------------------------------------


def test_a_second_run_into_a_locked_folder_is_refused(conf, tmp_path):
    out = tmp_path / "run"
    with run_lock(out):
        with pytest.raises(DiffFitError, match=f"{out} is in use by another difffit run \\(pid {os.getpid()}"):
            fit(conf(), progress=False)
    assert not (out / "adapter.safetensors").exists()
    # The lock file stays behind, as after a killed run; it does not block the next run.
    assert (out / ".difffit.lock").exists()
    assert fit(conf(), progress=False).adapter.exists()


def test_a_killed_process_leaves_no_blocking_lock(conf, tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time; from pathlib import Path; from difffit.engine.io import run_lock\n"
                f"with run_lock(Path({str(out)!r})):\n    print('held', flush=True); time.sleep(600)"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DiffFitError, match=f"pid {holder.pid}"):
            fit(conf(), progress=False)
    finally:
        holder.kill()
        holder.wait()
    assert fit(conf(), progress=False).step == 4


# -- resume: refuse what would mix up classes or rewrite the record -------------------------------------


def test_resume_after_renaming_a_class_folder_is_refused(conf, toy_data):
    fit(conf(save_every=2), progress=False)
    shutil.move(toy_data / "red", toy_data / "crimson")
    with pytest.raises(DiffFitError, match=r"trained on \[blue, red\].*now has \[blue, crimson\]"):
        fit(conf(steps=8, resume=True), progress=False)


def test_resume_at_or_past_the_end_changes_nothing(conf, tmp_path):
    first = fit(conf(), progress=False)
    record = {name: (tmp_path / "run" / name).read_bytes() for name in ("config.toml", "adapter.safetensors")}
    again = fit(conf(resume=True, lr=0.01, seed=3), progress=False)
    assert again.step == again.start_step == first.step
    assert {name: (tmp_path / "run" / name).read_bytes() for name in record} == record
    with pytest.raises(DiffFitError, match="below the step of the newest checkpoint"):
        fit(conf(resume=True, steps=2), progress=False)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("adapter_dtype", "int8", "--adapter-dtype"),
        ("seed", -5, "--seed"),
        ("resolution", 0, "--resolution"),
        ("resolution", 100000, "largest supported"),
        ("lr", float("nan"), "--lr"),
        ("method", "lorax", "--method"),
    ],
)
def test_bad_options_fail_before_any_work(conf, tmp_path, option, value, message):
    with pytest.raises(DiffFitError, match=message):
        fit(conf(**{option: value}), progress=False)
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_a_class_whose_images_are_all_unreadable_is_dropped(conf, tmp_path, toy_data, capsys):
    val = shutil.copytree(toy_data, tmp_path / "val")
    common = dict(class_balance=True, val_data=str(val), val_every=2, steps=4)
    clean = fit(conf(out=str(tmp_path / "clean"), **common), progress=False)
    (toy_data / "green").mkdir()  # sorted between blue and red: red's label moves if green stays a class
    for i in range(3):
        (toy_data / "green" / f"{i}.png").write_text("not an image")
    capsys.readouterr()
    result = fit(conf(**common), progress=False)
    assert "No readable images in green; not used as class(es)." in " ".join(capsys.readouterr().err.split())
    assert result.classes == clean.classes == 2 and result.skipped == 3
    a, b = adapter_tensors(clean.adapter), adapter_tensors(result.adapter)
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)  # a 2-class table
    losses = [
        [json.loads(line).get("val_loss") for line in (run.out_dir / "log.jsonl").read_text().splitlines()]
        for run in (clean, result)
    ]
    assert losses[0] == losses[1] and any(losses[0])  # red's held-out images keep red's label


def test_a_full_disk_while_caching_latents_is_one_sentence(
    tmp_path, toy_data, tiny_base_file, tiny_vae_dir, monkeypatch, capsys
):
    import errno

    from conftest import run_cli

    from difffit.engine.data import cache_files, latents

    real_open = open

    class FullDisk:
        """A file on a disk that fills up after its first 200 bytes (the npy header fits)."""

        def __init__(self, handle):
            self.handle, self.written = handle, 0

        def write(self, data) -> int:
            if self.written + len(data) > 200:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.written += len(data)
            return self.handle.write(data)

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    def opening(path, mode="r", *args, **kwargs):
        handle = real_open(path, mode, *args, **kwargs)
        return FullDisk(handle) if "w" in mode else handle

    monkeypatch.setattr(latents, "open", opening, raising=False)  # the writes of latents.npy, at the OS boundary
    cache = tmp_path / "cache"
    args = [
        "fit",
        toy_data,
        "--base",
        tiny_base_file,
        "--vae",
        tiny_vae_dir,
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--num-workers",
        "0",
        "--cache-dir",
        cache,
        "--out",
        tmp_path / "run",
        "--sample-every",
        "0",
    ]
    code, out, err = run_cli(monkeypatch, capsys, *args)
    err = " ".join(err.split())
    assert code == 1 and "Traceback" not in err, err  # was: rc 135 (Bus error) and nothing on stderr
    assert f"The disk is full while writing {cache}" in err and "--cache-dir" in err
    assert [p.name for p in cache.iterdir()] == []  # the half-built cache is gone
    monkeypatch.undo()
    encoded = []
    monkeypatch.setattr(latents, "encode_distribution", lambda *a: encoded.append(1))
    monkeypatch.setattr(cache_files.shutil, "disk_usage", lambda path: SimpleNamespace(free=1000))
    code, _, err = run_cli(monkeypatch, capsys, *args)
    err = " ".join(err.split())
    assert code == 1 and encoded == [], err  # refused before any image is encoded
    assert f"The latent cache needs 0.00 GB and the disk of {cache} has 0.00 GB free." in err and "--cache-dir" in err
    assert [p.name for p in cache.iterdir()] == []


# -- the latent cache: checked when opened, rebuilt when damaged --------------------------------------------


def _cache(tmp_path, folder, vae_dir, calls):
    vae = load_vae(str(vae_dir))

    def get_vae():
        calls.append(1)
        return vae

    return latent_cache(folder, 16, str(vae_dir), get_vae, tmp_path / "cache", batch_size=4, progress=False)


def _damage_values(cache_path, value):
    """Overwrite latents in place: the same file size, as a stray write or a bad disk would."""
    rows = np.load(cache_path / "latents.npy", mmap_mode="r+")
    rows[0] = value
    rows.flush()


@pytest.mark.parametrize("damage", ["values", "nan", "truncate", "meta"])
def test_damaged_cache_is_named_and_rebuilt(tmp_path, toy_data, tiny_vae_dir, capsys, damage):
    folder = scan_image_folder(toy_data)
    calls = []
    first = _cache(tmp_path, folder, tiny_vae_dir, calls)
    clean = np.array(first.rows)
    if damage in ("values", "nan"):
        _damage_values(first.path, 0.5 if damage == "values" else np.nan)
    elif damage == "truncate":
        with open(first.path / "latents.npy", "r+b") as f:
            f.truncate(os.path.getsize(first.path / "latents.npy") // 2)
    else:
        (first.path / "meta.json").write_text("{ broken")
    again = _cache(tmp_path, folder, tiny_vae_dir, calls)
    assert again.built and len(calls) == 2 and again.path == first.path
    assert f"latent cache {first.path} is damaged" in capsys.readouterr().err.replace("\n", "")
    np.testing.assert_array_equal(np.array(again.rows), clean)
    assert not _cache(tmp_path, folder, tiny_vae_dir, calls).built  # intact now: reused


def test_stale_cache_builds_of_dead_processes_are_removed(tmp_path):
    root = tmp_path / "cache"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    # Build folders are named by atomic_path after the 32-hex cache key; --cache-dir may hold anything else.
    dead_build, alive_build, users = f".tmp-{'d' * 32}-x1", f".tmp-{'a' * 32}-x2", ".tmp-my-notes"
    for name, pid in ((dead_build, int(dead.stdout)), (alive_build, os.getpid()), (users, int(dead.stdout))):
        (root / name).mkdir(parents=True)
        (root / name / "owner.json").write_text(json.dumps({"host": os.uname().nodename, "pid": pid}))
    remove_stale_builds(root)
    assert sorted(p.name for p in root.iterdir()) == sorted([alive_build, users])


# -- signals and file modes ---------------------------------------------------------------------------------


def test_sigterm_saves_and_resume_is_bit_equal(conf, tmp_path, toy_data, tiny_base_file, tiny_vae_dir):
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
        "--out",
        str(tmp_path / "run"),
    ]
    run = _cli("fit", str(toy_data), *common, "--steps", "100000", "--save-every", "1000")
    _wait_for(tmp_path / "run" / "log.jsonl", run)
    run.send_signal(signal.SIGTERM)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 143 and "Traceback" not in stderr, stderr[-2000:]
    newest = max(int(p.name[5:]) for p in (tmp_path / "run" / "checkpoints").glob("step-*"))
    resumed = _cli("fit", str(toy_data), *common, "--steps", str(newest + 2), "--resume", "--json")
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr[-2000:]
    clean = fit(conf(steps=newest + 2, out=str(tmp_path / "clean")), progress=False)
    a, b = adapter_tensors(clean.adapter), adapter_tensors(tmp_path / "run" / "adapter.safetensors")
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_outputs_follow_the_umask(conf, tmp_path):
    result = fit(conf(save_every=2), progress=False)
    umask = os.umask(0)
    os.umask(umask)
    files = [result.adapter, *(result.out_dir / "checkpoints").rglob("*")]
    for path in files:
        want = (0o777 if path.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(path.stat().st_mode) == want, path
