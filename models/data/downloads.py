"""Files of downloadable data sets: fetched atomically and checked against their MD5."""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tempfile
import urllib.request
from pathlib import Path

__all__ = ["download", "check_md5", "md5", "missing_files_error"]


def missing_files_error(label: str, directory: Path, missing: list[str]) -> FileNotFoundError:
    """The error for files not in ``directory``, with the two ways to get them."""
    return FileNotFoundError(
        f"{label}: expected {', '.join(missing)} in {directory}, not found; pass "
        f"download=True (train.py --download) to fetch them, or copy them there by hand"
    )


def md5(path: Path) -> str:
    """The MD5 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.md5()  # the official checksums are MD5: integrity, not security
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_md5(path: Path, expected: str, label: str, source: str, hint: str) -> None:
    """Raises ``ValueError`` naming ``source`` and ``hint`` unless the file's MD5 is ``expected``."""
    found = md5(path)
    if found != expected:
        raise ValueError(f"{label}: expected MD5 {expected} for {source}, got {found}; {hint}")


def download(url: str, path: Path, expected_md5: str, label: str) -> None:
    """Downloads ``url`` to ``path`` through a temporary file, keeping it only if its
    MD5 matches, so ``path`` is never a partial or corrupt file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, scratch = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    scratch_path = Path(scratch)
    try:
        with os.fdopen(handle, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=60) as response:
                    shutil.copyfileobj(response, out)
            except (OSError, http.client.HTTPException) as error:  # URLError is an OSError
                raise FileNotFoundError(
                    f"{label}: could not download {url} ({error}); put {path.name} in "
                    f"{path.parent} by hand"
                ) from error
        hint = f"the download was discarded; try again, or put {path.name} in {path.parent} by hand"
        check_md5(scratch_path, expected_md5, label, url, hint)
        os.replace(scratch_path, path)
    finally:
        scratch_path.unlink(missing_ok=True)
