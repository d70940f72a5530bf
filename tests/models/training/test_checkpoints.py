"""Tests of models/training/checkpoints.py: atomic writes, refusal of non-finite weights, clear load
errors, and the check that a checkpoint holds the model being built."""

from __future__ import annotations

import math
import os
import re
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


def written(tmp_path: Path) -> Path:
    path = tmp_path / "checkpoint.pt"
    checkpoints.save_checkpoint({"format": checkpoints.CHECKPOINT_FORMAT, "model": {"w": torch.arange(100.0)},
                                 "step": 7}, path)
    return path


def test_a_checkpoint_round_trips_with_its_checksum(tmp_path: Path) -> None:
    path = written(tmp_path)
    assert path.read_bytes().startswith(b"jacflow-checkpoint 2 sha256=")
    payload = checkpoints.load_checkpoint(path)
    assert payload["step"] == 7 and torch.equal(payload["model"]["w"], torch.arange(100.0))


@pytest.mark.parametrize("where", [0, 20, 70, "middle", -1])
def test_a_flipped_byte_anywhere_is_refused(tmp_path: Path, where) -> None:
    path = written(tmp_path)
    data = bytearray(path.read_bytes())
    index = len(data) // 2 if where == "middle" else where
    data[index] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"checkpoint .*checkpoint.pt.*(corrupt|not a checkpoint|format)"):
        checkpoints.load_checkpoint(path)


def test_every_single_flipped_byte_of_the_payload_is_refused(tmp_path: Path) -> None:
    good = written(tmp_path).read_bytes()
    for index in range(0, len(good), max(1, len(good) // 97)):  # ~100 places, header and body
        data = bytearray(good)
        data[index] ^= 0x80
        (tmp_path / "checkpoint.pt").write_bytes(bytes(data))
        with pytest.raises(ValueError, match=r"checkpoint .*checkpoint.pt"):
            checkpoints.load_checkpoint(tmp_path / "checkpoint.pt")


@pytest.mark.parametrize(("cut", "match"), [
    (0, r"is empty \(0 bytes\)"),
    (30, r"got 30 bytes without one; the file is corrupt"),
    (-1, r"is truncated or padded: its header says \d+ bytes, the file holds \d+"),
    (-500, r"is truncated or padded"),
])
def test_a_truncated_checkpoint_is_refused_naming_the_file(tmp_path: Path, cut: int, match: str) -> None:
    path = written(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:cut] if cut >= 0 else data[:len(data) + cut])
    with pytest.raises(ValueError, match="checkpoint '" + re.escape(str(path)) + "'.*" + match):
        checkpoints.load_checkpoint(path)


def test_a_format_1_checkpoint_loads_unverified_with_a_note(tmp_path: Path, capsys) -> None:
    torch.save({"format": 1, "step": 3, "model": {}}, tmp_path / "old.pt")
    assert checkpoints.load_checkpoint(tmp_path / "old.pt")["step"] == 3
    assert "format-1 checkpoint without a checksum; loading it unverified" in capsys.readouterr().err


def test_a_full_disk_keeps_the_last_good_checkpoint_and_says_so(tmp_path: Path, monkeypatch) -> None:
    from models.training import files

    path = written(tmp_path)
    good = path.read_bytes()

    def full_disk(stream, data):
        stream.write(data[:100])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files, "_write", full_disk)
    message = r"cannot write .*checkpoint.pt: No space left on device \(the disk is full; free some space\)\. Last good"
    with pytest.raises(files.RunFileError, match=message):
        checkpoints.save_checkpoint({"model": {"w": torch.zeros(3)}}, path, after="Last good checkpoint: here")
    assert path.read_bytes() == good and os.listdir(tmp_path) == ["checkpoint.pt"]
