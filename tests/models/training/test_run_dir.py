"""Tests of models/training/run_dir.py: one run per folder (a second writer fails at once, naming the
holder), and a run never writes into a folder that holds another run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from models.training import MetricsLog, Processes, RunDir, RunFileError, claim_run_dir, read_metrics, start_run_files

from .standins import hold_lock


def test_a_second_writer_fails_at_once_naming_the_folder_and_the_holder(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    holder = hold_lock(run.lock)
    try:
        with pytest.raises(RunFileError, match=rf"--out {run.root} is in use by another train.py run "
                                               rf"\(pid {holder.pid}, holding .*\.lock\)"):
            with claim_run_dir(run, Processes()):
                pass
    finally:
        holder.communicate("")
    with claim_run_dir(run, Processes()):  # free again once the holder is gone
        assert run.lock.read_text() == f"{os.getpid()}\n"


def test_the_lock_is_held_for_the_block_and_released_after(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    with claim_run_dir(run, Processes()):
        with pytest.raises(RunFileError, match="is in use by another train.py run"):
            with claim_run_dir(run, Processes()):
                pass
    with pytest.raises(KeyError):
        with claim_run_dir(run, Processes()):
            raise KeyError("a failing run")
    with claim_run_dir(run, Processes()):
        pass


def another_run(root: Path) -> dict[str, bytes]:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in [("checkpoint.pt", "ckpt"), ("metrics.jsonl", '{"split": "train", "step": 9}\n'),
                       ("config.json", "{}"), ("samples.png", "png")]:
        (root / name).write_text(text)
    return {p.name: p.read_bytes() for p in root.iterdir() if p.name != ".lock"}


def test_a_fresh_run_refuses_a_folder_with_a_checkpoint_unless_overwrite(tmp_path: Path) -> None:
    before = another_run(tmp_path / "b")
    with pytest.raises(FileExistsError, match=r"--out expected a directory without a checkpoint, got .*b'"):
        with claim_run_dir(RunDir(tmp_path / "b"), Processes()):
            pass
    assert {p.name: p.read_bytes() for p in (tmp_path / "b").iterdir() if p.name != ".lock"} == before
    with claim_run_dir(RunDir(tmp_path / "b"), Processes(), overwrite=True):
        assert RunDir(tmp_path / "b").run_files() == []  # the other run's files are gone


def test_a_resumed_run_refuses_another_runs_folder(tmp_path: Path) -> None:
    source = tmp_path / "a"
    another_run(source)
    before = another_run(tmp_path / "b")
    (tmp_path / "b" / "checkpoint.pt").unlink()  # no checkpoint, but metrics and pictures: still another run's
    del before["checkpoint.pt"]
    message = (r"--out expected a new or empty folder for a run resumed from .*a, got .*b' holding another run's "
               r"files \(config.json, metrics.jsonl, samples.png\)")
    with pytest.raises(FileExistsError, match=message):
        with claim_run_dir(RunDir(tmp_path / "b"), Processes(), source=source):
            pass
    assert {p.name: p.read_bytes() for p in (tmp_path / "b").iterdir() if p.name != ".lock"} == before
    with claim_run_dir(RunDir(source), Processes(), source=source):  # its own folder: fine
        pass
    with claim_run_dir(RunDir(tmp_path / "new"), Processes(), source=source):  # a new one: fine
        pass
    with claim_run_dir(RunDir(tmp_path / "b"), Processes(), source=source, overwrite=True):
        assert RunDir(tmp_path / "b").run_files() == []


def test_start_run_files_continues_the_history_of_the_checkpoint(tmp_path: Path) -> None:
    source = RunDir(tmp_path / "a")
    source.root.mkdir()
    records = [{"split": "train", "step": s} for s in (2, 4, 6)]
    source.metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    log = start_run_files(RunDir(tmp_path / "b"), {"lr": 0.5}, source.root, step=4)
    assert isinstance(log, MetricsLog) and read_metrics(tmp_path / "b" / "metrics.jsonl") == records[:2]
    assert json.loads((tmp_path / "b" / "config.json").read_text()) == {"lr": 0.5}
    start_run_files(source, {"lr": 0.1}, source.root, step=2)  # its own folder: truncated past the step
    assert read_metrics(source.metrics) == records[:1]
    start_run_files(source, {"lr": 0.1}, None, step=0)  # a fresh run: no records
    assert not source.metrics.exists()
