"""The metrics file of a run: one JSON object per line, appended as training goes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .files import append_text, atomic_write

__all__ = ["MetricsLog", "read_metrics"]


class MetricsLog:
    """Appends records as JSON lines to ``path``; with ``path=None`` (ranks other than 0) writes nothing."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        append_text(self.path, json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drops records past ``step`` (written after the checkpoint a run resumes from)."""
        if self.path is None or not self.path.exists():
            return
        kept = [r for r in read_metrics(self.path) if r["step"] <= step]
        atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics file, in order.

    A last line cut off mid-write (no newline: the run was killed while appending) is
    dropped; any other line that is not a JSON object raises ``ValueError`` naming it.
    """
    text = Path(path).read_text()
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # the last line, without its newline
                break
            record = None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object per line, got {line[:60]!r}; the file is "
                             "corrupt")
        records.append(record)
    return records
