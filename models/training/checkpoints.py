"""Checkpoints of ``train.py`` runs: one dict holds everything a resumed run needs.

:func:`checkpoint_payload` gathers the model, optimizer, scheduler, scaler, step, the
configs, the loop's running sums, the RNG states of every rank (hence the process count)
and a fingerprint of the data; :func:`save_checkpoint` writes it atomically (a temporary
file, then ``os.replace``), so a crash never leaves a half-written file in place of a
good one; :func:`restore` puts it back, so ``N`` steps and ``N/2 + resume + N/2`` give
the same parameters.

The file is one header line, ``jacflow-checkpoint 2 sha256=<hex> bytes=<n>``, then the
``torch.save`` bytes of the dict; :func:`load_checkpoint` checks the length and the
SHA-256 before it unpickles anything, so a truncated file or a flipped byte is refused
with a one-line error naming the file, never loaded. (Read it by hand with
``torch.load(io.BytesIO(data[data.index(b"\\n") + 1:]))``.)
"""

from __future__ import annotations

import hashlib
import io
import random
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from .files import atomic_write
from .processes import Processes
from .state import TrainState

__all__ = [
    "CHECKPOINT_FORMAT", "checkpoint_payload", "save_checkpoint", "load_checkpoint", "check_compatible", "restore",
]

CHECKPOINT_FORMAT = 2
_HEADER = re.compile(rb"jacflow-checkpoint (\d+) sha256=([0-9a-f]{64}) bytes=(\d+)\n")
_ZIP_MAGIC = b"PK\x03\x04"  # format 1: a bare torch.save file, without a checksum


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
    sums = state.sums.cpu() if state.sums is not None else None
    loop = {"skipped": state.skipped, "sums": sums, "count": state.count}
    if state.monitors:
        loop["monitors"] = {m.name: m.state_dict() for m in state.monitors}
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
        "loop": loop,
        "rng": rng_by_rank,
        "world_size": procs.world_size,
        "data": state.data,
    }


def save_checkpoint(payload: dict[str, Any], path: str | Path, after: str = "") -> None:
    """Writes ``payload`` to ``path`` atomically, with its SHA-256 in a header line.

    A failure at any point leaves an existing ``path`` as it was (``RunFileError`` naming
    it, with ``after`` appended). A model with NaN or inf parameters is never written
    (``FloatingPointError``), so it cannot replace a good one.
    """
    path = Path(path)
    if not _all_finite(payload["model"].values()):
        raise FloatingPointError(f"refusing to write a checkpoint with NaN or inf parameters to {path}")
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    body = buffer.getvalue()
    header = f"jacflow-checkpoint {CHECKPOINT_FORMAT} sha256={hashlib.sha256(body).hexdigest()} bytes={len(body)}\n"
    atomic_write(path, header.encode() + body, after)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Loads a checkpoint dict (tensors on the CPU) written by :func:`save_checkpoint`, after checking it.

    Raises:
        FileNotFoundError: no such file.
        ValueError: naming the file, for an empty, truncated or altered file (its length or
            SHA-256 differs from its header's), or a file that is not a train.py checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint expected a file written by train.py, got {str(path)!r} (no such file)")
    data = path.read_bytes()
    if data.startswith(_ZIP_MAGIC):
        print(f"note: {path} is a format-1 checkpoint without a checksum; loading it unverified", file=sys.stderr)
        payload = _unpickle(data, path)
        if not isinstance(payload, dict) or payload.get("format") != 1:
            raise ValueError(f"checkpoint expected a train.py checkpoint, got {str(path)!r}, another torch file")
        return payload
    body = _verified_body(data, path)
    payload = _unpickle(body, path)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {str(path)!r}: expected a train.py checkpoint dict inside, got something else")
    return payload


def _verified_body(data: bytes, path: Path) -> bytes:
    """The ``torch.save`` bytes after the header, if their length and SHA-256 are the header's."""
    if not data:
        raise ValueError(f"checkpoint {str(path)!r} is empty (0 bytes): not a train.py checkpoint; it was cut off")
    end = data.find(b"\n", 0, 200)
    match = _HEADER.fullmatch(data[: end + 1]) if end >= 0 else None
    if match is None:
        raise ValueError(
            f"checkpoint {str(path)!r}: expected a train.py checkpoint (header 'jacflow-checkpoint {CHECKPOINT_FORMAT} "
            f"sha256=...'), got {len(data)} bytes without one; the file is corrupt or not a checkpoint"
        )
    version, digest, size = int(match[1]), match[2].decode(), int(match[3])
    if version != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {str(path)!r}: expected format {CHECKPOINT_FORMAT}, got format {version}")
    body = data[end + 1 :]
    if len(body) != size:
        raise ValueError(
            f"checkpoint {str(path)!r} is truncated or padded: its header says {size} bytes, the file holds "
            f"{len(body)}; it is corrupt, resume from another checkpoint"
        )
    if hashlib.sha256(body).hexdigest() != digest:
        raise ValueError(
            f"checkpoint {str(path)!r} is corrupt: its SHA-256 differs from the one written with it (a changed "
            "byte); it was not loaded, resume from another checkpoint"
        )
    return body


def _unpickle(data: bytes, path: Path) -> Any:
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many kinds for a damaged zip or pickle
        raise ValueError(f"checkpoint {str(path)!r} cannot be read ({type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else ''}); it is corrupt") from error


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
    saved = loop.get("monitors", {})
    for monitor in state.monitors:  # a monitor the checkpoint lacks starts afresh
        if monitor.name in saved:
            monitor.load_state_dict(saved[monitor.name])
    rng = payload["rng"]
    _set_rng_states(rng[procs.rank % len(rng)])
