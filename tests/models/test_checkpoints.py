"""Checkpoints: atomic writes, refusal of non-finite weights, clear load errors."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from models import checkpoints


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
