"""Tests of models/training/inputs.py: empty splits are refused before training, and the fingerprint
tells data sets of the same shape apart."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.data import DataSplit
from models.training import check_nonempty, data_fingerprint, load_splits


def test_an_empty_test_split_is_refused_before_training(tmp_path: Path) -> None:
    np.save(tmp_path / "nine.npy", np.random.default_rng(0).normal(size=(9, 2)))  # int(0.1 * 9) = 0 test rows
    with pytest.raises(ValueError, match=r"nine test split expected at least one sample, got none"):
        load_splits(str(tmp_path / "nine.npy"), tmp_path, False)
    with pytest.raises(ValueError, match=r"points train split expected at least one sample"):
        check_nonempty(DataSplit("points", torch.zeros(0, 2), "vector"), "train")


def test_the_fingerprint_sees_one_changed_value() -> None:
    data = torch.randn(1000, 3)
    base = data_fingerprint(DataSplit("x", data, "vector"), DataSplit("x", data[:10], "vector"))
    changed = data.clone()
    changed[-1, 2] += 1e-3  # the last row is always among the hashed ones
    other = data_fingerprint(DataSplit("x", changed, "vector"), DataSplit("x", data[:10], "vector"))
    assert other != base and {k for k in base if base[k] != other[k]} == {"sha256"}
    assert base == {"name": "x", "train": 1000, "test": 10, "shape": [3], "num_levels": None, "num_classes": None,
                    "sha256": base["sha256"]}
    labelled = DataSplit("x", data, "vector", labels=torch.zeros(1000, dtype=torch.long), num_classes=2)
    relabelled = DataSplit("x", data, "vector", labels=torch.ones(1000, dtype=torch.long), num_classes=2)
    test = DataSplit("x", data[:10], "vector")
    assert data_fingerprint(labelled, test) != data_fingerprint(relabelled, test)
