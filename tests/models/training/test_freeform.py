"""Tests of models/training/freeform.py: what a free-form model's training loss is, and how
evaluation computes its log-dets."""

from __future__ import annotations

import pytest

import flows
from models import build_model
from models.training import EXACT_MAX_DIMS, evaluation_logdet, loss_kind, loss_note, set_logdet_mode


def residual(mode: str = "exact") -> flows.FlowDistribution:
    return build_model("residual", "toy2d", (3,), num_steps=1, hidden_features=4, logdet_mode=mode)


@pytest.mark.parametrize(("mode", "kind"), [("exact", "exact"), ("estimate", "estimate"), ("gradient", "gradient")])
def test_the_loss_kind_follows_the_mode_set_for_training(mode: str, kind: str) -> None:
    model = residual()
    set_logdet_mode(model, mode, "residual")
    assert loss_kind(model) == kind and flows.freeform.logdet_modes_in(model) == {mode}
    set_logdet_mode(model, None, "residual")  # None: the model's own mode stays
    assert loss_kind(model) == kind
    assert loss_kind(build_model("realnvp", "toy2d", (2,))) == "exact"


def test_evaluation_is_exact_up_to_the_threshold_then_estimated() -> None:
    model = residual("gradient")
    assert evaluation_logdet(model, EXACT_MAX_DIMS) == "exact"
    assert evaluation_logdet(model, EXACT_MAX_DIMS + 1) == "estimate"
    assert evaluation_logdet(model, 2, "estimate") == "estimate" and evaluation_logdet(model, 10**4, "exact") == "exact"
    assert evaluation_logdet(build_model("nice", "toy2d", (2,)), 10**4) is None  # exact by structure


def test_the_note_says_what_the_numbers_are() -> None:
    gradient = loss_note("gradient", "exact", 8)
    assert "surrogate_loss" in gradient and "never as bits/dim" in gradient and "exact log-dets" in gradient
    assert "unbiased estimate" in loss_note("estimate", "estimate", 5)
    assert "over 5 passes" in loss_note("exact", "estimate", 5)
    assert loss_note("exact", "exact", 8) is None and loss_note("exact", None, 8) is None


@pytest.mark.parametrize(("make", "mode", "match"), [
    (lambda: build_model("realnvp", "toy2d", (2,)), "exact",
     r"--logdet-mode expected a model with free-form log-dets \(residual, ffjord\), got m, whose log-dets are exact"),
    (lambda: build_model("ffjord", "toy2d", (2,), hidden_features=4), "gradient",
     r"--logdet-mode expected one of exact, estimate for m \(ContinuousFlow layers\), got 'gradient'"),
])
def test_a_mode_the_model_cannot_take_is_refused(make, mode: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        set_logdet_mode(make(), mode, "m")


def test_an_unknown_evaluation_choice_is_refused() -> None:
    with pytest.raises(ValueError, match=r"--eval-logdet expected one of auto, exact, estimate, got 'sometimes'"):
        evaluation_logdet(residual(), 2, "sometimes")
