"""The metrics file of a run: one JSON object per line, appended as training goes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["MetricsLog", "read_metrics"]


class MetricsLog:
    """Appends records as JSON lines to ``path``; with ``path=None`` (ranks other than 0) writes nothing."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drops records past ``step`` (written after the checkpoint a run resumes from)."""
        if self.path is None or not self.path.exists():
            return
        kept = [r for r in read_metrics(self.path) if r["step"] <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics file, in order."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
