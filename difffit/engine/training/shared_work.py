"""Work of a fixed batching split over the processes of a run, with the one-process result.

Batch k of `count` items in batches of `batch_size` runs on process k mod P, and every process gets
every batch's result back in batch order. A batch holds the same items as it does on one process, so
its numbers are the same bit for bit, and a sum taken over the batches in order is too: validation and
in-training evaluation give the one-process numbers on any number of processes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from accelerate import Accelerator

T = TypeVar("T")


class SingleProcess:
    """What `map_batches` asks of an accelerator, for work outside a run: one process."""

    num_processes, process_index = 1, 0


def batches(count: int, batch_size: int) -> list[range]:
    """The items of `count` in batches of `batch_size`, the last one possibly short."""
    return [range(lo, min(lo + batch_size, count)) for lo in range(0, count, batch_size)]


def own_batches(count: int, batch_size: int, rank: int, world: int) -> list[range]:
    """This process's share: batch k of `batches(count, batch_size)` where k mod `world` is `rank`."""
    return batches(count, batch_size)[rank::world]


def map_batches(
    count: int, batch_size: int, work: Callable[[range], T], accelerator: Accelerator | SingleProcess
) -> list[T]:
    """[work(batch) for every batch], each computed on one process and returned to all, in batch order."""
    world = accelerator.num_processes
    mine = [work(batch) for batch in own_batches(count, batch_size, accelerator.process_index, world)]
    if world == 1:
        return mine
    from accelerate.utils import gather_object

    shares = gather_object([mine])  # one list per process, in rank order
    return [shares[k % world][k // world] for k in range(len(batches(count, batch_size)))]
