"""Tests of models/training/files.py: a full disk or a read-only folder is a one-line error naming the
file, and an atomic write never leaves a half-written file or a temporary one behind."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from models.training import files


def full_disk(stream, data: bytes) -> None:
    stream.write(data[: len(data) // 2])
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_atomic_write_on_a_full_disk_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "config.json"
    files.atomic_write(path, b"old")
    monkeypatch.setattr(files, "_write", full_disk)
    with pytest.raises(files.RunFileError, match=r"^cannot write .*config.json: No space left on device \(the disk is "
                                                 r"full; free some space\)\. after$") as info:
        files.atomic_write(path, b"new contents", after="after")
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["config.json"]


def test_append_text_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files.append_text(tmp_path / "m.jsonl", "a\n")
    files.append_text(tmp_path / "m.jsonl", "b\n")
    assert (tmp_path / "m.jsonl").read_text() == "a\nb\n"
    monkeypatch.setattr(files, "_write", full_disk)
    with pytest.raises(files.RunFileError, match=r"cannot write .*m.jsonl: No space left on device"):
        files.append_text(tmp_path / "m.jsonl", "c\n")


def test_writing_explains_a_read_only_folder(tmp_path: Path) -> None:
    with pytest.raises(files.RunFileError, match=r"cannot write .*x.png: Permission denied \(the folder is not "
                                                 r"writable; choose another --out"):
        with files.writing(tmp_path / "x.png"):
            raise PermissionError(errno.EACCES, "Permission denied")
    with pytest.raises(files.RunFileError, match=r"read-only file system|Read-only file system"):
        with files.writing(tmp_path / "x.png"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
