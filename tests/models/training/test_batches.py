"""Tests of models/training/batches.py: batches carry their context rows across epochs."""

from __future__ import annotations

import pytest
import torch

from models import training
from models.training import Processes

from .standins import vector_data


def test_batches_carry_the_context_rows_of_their_samples() -> None:
    data = vector_data(64)
    context = torch.nn.functional.one_hot(torch.arange(64) % 3, 3).double() * data[:, :1]  # row-specific
    loader = training.make_train_loader(data, 16, seed=0, procs=Processes(), context=context)
    batches = training.train_batches(loader, 0, torch.device("cpu"), torch.float64, None)
    seen = 0
    for _ in range(6):  # past the end of the first epoch
        x, ctx = next(batches)
        rows = [int(torch.nonzero((data == row).all(1))[0]) for row in x]
        assert torch.equal(ctx, context[rows])
        seen += len(x)
    assert seen == 96
    assert next(training.train_batches(training.make_train_loader(data, 16, 0, Processes()), 0,
                                       torch.device("cpu"), torch.float64, None))[1] is None
    with pytest.raises(ValueError, match=r"context expected one row per sample \(64\), got 10 rows"):
        training.make_train_loader(data, 16, 0, Processes(), context=context[:10])
