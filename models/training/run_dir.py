"""The folder of a run: one run writes there at a time, and a run never mixes with another's files.

:func:`claim_run_dir` holds an exclusive ``flock`` on ``<out>/.lock`` for the whole run
(a second run on the same folder fails at once, naming the holder's pid) and refuses a
folder that holds another run: a fresh run needs a folder without a checkpoint, a run
resumed into a folder other than its checkpoint's needs one without run files, unless
``--overwrite`` (which deletes them first). :func:`start_run_files` then starts the
metrics log (continued from the checkpoint's step) and writes ``config.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch.distributed as dist

from .files import RunFileError, atomic_write, writing
from .metrics_log import MetricsLog, read_metrics
from .processes import Processes
from .state import RunDir

try:
    import fcntl
except ImportError:  # not a POSIX system: runs are not locked
    fcntl = None

__all__ = ["RunLock", "claim_run_dir", "start_run_files"]


class RunLock:
    """An exclusive, non-blocking ``flock`` on a file that then holds this process's pid."""

    def __init__(self, path: Path) -> None:
        self.path, self.fd = path, None

    def acquire(self) -> None:
        """Takes the lock, or raises :class:`~models.training.files.RunFileError` naming the folder and holder."""
        with writing(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise RunFileError(
                    f"--out {self.path.parent} is in use by another train.py run (pid {holder}, holding "
                    f"{self.path}); two runs in one folder would mix their files: wait for it to end, or "
                    "choose another --out"
                ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            if fcntl is not None:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


@contextlib.contextmanager
def claim_run_dir(run: RunDir, procs: Processes, source: Path | None = None,
                  overwrite: bool = False) -> Iterator[None]:
    """Holds ``run``'s lock (rank 0) for the block, after checking the folder may be written.

    ``source`` is the folder of the checkpoint a resumed run continues (``None``: a fresh
    run). Every rank raises if rank 0 could not claim the folder, so none waits for it.
    """
    lock = RunLock(run.lock)
    failure: Exception | None = None
    if procs.is_main:
        try:
            lock.acquire()
            _check_and_clear(run, source, overwrite)
        except (OSError, ValueError) as error:
            lock.release()
            failure = error
    if procs.distributed:
        shared = [None if failure is None else str(failure)]
        dist.broadcast_object_list(shared, src=0)
        if shared[0] is not None and failure is None:
            failure = RunFileError(f"rank 0 could not claim the run folder: {shared[0]}")
    if failure is not None:
        raise failure
    try:
        yield
    finally:
        lock.release()


def _check_and_clear(run: RunDir, source: Path | None, overwrite: bool) -> None:
    """Raises ``FileExistsError`` if ``run`` holds another run (and no ``overwrite``); with it, deletes its files."""
    if source is not None and run.root.resolve() == source.resolve():
        return  # a run continues in its own folder
    if source is None and run.checkpoint.exists() and not overwrite:
        raise FileExistsError(
            f"--out expected a directory without a checkpoint, got {str(run.root)!r} holding one; pass "
            f"--resume {run.checkpoint} to continue it, --overwrite to start afresh, or another --out"
        )
    files = run.run_files()
    if source is not None and files and not overwrite:
        raise FileExistsError(
            f"--out expected a new or empty folder for a run resumed from {source}, got {str(run.root)!r} holding "
            f"another run's files ({', '.join(p.name for p in files)}); leave out --out to continue in {source}, "
            "pass --overwrite to replace them, or choose another --out"
        )
    if overwrite:
        for path in files:
            with writing(path):
                path.unlink()


def start_run_files(run: RunDir, config: dict[str, Any], source: Path | None, step: int) -> MetricsLog:
    """Starts the metrics log and writes ``config.json`` (rank 0); returns the log.

    A fresh run starts an empty log; a resumed run keeps the records up to its checkpoint's
    ``step`` (copied from ``source`` when it continues in another folder).
    """
    log = MetricsLog(run.metrics)
    if source is None:
        with writing(run.metrics):
            run.metrics.unlink(missing_ok=True)
    elif run.root.resolve() == source.resolve():
        log.truncate_after(step)
    elif (source / run.metrics.name).exists():
        kept = [r for r in read_metrics(source / run.metrics.name) if r["step"] <= step]
        atomic_write(run.metrics, "".join(json.dumps(r) + "\n" for r in kept).encode())
    atomic_write(run.config, (json.dumps(config, indent=2) + "\n").encode())
    return log
