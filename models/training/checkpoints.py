"""Checkpoints of ``train.py`` runs: one dict holds everything a resumed run needs.

:func:`checkpoint_payload` gathers the model, optimizer, scheduler, scaler, step, the
configs, the loop's running sums and the RNG states of every rank; :func:`save_checkpoint`
writes it atomically (a temporary file, then ``os.replace``), so a crash never leaves a
half-written file in place of a good one; :func:`restore` puts it back, so ``N`` steps
and ``N/2 + resume + N/2`` give the same parameters.
"""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from .processes import Processes
from .state import TrainState

__all__ = [
    "CHECKPOINT_FORMAT", "checkpoint_payload", "save_checkpoint", "load_checkpoint", "check_compatible", "restore",
]

CHECKPOINT_FORMAT = 1


def _rng_states() -> dict[str, Any]:
    """The RNG states of torch (CPU and every CUDA device), numpy and Python."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "python": random.getstate(),
    }


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(states["python"])


def _all_finite(tensors: Iterator[Tensor]) -> bool:
    flags = [torch.isfinite(t).all() for t in tensors if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


def checkpoint_payload(state: TrainState, procs: Processes) -> dict[str, Any]:
    """The one checkpoint dict; called on every rank (the RNG states of all ranks are gathered)."""
    rng = _rng_states()
    if procs.distributed:
        gathered: list[Any] = [None] * procs.world_size
        dist.all_gather_object(gathered, rng)
        rng_by_rank = gathered
    else:
        rng_by_rank = [rng]
    model = state.model
    return {
        "format": CHECKPOINT_FORMAT,
        "step": state.step,
        "model": model.state_dict(),
        "model_name": getattr(model, "name", type(model).__name__),
        "model_config": getattr(model, "config", {}),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "scaler": state.scaler.state_dict(),
        "config": state.config,
        "loop": {"skipped": state.skipped, "sums": state.sums.cpu() if state.sums is not None else None,
                 "count": state.count},
        "rng": rng_by_rank,
    }


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> None:
    """Writes ``payload`` to ``path`` atomically: a temporary file in the same directory, then ``os.replace``.

    A failure at any point leaves an existing ``path`` as it was. A model with NaN or inf
    parameters is never written (``FloatingPointError``), so it cannot replace a good one.
    """
    path = Path(path)
    if not _all_finite(payload["model"].values()):
        raise FloatingPointError(f"refusing to write a checkpoint with NaN or inf parameters to {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would make the checkpoint private
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Loads a checkpoint dict (tensors on the CPU) written by :func:`save_checkpoint`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint expected a file written by train.py, got {str(path)!r} (no such file)")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint expected a train.py checkpoint (format {CHECKPOINT_FORMAT}), got {str(path)!r}")
    return payload


def check_compatible(payload: dict[str, Any], model: nn.Module, path: str | Path) -> None:
    """Raises ``ValueError`` if the checkpoint holds another model (name or constructor config)."""
    name = getattr(model, "name", type(model).__name__)
    config = getattr(model, "config", {})
    if payload["model_name"] == name and payload["model_config"] == config:
        return
    keys = sorted(set(config) | set(payload["model_config"]))
    theirs = {k: payload["model_config"].get(k) for k in keys if payload["model_config"].get(k) != config.get(k)}
    ours = {k: config.get(k) for k in theirs}
    raise ValueError(
        f"resume expected a checkpoint of the model being built ({name} with {ours}), got "
        f"{payload['model_name']} with {theirs} in {str(path)!r}; pass the same --model and --preset "
        "as the run that wrote it (or leave them out)"
    )


def restore(state: TrainState, payload: dict[str, Any], procs: Processes) -> None:
    """Loads a checkpoint into ``state``: weights, optimizer, schedule, scaler, loop and RNG states."""
    state.model.load_state_dict(payload["model"])
    state.optimizer.load_state_dict(payload["optimizer"])
    state.scheduler.load_state_dict(payload["scheduler"])
    if payload["scaler"] and state.scaler.is_enabled():
        state.scaler.load_state_dict(payload["scaler"])
    state.step = payload["step"]
    loop = payload["loop"]
    state.skipped, state.count = loop["skipped"], loop["count"]
    device = next(state.model.parameters()).device
    state.sums = None if loop["sums"] is None else loop["sums"].to(device)
    rng = payload["rng"]
    _set_rng_states(rng[procs.rank % len(rng)])
