"""Tests of models/training/step.py: one training step under autocast."""

from __future__ import annotations

import pytest
import torch

from models import training

from .standins import StandIn, vector_data


def test_amp_bf16_step_keeps_a_float32_loss() -> None:
    model = StandIn().float()
    x = vector_data(16).float()
    optimizer = training.build_optimizer(model, 1e-3)
    scaler = training.make_scaler("bf16", x.device)
    out = training.train_step(training.LogProbParts(model), x, optimizer, scaler, "bf16", 1.0)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="amp expected one of"):
        training.autocast("fp8", x.device)
