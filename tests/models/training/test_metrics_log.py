"""Tests of models/training/metrics_log.py: JSON lines appended, read back in order, truncated on resume."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.training import MetricsLog, read_metrics


def test_records_come_back_in_order_and_truncate_after_a_step(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in (2, 4, 6):
        log.write({"split": "train", "step": step, "loss": step / 10})
    assert [r["step"] for r in read_metrics(log.path)] == [2, 4, 6]
    log.truncate_after(4)
    assert read_metrics(log.path) == [{"split": "train", "step": 2, "loss": 0.2}, {"split": "train", "step": 4, "loss": 0.4}]


def test_a_log_without_a_path_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A stray write would land in the working directory (a relative default path such as
    # "metrics.jsonl" or "None"), so the test runs there and looks there.
    monkeypatch.chdir(tmp_path)
    log = MetricsLog(None)  # ranks other than 0
    log.write({"step": 1})
    log.truncate_after(0)
    assert list(tmp_path.iterdir()) == []


def test_the_path_less_check_can_fail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A log that ignores ``path=None`` and writes to a default file is caught by the check above."""

    class Stray(MetricsLog):
        def write(self, record):
            MetricsLog(Path("metrics.jsonl")).write(record)

    monkeypatch.chdir(tmp_path)
    Stray(None).write({"step": 1})
    assert list(tmp_path.iterdir()) == [tmp_path / "metrics.jsonl"]


def test_a_line_cut_off_by_a_kill_is_dropped_and_a_corrupt_one_is_named(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"split": "train", "step": 2}\n{"split": "tra')  # killed while appending
    assert read_metrics(path) == [{"split": "train", "step": 2}]
    path.write_text('{"split": "train", "step": 2}\n\x00\x00garbage\n{"split": "train", "step": 4}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: expected a JSON object per line, got .*file is corrupt"):
        read_metrics(path)
