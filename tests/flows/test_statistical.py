"""The oracle's statistical half (flows/statistical.py): its stated false-alarm rates, the
correct estimators it passes, and the deliberately wrong estimators it must catch.

The wrong estimators sit on a residual layer whose branch ``g(x) = s tanh(W x / ||W|| + b)``
has a Jacobian of spectral radius near ``s`` (``W`` close to the identity), so every
power-series term matters and the roulette's variance is set by ``s``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import flows.residual
from flows.base import sum_per_sample
from flows.lipschitz import LipschitzMLP, LipschitzNet
from flows.residual import Residual
from flows.statistical import (
    EstimatorCheckError, check_estimator, check_gradient_estimator, mean_test, t_quantile, variance_test,
)


pytestmark = pytest.mark.usefixtures("one_thread")


class TanhNet(LipschitzNet):
    """``g(x) = scale * tanh(W x / ||W||_2 + b [+ C context])``: ``Lip(g) <= scale``."""

    ranks = (2,)

    def __init__(self, features: int, scale: float, context_features: int = 0) -> None:
        super().__init__()
        self.features, self.context_features, self.scale = features, context_features, scale
        self.lipschitz_bound = scale
        self.weight = nn.Parameter(torch.eye(features) + 0.2 * torch.randn(features, features))
        self.bias = nn.Parameter(0.1 * torch.randn(features))
        self.context_net = nn.Linear(context_features, features) if context_features else None

    def forward(self, x, context=None):
        h = x @ (self.weight / torch.linalg.matrix_norm(self.weight, 2)).T + self.bias
        return self.scale * torch.tanh(self._context_bias(context, x.shape[0], h))


# Deliberately wrong estimators -------------------------------------------------------------

class NoReweighting(Residual):
    """Russian roulette without the 1/P(N >= k) weights: the tail terms are under-counted."""

    def _weight(self, k):
        return 1.0


class Truncated(Residual):
    """A fixed truncation of the series (the exact terms alone), presented as unbiased."""

    def _num_terms(self):
        return self.num_exact_terms


class SignError(Residual):
    """The k = 2 term, -tr(J^2)/2, added with the wrong sign."""

    def _weight(self, k):
        return -super()._weight(k) if k == 2 else super()._weight(k)


class UniformProbes(Residual):
    """Probes uniform on [-1, 1]: mean 0 but variance 1/3, so E[v^T A v] = tr(A) / 3."""

    def _series(self, x, context):
        original = flows.residual.probe
        flows.residual.probe = lambda like, kind: torch.rand_like(like) * 2 - 1
        try:
            return super()._series(x, context)
        finally:
            flows.residual.probe = original


class NeumannWithoutIdentity(Residual):
    """The Neumann gradient estimator missing its k = 0 term (the identity)."""

    def _neumann_surrogate(self, gx, x, v, num_terms, record):
        w, series = v, torch.zeros_like(v)
        for k in range(1, num_terms + 1):
            (w,) = torch.autograd.grad(gx, x, w, retain_graph=True)
            series = series + ((-1) ** k * self._weight(k)) * w
        (product,) = torch.autograd.grad(gx, x, series.detach(), create_graph=record, retain_graph=True)
        return sum_per_sample(product * v)


class DetachedLogdet(Residual):
    """A log-det that passes no gradient to g (a peer's i-ResNet layer, measured in issue 11)."""

    def _series(self, x, context):
        y, logdet = super()._series(x, context)
        return y, logdet.detach()


def layer(cls=Residual, scale: float = 0.6, context: int = 0, **options) -> Residual:
    torch.manual_seed(1)
    return cls(TanhNet(3, scale, context), **options)


X = 0.5 * torch.randn(4, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

WRONG = {
    "roulette-without-reweighting": (lambda: layer(NoReweighting, num_exact_terms=1), check_estimator, {}, "biased"),
    "truncated-series": (lambda: layer(Truncated, num_exact_terms=2), check_estimator, {}, "biased"),
    "sign-error-in-one-term": (lambda: layer(SignError), check_estimator, {}, "biased"),
    "probes-with-wrong-variance": (lambda: layer(UniformProbes), check_estimator, {}, "biased"),
    "gradient-missing-a-term": (
        lambda: layer(NeumannWithoutIdentity), check_gradient_estimator, {}, "biased for input"),
    "no-gradient-to-parameters": (
        lambda: layer(DetachedLogdet), check_gradient_estimator, {"mode": "estimate"}, "biased for parameter"),
    # rho(J) ~ 0.9 with p = 0.8: rho^2 > 1 - p, the roulette's variance is infinite.
    "infinite-variance": (
        lambda: layer(scale=0.95, roulette_p=0.8, num_exact_terms=1), check_estimator, {"num_draws": 1000},
        "variance unstable"),
    "gradient-mode-value-as-logdet": (lambda: layer(), check_estimator, {"mode": "gradient"}, "biased"),
}


@pytest.mark.parametrize("name", sorted(WRONG))
def test_checker_catches_wrong_estimator(name: str) -> None:
    make, check, options, message = WRONG[name]
    flow = make().double()
    x = X.double()
    with pytest.raises(EstimatorCheckError, match=message):
        check(flow, x, **options)


def test_failure_message_names_sample_mean_exact_error_and_z() -> None:
    with pytest.raises(EstimatorCheckError) as info:
        check_estimator(layer(SignError).double(), X)
    assert all(part in str(info.value) for part in ("sample ", "mean of 200 draws", "exact", "standard error", "z = "))


@pytest.mark.parametrize("mode", ["estimate", "gradient"])
def test_correct_estimators_pass(mode: str) -> None:
    flow = layer(scale=0.6, context=2).double()
    context = torch.randn(4, 2)
    report = check_gradient_estimator(flow, X, context, mode=mode)
    assert report["max_abs_z"] < report["z_threshold"]
    if mode == "estimate":
        assert check_estimator(flow, X, context)["max_log_variance_range"] < report["variance_threshold"]


def test_the_whole_check_keeps_its_false_alarm_rate() -> None:
    """At a loose rate, a correct estimator fails about that often (here at most, by a margin)."""
    flow = layer(scale=0.5, num_exact_terms=1).double()
    failures = 0
    for seed in range(16):
        try:
            check_estimator(flow, X, num_draws=60, false_alarm=0.25, seed=seed)
        except EstimatorCheckError:
            failures += 1
    assert failures <= 9  # expected <= 4; P(Binomial(16, 0.25) >= 10) < 1e-3


def test_mean_test_has_its_stated_rate_on_normal_draws() -> None:
    """For normal draws the t-test is exact: 4000 one-column tests at 0.05 fail ~200 times."""
    draws = torch.randn(100, 4000)
    scores, _, _ = mean_test(draws, torch.zeros(4000), 0.05)
    alarms = int((scores.abs() > t_quantile(0.025, 99)).sum())
    assert 200 - 55 <= alarms <= 200 + 55  # +-4 binomial standard deviations


def test_variance_test_stays_below_its_rate_up_to_the_stated_kurtosis() -> None:
    """Chi-square(1) draws have kurtosis 15, the stated ceiling: at most ~5% of one-column tests fail."""
    draws = torch.randn(200, 4000).square()
    spreads, _ = variance_test(draws, 0.05)
    _, threshold = variance_test(draws[:, :1], 0.05)  # the threshold of one column
    assert int((spreads > threshold).sum()) <= 200 + 55  # measured: ~100


def test_t_quantiles_match_tables() -> None:
    # scipy.stats.t.isf(upper, dof)
    for upper, dof, expected in [(0.025, 9, 2.2622), (5e-7, 29, 6.1701), (1e-8, 99, 6.1069), (5e-7, 199, 5.0491)]:
        assert t_quantile(upper, dof) == pytest.approx(expected, abs=2e-3)


def test_checks_leave_the_callers_random_state_alone() -> None:
    flow = layer().double()
    state = torch.get_rng_state()
    check_estimator(flow, X, num_draws=30, false_alarm=0.5)
    assert torch.equal(torch.get_rng_state(), state)


def test_a_deterministic_exact_mode_passes_with_zero_variance() -> None:
    report = check_estimator(layer().double(), X, num_draws=30, mode="exact")
    assert report["max_abs_z"] < 1


def test_non_finite_estimates_are_reported() -> None:
    class NaNEstimate(Residual):
        def _series(self, x, context):
            y, logdet = super()._series(x, context)
            return y, logdet * float("nan")

    with pytest.raises(EstimatorCheckError, match=r"non-finite estimate nan in draw 0 for sample 0"):
        check_estimator(layer(NaNEstimate).double(), X, num_draws=30)


def test_an_estimate_mode_that_changes_the_map_is_reported() -> None:
    class OtherMap(Residual):
        def _series(self, x, context):
            y, logdet = super()._series(x, context)
            return y + 1e-3, logdet

    with pytest.raises(EstimatorCheckError, match=r"'estimate' mode computes another map than 'exact' mode"):
        check_estimator(layer(OtherMap).double(), X, num_draws=30)


@pytest.mark.parametrize(("options", "message"), [
    ({"num_draws": 10}, r"num_draws must be an integer >= 30, got 10"),
    ({"false_alarm": 1.5}, r"false_alarm must be in \(0, 1\), got 1.5"),
])
def test_bad_arguments(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_estimator(layer().double(), X, **options)
    with pytest.raises(ValueError, match=message):
        check_gradient_estimator(layer().double(), X, **options)


def test_bad_number_of_projections() -> None:
    with pytest.raises(ValueError, match=r"num_projections must be an integer >= 1, got 0"):
        check_gradient_estimator(layer().double(), X, num_projections=0)


def test_real_networks_pass_in_every_mode() -> None:
    """An MLP branch with context: the estimator and both gradients."""
    torch.manual_seed(2)
    flow = Residual(LipschitzMLP(3, 8, context_features=2, coefficient=0.9)).double()
    context = torch.randn(4, 2)
    check_estimator(flow, X * 3, context)
    check_gradient_estimator(flow, X * 3, context, num_draws=100)


def test_round_off_alone_is_no_variance() -> None:
    """Draws exact up to round-off (some groups all equal, others a few ulps apart) pass."""
    draws = torch.ones(200, 3)
    draws[150:, 0] += torch.rand(50) * 1e-15  # the last group, a few ulps of 1 apart
    spreads, threshold = variance_test(draws, 1e-6, resolution=torch.full((3,), 1e-13))
    assert (spreads < threshold).all()
    assert variance_test(draws, 1e-6)[0][0] > threshold  # without the floor, noise against noise fails
