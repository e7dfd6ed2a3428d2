"""Devices and mixed-precision modes as the command line names them, checked in one place."""

from __future__ import annotations

import torch

from difffit_cli.engine.errors import DiffFitError

DEVICES = ("auto", "cpu", "cuda")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(spec: str = "auto") -> torch.device:
    """"auto" (CUDA when present), "cpu", "cuda" or "cuda:N" -> a device, or a one-sentence error."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise DiffFitError("--device cuda was asked for, but PyTorch sees no CUDA device.",
                           hint="Check `difffit env`, or use --device cpu.")
    try:
        return torch.device(spec)
    except RuntimeError:
        raise DiffFitError(f"Unknown device {spec!r}; use {', '.join(DEVICES)}.") from None


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of --mixed-precision no / bf16 / fp16 (None for no)."""
    if precision != "no" and precision not in AUTOCAST_DTYPES:
        raise DiffFitError(f"--mixed-precision must be no, fp16 or bf16 (got {precision!r}).")
    return AUTOCAST_DTYPES.get(precision)
