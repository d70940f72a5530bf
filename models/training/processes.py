"""Where a process stands in a run: its rank, its device, and the process group under torchrun.

One process per device under ``torchrun``: :func:`setup_processes` joins the process
group when ``WORLD_SIZE > 1``; only rank 0 (:attr:`Processes.is_main`) writes files or
shows a progress bar.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Processes", "resolve_device", "setup_processes", "teardown_processes", "all_reduce"]


@dataclass(frozen=True)
class Processes:
    """Where this process stands in a job of ``world_size`` processes (1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def report(self, text: str) -> None:
        """User-facing output: printed by rank 0 only."""
        if self.is_main:
            print(text, flush=True)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``"auto"`` -> CUDA when available else CPU; ``"cuda"`` -> this process's GPU."""
    if name not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device expected 'auto', 'cpu' or 'cuda', got {name!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device expected a CUDA GPU for 'cuda', got none available; use --device cpu")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def setup_processes(device_name: str) -> tuple[Processes, torch.device]:
    """Reads torchrun's environment, picks the device and joins the process group if ``WORLD_SIZE > 1``.

    The backend is NCCL on CUDA and Gloo on CPU.
    """
    procs = Processes(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )
    device = resolve_device(device_name, procs.local_rank)
    if procs.distributed and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return procs, device


def teardown_processes(wait: bool = True) -> None:
    """Leaves the process group, if this process joined one.

    With ``wait`` (a normal exit) all ranks wait for each other first: rank 0 may still
    be writing pictures, and a Gloo group destroyed on one rank while a peer is busy can
    abort that process. After an error a rank leaves at once, so it cannot hang. Objects
    that still hold the group (DDP's reducer sits in reference cycles) are collected
    first, so none is torn down after the group, at interpreter exit.
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce(t: Tensor, procs: Processes, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> Tensor:
    """``t`` reduced over all processes (in place), or ``t`` itself in a single process."""
    if procs.distributed:
        dist.all_reduce(t, op=op)
    return t
