"""Tests of models/training/optimization.py: the learning-rate schedule."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from models import training


def test_lr_schedule_warms_up_linearly_then_holds_or_decays() -> None:
    factor = partial(training.lr_factor, warmup=4, total=12)
    assert [factor(s, schedule="constant") for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert factor(4, schedule="cosine") == 1.0 and factor(8, schedule="cosine") == pytest.approx(0.5)
    assert factor(12, schedule="cosine") == pytest.approx(0.0)
    with pytest.raises(ValueError, match="schedule expected 'constant' or 'cosine', got 'linear'"):
        training.build_scheduler(torch.optim.Adam([torch.zeros(1, requires_grad=True)]), 1, 2, "linear")
