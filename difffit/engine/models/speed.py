"""Speed switches for CUDA that leave the numbers alone: regional compile, fixed batch shapes,
the attention backend chosen by measurement, and the fused optimizer.

Regional compile: each DiT block is compiled on its own (`nn.Module.compile`, so parameter names
and state dicts are unchanged). All blocks share one graph, so a DiT-XL/2 compiles one block's
forward and backward instead of 28, and gradient checkpointing still works block by block.
Shapes are fixed (`dynamic=False`): the training loop keeps its per-process batch fixed, and
sampling pads its last batch (`padded_batch`) so no batch size is ever compiled twice.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from difffit.engine.errors import DiffFitError

COMPILE_CHOICES = ("auto", "on", "off")
HEAD_DIM_DIT = 72  # DiT-XL/2: 1152 / 16


def resolve_compile(choice: str | bool, device: torch.device | str) -> bool:
    """--compile auto|on|off -> whether to compile: auto is on for CUDA and off on the CPU (where
    compiling takes longer than short runs save). A bool passes through (older configs)."""
    if isinstance(choice, bool):
        return choice
    if choice not in COMPILE_CHOICES:
        raise DiffFitError(f"Unknown --compile {choice!r}; choose one of {', '.join(COMPILE_CHOICES)}.")
    if choice == "auto":
        return torch.device(device).type == "cuda"
    return choice == "on"


def compile_blocks(
    model: nn.Module, mode: str | None = None, blocks: str = "blocks", dynamic: bool | None = False
) -> int:
    """torch.compile each module of `model.<blocks>` in place, with fixed shapes; returns how many.

    `mode`: torch.compile's mode (None = default; "max-autotune-no-cudagraphs" searches matmul
    kernels at a longer cold start). `blocks` names the ModuleList (diffusers' DiT: "transformer_blocks").
    `dynamic`: torch.compile's (None: a static graph first, a dynamic one once a second shape comes).
    """
    modules = getattr(model, blocks)
    for block in modules:
        block.compile(dynamic=dynamic, mode=mode)
    return len(modules)


def padded_batch(indices: Sequence[int], size: int) -> tuple[list[int], int]:
    """A last, short sampling batch padded to `size` by repeating its last index -> (indices, real count).

    Every sample draws from its own generator, so the padding rows change no real image; the caller
    keeps the first `real count` outputs. Fixed batch shapes mean one compiled graph for the whole run.
    """
    indices = [int(i) for i in indices]
    if not indices or len(indices) >= size:
        return indices, len(indices)
    return indices + [indices[-1]] * (size - len(indices)), len(indices)


def make_optimizer(params: Iterable[torch.Tensor], lr: float, device: torch.device | str) -> torch.optim.AdamW:
    """AdamW without weight decay (the DiT recipe); fused into one kernel per step on CUDA."""
    fused = torch.device(device).type == "cuda"
    return torch.optim.AdamW(list(params), lr=lr, weight_decay=0.0, fused=fused or None)


# -- attention ---------------------------------------------------------------------------------------


def time_attention_backends(
    device: torch.device | str,
    *,
    batch: int = 32,
    heads: int = 16,
    tokens: int = 256,
    head_dim: int = HEAD_DIM_DIT,
    dtype: torch.dtype = torch.bfloat16,
    repeats: int = 10,
) -> dict[str, float]:
    """Seconds of SDPA forward + backward per backend ("flash", "cudnn") that runs this shape on this
    CUDA device; empty on the CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return {}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (
        torch.randn(batch, heads, tokens, head_dim, device=device, dtype=dtype, requires_grad=True) for _ in range(3)
    )
    timings = {}
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel([backend]):
                for i in range(repeats + 2):
                    if i == 2:  # two warm-up rounds: kernel selection, cuDNN plan building
                        torch.cuda.synchronize(device)
                        start = time.perf_counter()
                    torch.nn.functional.scaled_dot_product_attention(q, k, v).sum().backward()
                torch.cuda.synchronize(device)
            timings[name] = (time.perf_counter() - start) / repeats
        except RuntimeError:  # this backend does not run this shape / dtype on this GPU
            continue
    return timings


def choose_attention_backend(device: torch.device | str, **shape) -> str | None:
    """The faster of flash and cuDNN SDPA for this shape (`time_attention_backends`' keywords) by
    measurement; None on the CPU or when neither runs (then SDPA's own choice stands)."""
    timings = time_attention_backends(device, **shape)
    return min(timings, key=timings.get) if timings else None


def attention_backend(name: str | None) -> contextlib.AbstractContextManager:
    """A context in which SDPA uses backend `name` ("flash", "cudnn"); a no-op for None."""
    if name is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }
    return sdpa_kernel([backends[name]])
