"""Tests of models/training/invertible.py: --invertible-backprop's rewrite of a ready model, and its refusals."""

from __future__ import annotations

import copy

import pytest
import torch

from flows.reversible import InvertibleSequential
from models import build_model
from models.training import use_invertible_backprop
from tests.registry import perturb


def test_a_model_keeps_its_state_dict_and_its_gradients() -> None:
    model = build_model("realnvp", "digits", (1, 4, 4), 17, num_scales=1, num_steps=2, hidden_features=4).double()
    perturb(model, 0.05)
    x = torch.rand(6, 1, 4, 4, dtype=torch.float64) * 17
    saving = copy.deepcopy(model)
    monitor = use_invertible_backprop(saving, "realnvp")
    assert isinstance(saving.transform, InvertibleSequential)
    assert saving.state_dict().keys() == model.state_dict().keys()  # checkpoints hold the plain model's state
    grads = []
    for m in (model, saving):
        m.log_prob(x).mean().backward()
        grads.append([p.grad for p in m.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    assert 0 <= monitor.read() < 1e-10


@pytest.mark.parametrize(("name", "match"), [
    ("maf", r"--invertible-backprop cannot train maf: invertible_backprop expects layers with a one-pass inverse, "
            r"got MaskedAffineAutoregressive at transform\.flows\.0, whose inverse is iterative .* in every backward$"),
    ("residual", r"--invertible-backprop expected a model whose layers have closed-form inverses, got residual, "
                 r"whose inverses are iterative solves"),
    ("ffjord", r"got ffjord, whose inverses are iterative solves \(exact only to their tolerance\); leave it out"),
])
def test_models_without_one_pass_inverses_are_refused(name: str, match: str) -> None:
    model = build_model(name, "toy2d", (2,), hidden_features=4)
    with pytest.raises(ValueError, match=match):
        use_invertible_backprop(model, name)
