"""Devices and mixed-precision modes as the command line names them, checked in one place; the accelerator."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from difffit.engine.errors import DiffFitError

if TYPE_CHECKING:
    from accelerate import Accelerator

DEVICES = ("auto", "cpu", "cuda")
# fp8 runs the frozen block Linears in float8 (engine.models.fp8) and everything else under bf16 autocast.
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}


def resolve_device(spec: str = "auto") -> torch.device:
    """The device `spec` names: "auto" (CUDA when present), "cpu", "cuda" or "cuda:N"; else a one-sentence error."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise DiffFitError(
            "--device cuda was asked for, but PyTorch sees no CUDA device.",
            hint="Check `difffit env`, or use --device cpu.",
        )
    try:
        return torch.device(spec)
    except RuntimeError:
        raise DiffFitError(f"Unknown device {spec!r}; use {', '.join(DEVICES)}.") from None


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of sampling's --mixed-precision no / bf16 / fp16 (None for no); fp8 is fit's only."""
    if precision not in ("no", "bf16", "fp16"):
        raise DiffFitError(f"--mixed-precision must be no, fp16 or bf16 (got {precision!r}).")
    return AUTOCAST_DTYPES.get(precision)


@contextlib.contextmanager
def tf32_matmuls(enabled: bool) -> Iterator[None]:
    """TF32 matmuls for the run (about 2x faster fp32 parts on Ampere+, far below the training noise),
    restored afterwards so the caller's process keeps its own settings."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if enabled:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def make_accelerator(
    device: str, mixed_precision: str, log_with: str | None, project_dir: Path
) -> tuple[Accelerator, str]:
    """(accelerate's Accelerator for the process group and trackers, the precision "auto" resolves to); mixed
    precision is ours (autocast + scaler), so that fits with different precisions can run one after another in
    one Python process."""
    from accelerate import Accelerator

    cuda = resolve_device(device).type == "cuda"
    precision = mixed_precision
    if precision == "auto":
        precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else ("fp16" if cuda else "no")
    if precision == "fp16" and not cuda:
        raise DiffFitError("--mixed-precision fp16 needs a CUDA GPU; use bf16 or no on the CPU.")
    if precision == "fp8":
        require_fp8(resolve_device(device))
    accelerator = Accelerator(mixed_precision="no", cpu=not cuda, log_with=log_with, project_dir=str(project_dir))
    return accelerator, precision


@contextlib.contextmanager
def one_builder_first(accelerator: Accelerator) -> Iterator[None]:
    """Run the body on process 0 first (it builds a cache), then on the first process of each other machine
    (which opens it, or builds its own where it cannot see process 0's disk), then on every other process
    (which open their machine's): a cache is built once, and never twice on one machine."""
    with accelerator.main_process_first(), accelerator.local_main_process_first():
        yield


def fp8_support(device: torch.device | str) -> str | None:
    """None when `device` runs fp8 matmuls on tensor cores; otherwise the reason, in one sentence."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"--mixed-precision fp8 needs an NVIDIA GPU with FP8 tensor cores; this run is on {device.type}."
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        name = torch.cuda.get_device_name(device)
        return (
            f"--mixed-precision fp8 needs FP8 tensor cores (compute capability 8.9 or newer: L4, L40, "
            f"H100, H200, B200); {name} has {major}.{minor}."
        )
    return None


def require_fp8(device: torch.device | str) -> None:
    """Raise the one-sentence DiffFitError of `fp8_support` when `device` has no FP8 tensor cores."""
    reason = fp8_support(device)
    if reason is not None:
        raise DiffFitError(reason, hint="Use --mixed-precision bf16 (the default on CUDA).")
