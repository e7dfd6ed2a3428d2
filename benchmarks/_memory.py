"""Peak memory of a stretch of work, on any device: CUDA's own allocator statistics on a GPU; elsewhere
the bytes of live tensor storages, counted op by op (what `torch.cuda.max_memory_allocated` counts on a
GPU, less the allocator's rounding and the kernels' hidden workspaces).

The count also runs under `FakeTensorMode`, where tensors have shapes and no data: that gives the
memory of a real 12B configuration on a CPU without allocating it, an estimate to check against a GPU.
Why not torch's `MemTracker` (torch.distributed._tools): it hooks every parameter's gradient and fails
on frozen ones, which is what DiffFit's models are made of.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class TensorBytes(TorchDispatchMode):
    """Inside it, every tensor an op returns is counted until its storage is freed; `peak` is the most
    bytes alive at once, counting `resident` (tensors made before: weights, optimizer state) from the start."""

    def __init__(self, resident: Iterable[torch.Tensor] = ()):
        super().__init__()
        self._alive: dict[int, weakref.ref] = {}
        self.current = self.peak = 0
        for tensor in resident:
            self._count(tensor)
        self.resident = self.current

    def _count(self, tensor: object) -> None:
        if not isinstance(tensor, torch.Tensor):
            return
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._alive:  # a view or an in-place result: its storage is counted already
            return
        size = storage.nbytes()
        self.current += size
        self.peak = max(self.peak, self.current)
        self._alive[key] = weakref.ref(storage, lambda _, key=key, size=size: self._free(key, size))

    def _free(self, key: int, size: int) -> None:
        self.current -= size
        self._alive.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            self._count(tensor)
        return out


class PeakMemory:
    """`with PeakMemory(device, resident): work()` -> `.resident` and `.peak` bytes (and `.reserved` on CUDA:
    the allocator's peak of memory held from the device, what a card's size limits)."""

    def __init__(self, device: torch.device, resident: Iterable[torch.Tensor]):
        self.device, self.reserved = device, None
        self._count = None if device.type == "cuda" else TensorBytes(resident)

    def __enter__(self) -> PeakMemory:
        if self._count is not None:
            self.resident = self._count.resident
            self._count.__enter__()
        else:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.resident = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc) -> None:
        if self._count is not None:
            self._count.__exit__(*exc)
            self.peak = self._count.peak
        else:
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
            self.reserved = torch.cuda.max_memory_reserved(self.device)
