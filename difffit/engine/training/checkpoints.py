"""The run folder and its checkpoints: written atomically, read back for an exact resume.

A checkpoint is a folder `checkpoints/step-NNNNNNN/` holding the trained tensors and their EMA
(`trained.safetensors`), the optimizer state (`optimizer.pt`) and `state.json` (step, elapsed time,
method, seed, class names). It is built under a `.tmp-` name and renamed into place, so a folder
with the real name is always complete. The run folder itself is difffit's (its marker), checked
before a run writes into it.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from difffit.engine.errors import DiffFitError
from difffit.engine.io import LOCK, atomic_path, has_marker, write_marker
from difffit.engine.progress import say
from difffit.engine.training.config import FitConfig, FitResult

CHECKPOINT = re.compile(r"^step-(\d{7})$")


def list_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (a half-written one only ever exists under a .tmp- name)."""
    root = out_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT.match(p.name))]
    return sorted(c for c in found if (c[1] / "state.json").exists())


def save_checkpoint(
    out_dir: Path,
    step: int,
    params: dict[str, torch.Tensor],
    ema: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    state: dict,
    keep: int,
) -> Path:
    """Write checkpoint `step`, then drop all but the newest `keep` (only checkpoint folders are removed)."""
    path = out_dir / "checkpoints" / f"step-{step:07d}"
    tensors = {name: p.detach().float().cpu().contiguous() for name, p in params.items()}
    tensors.update({f"ema.{name}": e.detach().float().cpu().contiguous() for name, e in ema.items()})
    with atomic_path(path) as tmp:
        tmp.mkdir()
        save_file(tensors, str(tmp / "trained.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=1))
    for _, old in list_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def read_state(path: Path) -> dict:
    """A checkpoint's state.json; ValueError when it is not a JSON object (a file cut short, say)."""
    state = json.loads((path / "state.json").read_text())
    if not isinstance(state, dict):
        raise ValueError("state.json does not hold a JSON object")
    return state


def load_checkpoint(
    path: Path,
    params: dict[str, torch.nn.Parameter],
    ema: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    check: Callable[[dict], None] | None = None,
) -> dict:
    """Restore trained tensors, EMA and optimizer from `path`; returns its state.json. `check` sees the
    state first and raises a DiffFitError when the checkpoint does not fit this run."""
    state = read_state(path)
    if check is not None:
        check(state)
    tensors = load_file(str(path / "trained.safetensors"))
    expected = set(params) | {f"ema.{n}" for n in ema}
    if set(tensors) != expected or any(tensors[n].shape != p.shape for n, p in params.items()):
        raise DiffFitError(
            f"The checkpoint {path} was made for a different model or method than this run.",
            hint="Resume with the same --base, --method, --gamma-blocks and data, or choose a new --out.",
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])
        for name, e in ema.items():
            e.copy_(tensors[f"ema.{name}"])
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    return state


def restore_newest(
    checkpoints: list[tuple[int, Path]],
    params: dict[str, torch.nn.Parameter],
    ema: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    check: Callable[[dict], None] | None = None,
) -> tuple[int, dict]:
    """Load the newest readable checkpoint: (its step, its state.json); (0, {}) when there is none.

    A damaged checkpoint (a crash while the disk filled, say: its tensors or its state.json) falls back
    to the one before it; one that belongs to another model, method or class list is an error, not a fallback.
    """
    for step, path in reversed(checkpoints):
        try:
            return step, load_checkpoint(path, params, ema, optimizer, check)
        except DiffFitError:
            raise
        except Exception as exc:
            say((f"Checkpoint {path} is unreadable ({exc}); trying an older one.", "yellow"))
    return 0, {}


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines after `step` (written after the checkpoint a resumed run starts from).

    Lines that are not difffit records (no integer "step") are kept as they are.
    """
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        record = None
        with contextlib.suppress(json.JSONDecodeError):
            record = json.loads(line)
        step_of = record.get("step") if isinstance(record, dict) else None
        if not isinstance(step_of, int) or step_of <= step:
            kept.append(line)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(f"{line}\n" for line in kept))


# -- the run folder --------------------------------------------------------------------------------


def check_run_folder(out_dir: Path, data: str) -> None:
    """--out must be a new or empty folder, or one of difffit's runs; never the data or a file."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DiffFitError(f"--out {out_dir} is an existing file; a run needs a folder.", hint="Choose a new --out.")
    data_dir = Path(data).expanduser().resolve()
    if out_dir.resolve() == data_dir or out_dir.resolve() in data_dir.parents:
        raise DiffFitError(
            f"--out {out_dir} holds the training data {data}; an input is never an output.",
            hint="Choose another --out.",
        )
    legacy_run = (out_dir / "config.toml").is_file() and (out_dir / "checkpoints").is_dir()  # difffit 0.1
    foreign = out_dir.is_dir() and any(p.name != LOCK for p in out_dir.iterdir())  # a lock alone: a run starting
    if foreign and not (has_marker(out_dir) or legacy_run):
        raise DiffFitError(
            f"--out {out_dir} already holds files that difffit did not write.",
            hint="Choose a new or empty folder for the run.",
        )


def claim_run_folder(out_dir: Path) -> None:
    """Mark the (locked) run folder as difffit's; remove half-written files of killed runs in it."""
    write_marker(out_dir, "run")
    for folder in (out_dir, out_dir / "checkpoints", out_dir / "samples"):
        for leftover in folder.glob(".tmp-*") if folder.is_dir() else ():
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()


def nothing_to_resume(config: FitConfig, out_dir: Path, checkpoints: list[tuple[int, Path]]) -> FitResult | None:
    """Refuse a fresh run over checkpoints; for a resume already at --steps, the result without any work."""
    if not checkpoints:
        return None
    if not config.resume:
        raise DiffFitError(
            f"{out_dir} already holds checkpoints of an earlier run.",
            hint="Add --resume to continue it, or choose another --out.",
        )
    last, path = checkpoints[-1]
    if config.steps < last:
        raise DiffFitError(
            f"--steps {config.steps} is below the step of the newest checkpoint ({last}) in {out_dir}.",
            hint=f"--steps counts the whole run: give {last} or more.",
        )
    if config.steps > last:
        return None
    say(f"{out_dir} is already at step {last} of {config.steps}; nothing to do.")
    try:
        state = read_state(path)
    except (OSError, ValueError):  # the counts below are only for the report
        state = {}
    adapter = out_dir / "adapter.safetensors"
    return FitResult(
        out_dir=out_dir,
        adapter=adapter if adapter.exists() else None,
        step=last,
        start_step=last,
        steps=config.steps,
        loss=None,
        images=state.get("images", 0),
        classes=len(state.get("class_names", [])),
        skipped=0,
        trainable_params=0,
        elapsed_s=0.0,
        img_per_s=None,
        interrupted=False,
        cache=None,
    )
