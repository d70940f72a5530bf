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


def test_a_penalty_reaches_the_gradient_but_not_the_reported_loss() -> None:
    x = vector_data(16)
    runs = []
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        model = StandIn()
        optimizer = training.build_optimizer(model, 1e-3)
        penalty = (lambda: weight * sum(p.square().sum() for p in model.parameters())) if weight else None
        out = training.train_step(training.LogProbParts(model), x, optimizer, training.make_scaler("none", x.device),
                                  penalty=penalty)
        runs.append((out, [p.grad.clone() for p in model.parameters()]))
    (plain, plain_grads), (penalized, penalized_grads) = runs
    assert plain.penalty is None and penalized.penalty > 0 and not penalized.penalty.requires_grad
    assert torch.equal(plain.loss, penalized.loss) and torch.equal(plain.logdet, penalized.logdet)
    assert any(not torch.equal(a, b) for a, b in zip(plain_grads, penalized_grads))
