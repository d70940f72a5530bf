"""Writing the files of a run: atomic replacement, appends, and one-line errors that name the file.

Every write of the training kit goes through :func:`atomic_write` (checkpoints,
``config.json``) or :func:`append_text` (``metrics.jsonl``), or sits inside
:func:`writing` (pictures, the run folder), so a read-only folder or a full disk comes
out as a :class:`RunFileError` naming the file, what went wrong and what to do.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["RunFileError", "writing", "atomic_write", "append_text"]

_HINTS = {
    errno.ENOSPC: "the disk is full; free some space",
    errno.EDQUOT: "the disk quota is used up; free some space",
    errno.EACCES: "the folder is not writable; choose another --out or fix its permissions",
    errno.EPERM: "the folder is not writable; choose another --out or fix its permissions",
    errno.EROFS: "the file system is read-only; choose another --out",
}


class RunFileError(OSError):
    """A file of a run could not be written; ``str()`` is the whole one-line message, ``errno`` the cause's."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.errno = code

    def __str__(self) -> str:
        return self.args[0]


@contextlib.contextmanager
def writing(path: str | Path, after: str = "") -> Iterator[None]:
    """Turns an ``OSError`` inside the block into a :class:`RunFileError` naming ``path``.

    ``after`` is appended to the message (e.g. where the last good checkpoint is).

    Example:
        >>> with writing("/no/such/folder/config.json"):
        ...     open("/no/such/folder/config.json", "w")
        Traceback (most recent call last):
        ...
        models.training.files.RunFileError: cannot write /no/such/folder/config.json: No such file or directory
    """
    try:
        yield
    except RunFileError:
        raise
    except OSError as error:
        reason = error.strerror or str(error) or type(error).__name__
        hint = _HINTS.get(error.errno)
        text = f"cannot write {path}: {reason}" + (f" ({hint})" if hint else "") + (f". {after}" if after else "")
        raise RunFileError(text, error.errno) from error


def _write(stream: BinaryIO, data: bytes) -> None:
    """The one low-level write (tests replace it to simulate a full disk)."""
    stream.write(data)


def atomic_write(path: str | Path, data: bytes, after: str = "") -> None:
    """Writes ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``.

    A failure at any point (a full disk, a read-only folder) leaves an existing ``path`` as
    it was and no temporary file behind; it raises :class:`RunFileError` naming ``path``.
    """
    path = Path(path)
    with writing(path, after):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would make the file private
            with os.fdopen(fd, "wb") as stream:
                _write(stream, data)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


def append_text(path: str | Path, text: str) -> None:
    """Appends ``text`` to ``path`` (created if missing); raises :class:`RunFileError` naming it."""
    with writing(path), open(path, "ab") as stream:
        _write(stream, text.encode())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
