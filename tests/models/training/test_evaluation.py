"""Tests of models/training/evaluation.py: test NLL, its standard error, context, eval mode."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import flows
from models import build_model, training
from models.data import load_dataset
from models.metrics import nats_mean_and_stderr
from tests.registry import perturb

from .standins import StandIn, start, vector_data


def test_evaluate_reports_mean_and_standard_error() -> None:
    model, data = StandIn().eval(), vector_data(50)
    result = training.evaluate(model, data, num_levels=None, batch_size=16)
    mean, stderr = nats_mean_and_stderr(-model.log_prob(data).detach())
    assert result.count == 50
    assert result.nats_per_dim == pytest.approx(mean / 4, rel=1e-12)
    assert result.bits_per_dim == pytest.approx(mean / 4 / math.log(2), rel=1e-12)
    assert result.bits_per_dim_stderr == pytest.approx(stderr / 4 / math.log(2), rel=1e-9)


def test_a_conditional_model_trains_and_evaluates_given_its_context(tmp_path: Path) -> None:
    labels = torch.arange(64) % 2
    data = vector_data(64) + 4.0 * labels[:, None]  # the class shifts the data
    context = torch.nn.functional.one_hot(labels, 2).double()
    model = StandIn(context_features=2)
    state, outcome = start(model, data, 6, tmp_path, context=context)
    assert outcome == "done" and state.step == 6
    model.eval()
    result = training.evaluate(model, data, num_levels=None, batch_size=16, context=context)
    mean, _ = nats_mean_and_stderr(-model.log_prob(data, context).detach())
    assert result.nats_per_dim == pytest.approx(mean / 4, rel=1e-12)
    swapped = training.evaluate(model, data, num_levels=None, batch_size=16, context=context.flip(1))
    assert swapped.nats_per_dim != result.nats_per_dim  # the context is used, not ignored
    with pytest.raises(ValueError, match=r"AffineCoupling was built with context_features=2 but got context=None"):
        training.evaluate(model, data, num_levels=None, batch_size=16)


def test_evaluate_reports_the_average_log_likelihood_per_sample() -> None:
    """An identity flow on N(0, I): the log-likelihood is the Gaussian's, exactly."""
    model = flows.FlowDistribution(flows.ScalarAffine(1.0), flows.StandardNormal(3))
    model.dummy = torch.nn.Parameter(torch.zeros(()))  # evaluate reads the device from a parameter
    data = torch.randn(40, 3)
    result = training.evaluate(model, data, num_levels=None, batch_size=16)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(data).sum(1)
    assert abs(result.log_likelihood - float(expected.mean())) < 1e-9
    assert abs(result.log_likelihood_stderr - float(expected.std() / 40**0.5)) < 1e-9
    assert abs(result.nats_per_dim * 3 + result.log_likelihood) < 1e-9


class Boom(Exception):
    pass


def test_evaluating_restores_the_mode_even_when_the_block_raises() -> None:
    model = torch.nn.Sequential(torch.nn.Dropout(), torch.nn.Linear(2, 2))
    with training.evaluating(model):
        assert not model.training and not model[0].training
    assert model.training and model[0].training
    with pytest.raises(Boom), training.evaluating(model):
        raise Boom
    assert model.training and model[0].training
    model.eval()
    with training.evaluating(model):
        pass
    assert not model.training  # a model in eval mode stays there


def test_evaluate_leaves_the_model_in_its_mode_when_log_prob_raises() -> None:
    model = StandIn(context_features=2)
    with pytest.raises(ValueError, match="context_features=2 but got context=None"):
        training.evaluate(model, vector_data(8), num_levels=None, batch_size=4)
    assert model.training


def free_form_model() -> flows.FlowDistribution:
    """A residual flow trained in gradient mode, whose log-det value is no likelihood, its ActNorms initialized."""
    torch.manual_seed(3)
    model = build_model("residual", "toy2d", (3,), num_steps=2, hidden_features=16, logdet_mode="gradient")
    perturb(model, 0.2)
    with torch.no_grad():
        model.log_prob(vector_data(40)[:, :3])
    return model


def test_free_form_models_are_evaluated_with_exact_log_dets() -> None:
    model, data = free_form_model(), vector_data(40)[:, :3]
    result = training.evaluate(model, data, num_levels=None, batch_size=16, logdet_mode="exact")
    with flows.logdet_mode(model, "exact"), torch.no_grad():
        mean, _ = nats_mean_and_stderr(-model.eval().log_prob(data))
    assert result.nats_per_dim == pytest.approx(mean / 3, rel=1e-12) and result.logdet_mode == "exact"
    assert result.as_dict()["logdet_mode"] == "exact" and str(result).endswith("; exact log-dets")
    assert flows.freeform.logdet_modes_in(model) == {"gradient"}  # the training mode is back


def test_estimates_average_independent_passes_and_report_their_standard_error() -> None:
    model, data = free_form_model(), vector_data(40)[:, :3]
    exact = training.evaluate(model, data, num_levels=None, batch_size=16, logdet_mode="exact")
    rng = torch.get_rng_state()
    estimate = training.evaluate(model, data, num_levels=None, batch_size=16, logdet_mode="estimate", passes=16)
    assert torch.equal(torch.get_rng_state(), rng)  # the estimators draw from their own seeded stream
    again = training.evaluate(model, data, num_levels=None, batch_size=16, logdet_mode="estimate", passes=16)
    assert again == estimate and estimate.passes == 16 and estimate.logdet_mode == "estimate"
    # Unbiased: within 5 standard errors (over the passes) of the exact value.
    assert 0 < estimate.estimator_stderr < 0.01
    assert abs(estimate.bits_per_dim - exact.bits_per_dim) < 5 * estimate.estimator_stderr
    record = estimate.as_dict()
    assert record["passes"] == 16 and record["bits_per_dim_estimator_stderr"] == estimate.estimator_stderr
    assert "the mean of 16 passes" in str(estimate)


def test_an_estimate_without_passes_to_compare_or_a_surrogate_is_refused() -> None:
    with pytest.raises(ValueError, match=r"evaluate expected passes >= 2 to estimate a standard error over .*, got 1"):
        training.evaluate(free_form_model(), vector_data(8)[:, :3], num_levels=None, batch_size=4,
                          logdet_mode="estimate", passes=1)
    with pytest.raises(ValueError, match=r"evaluate expected logdet_mode None, 'exact' or 'estimate', got 'gradient'"):
        training.evaluate(free_form_model(), vector_data(8)[:, :3], num_levels=None, batch_size=4,
                          logdet_mode="gradient")


def test_kl_gap_is_the_test_nll_above_the_true_entropy() -> None:
    density = load_dataset("two_moons").density
    result = training.EvalResult(1.25, 1.25 / math.log(2), 0.01, 100)
    values, text = training.kl_gap(result, density, 2)
    entropy = density.entropy()[0] / 2
    assert values == {"entropy_per_dim": entropy, "kl_gap_per_dim": pytest.approx(1.25 - entropy)}
    assert "(entropy), the best a model can reach; KL gap" in text
