"""The metrics file: JSON lines appended, read back in order, truncated on resume."""

from __future__ import annotations

from pathlib import Path

from models.metrics_log import MetricsLog, read_metrics


def test_records_come_back_in_order_and_truncate_after_a_step(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in (2, 4, 6):
        log.write({"split": "train", "step": step, "loss": step / 10})
    assert [r["step"] for r in read_metrics(log.path)] == [2, 4, 6]
    log.truncate_after(4)
    assert read_metrics(log.path) == [{"split": "train", "step": 2, "loss": 0.2}, {"split": "train", "step": 4, "loss": 0.4}]


def test_a_log_without_a_path_writes_nothing(tmp_path: Path) -> None:
    log = MetricsLog(None)  # ranks other than 0
    log.write({"step": 1})
    log.truncate_after(0)
    assert list(tmp_path.iterdir()) == []
