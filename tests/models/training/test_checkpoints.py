"""Tests of models/training/checkpoints.py: atomic writes, refusal of non-finite weights, clear load
errors, and the check that a checkpoint holds the model being built."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from models.training import checkpoints

from .standins import StandIn, start, vector_data


def test_save_checkpoint_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "checkpoint.pt"
    checkpoints.save_checkpoint({"format": 1, "model": {"w": torch.ones(2)}}, path)
    good = path.read_bytes()

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoints.save_checkpoint({"format": 1, "model": {"w": torch.zeros(2)}}, path)
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == ["checkpoint.pt"]


def test_save_checkpoint_refuses_non_finite_parameters(tmp_path: Path) -> None:
    with pytest.raises(FloatingPointError, match="refusing to write a checkpoint with NaN or inf"):
        checkpoints.save_checkpoint({"format": 1, "model": {"w": torch.tensor([1.0, math.nan])}}, tmp_path / "c.pt")
    assert not (tmp_path / "c.pt").exists()


def test_load_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="checkpoint expected a file written by train.py, got .*nope.pt"):
        checkpoints.load_checkpoint(tmp_path / "nope.pt")
    torch.save({"weights": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="checkpoint expected a train.py checkpoint"):
        checkpoints.load_checkpoint(tmp_path / "other.pt")


def test_check_compatible_rejects_another_model(tmp_path: Path) -> None:
    state, _ = start(StandIn(hidden=8), vector_data(), 2, tmp_path)
    payload = checkpoints.load_checkpoint(tmp_path / "checkpoint.pt")
    checkpoints.check_compatible(payload, StandIn(hidden=8), "c.pt")
    message = (r"resume expected a checkpoint of the model being built \(standin with \{'hidden': 16\}\), "
               r"got standin with \{'hidden': 8\}")
    with pytest.raises(ValueError, match=message):
        checkpoints.check_compatible(payload, StandIn(hidden=16), "c.pt")
