"""Processes under torchrun: who this process is, and the one way rank 0's decisions
reach the others.

Whatever a process decides by looking at the filesystem or at data (which checkpoint to
resume, whether a cached file exists, whether the shards verify, whether a row is bad) is
decided by rank 0 alone and broadcast: on a shared filesystem each rank's own look could
differ, and a rank that fails alone leaves the others waiting in a collective. Torch-light
on purpose (no model imports), so every module can use it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def world_and_rank() -> tuple[int, int]:
    """(processes, this process's rank) from torchrun's environment; (1, 0) without it."""
    return int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def from_rank0(compute: Callable[[], T]) -> T:
    """Rank 0's `compute()`, on every rank (one decision: on a shared filesystem each
    rank's own look could differ); the other ranks do not call it."""
    if not is_distributed():
        return compute()
    box = [compute() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agree(problem: Callable[[], str | None]) -> None:
    """Raise rank 0's `problem()` on every rank, so that no rank fails alone while the
    others wait in a collective; the other ranks do not call it.

    Raises:
        ValueError: the problem, when there is one.
    """
    found = from_rank0(problem)
    if found is not None:
        raise ValueError(found)


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """Under torchrun, the process group for the block (gloo on CPU, NCCL on CUDA), joined
    on entry and left on exit; nothing in one process or when a group is already joined
    (by the caller, who then leaves it)."""
    if world_and_rank()[0] == 1 or dist.is_initialized():
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()
