"""What a run reads: the train and test splits of its data set, checked, and their fingerprint.

:func:`load_splits` refuses an empty split or one with NaN or inf before any training;
:func:`data_fingerprint` is what a checkpoint keeps of the data (name, sizes, shape and a
SHA-256 of evenly spaced rows), so a resumed run refuses other data of the same shape.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import torch
import torch.distributed as dist

from ..data import DataSplit, load_dataset
from .batches import check_finite
from .processes import Processes

__all__ = ["load_splits", "check_nonempty", "data_fingerprint", "FINGERPRINT_ROWS"]

FINGERPRINT_ROWS = 64  # rows of each split hashed into the fingerprint


def load_splits(name: str, data_dir: str | os.PathLike[str], download: bool,
                procs: Processes = Processes()) -> tuple[DataSplit, DataSplit]:
    """The train and test splits, checked; under torchrun rank 0 loads (and downloads) first."""
    def load(split: str, fetch: bool) -> DataSplit:
        data = load_dataset(name, data_dir, split, download=fetch)
        check_nonempty(data, split)
        check_finite(data.data, f"{name} {split} data")
        return data

    if procs.is_main:
        splits = load("train", download), load("test", download)
    if procs.distributed:
        dist.barrier()
    if not procs.is_main:
        splits = load("train", False), load("test", False)
    return splits


def check_nonempty(data: DataSplit, split: str) -> None:
    """Raises ``ValueError`` for a split without samples (its evaluation would divide by zero).

    Example:
        >>> check_nonempty(DataSplit("points", torch.zeros(0, 3), "vector"), "test")
        Traceback (most recent call last):
        ...
        ValueError: points test split expected at least one sample, got none; use a larger data set ...
    """
    if len(data) == 0:
        raise ValueError(
            f"{data.name} {split} split expected at least one sample, got none; use a larger data set (a file "
            "of vectors keeps its last 10% as test, so it needs 10 rows or more)"
        )


def data_fingerprint(train: DataSplit, test: DataSplit) -> dict[str, Any]:
    """Name, sizes, sample shape, levels, classes and a SHA-256 (16 hex digits) of rows of both splits.

    Example:
        >>> a = DataSplit("points", torch.arange(30.0).reshape(10, 3), "vector")
        >>> b = DataSplit("points", torch.arange(30.0).reshape(10, 3) + 1, "vector")
        >>> data_fingerprint(a, a) == data_fingerprint(a, a), data_fingerprint(a, a) == data_fingerprint(b, a)
        (True, False)
    """
    digest = hashlib.sha256()
    for split in (train, test):
        rows = torch.linspace(0, len(split) - 1, min(len(split), FINGERPRINT_ROWS)).round().long()
        digest.update(split.data[rows].to(torch.float32).contiguous().numpy().tobytes())
        if split.labels is not None:
            digest.update(split.labels[rows].to(torch.int64).contiguous().numpy().tobytes())
    return {"name": train.name, "train": len(train), "test": len(test), "shape": list(train.shape),
            "num_levels": train.num_levels, "num_classes": train.num_classes, "sha256": digest.hexdigest()[:16]}
