"""flows/distributions.py: FlowDistribution as a torch distribution (the bases: tests/flows/test_bases.py)."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from torch.distributions import Distribution, Independent, Normal

import flows
from flows.nets import MLP
from tests.registry import perturb

D, K = 3, 2


def _coupling_dist(context: int = 0) -> flows.FlowDistribution:
    """A perturbed two-coupling flow over D=3 with a standard normal base."""
    torch.manual_seed(3)
    flow = flows.Sequential(
        flows.AffineCoupling(D, partial(MLP, hidden_features=8), context_features=context),
        flows.AffineCoupling(D, partial(MLP, hidden_features=8), parity=1, context_features=context),
    )
    perturb(flow, 0.3)
    return flows.FlowDistribution(flow, flows.StandardNormal(D))


# FlowDistribution: shapes and the torch interface


def test_flow_distribution_is_a_torch_distribution() -> None:
    dist = _coupling_dist()
    assert isinstance(dist, Distribution) and dist.has_rsample
    assert dist.event_shape == (D,) and dist.batch_shape == ()
    assert dist.support.event_dim == 1


def test_log_prob_is_base_plus_logdet_over_any_leading_shape() -> None:
    dist = flows.FlowDistribution(flows.ScalarAffine(2.0, 1.0), flows.StandardNormal(D))
    x = torch.randn(4, 5, D)
    expected = Normal(0.0, 1.0).log_prob(2 * x + 1).sum(-1) + D * math.log(2.0)
    torch.testing.assert_close(dist.log_prob(x), expected)
    torch.testing.assert_close(dist(x), expected)  # forward is log_prob
    torch.testing.assert_close(dist.log_prob(x[0, 0]), expected[0, 0])  # one sample: a scalar
    log_base, logdet = dist.log_prob_parts(x[0])
    torch.testing.assert_close(log_base + logdet, expected[0])


@pytest.mark.parametrize(
    ("sample_shape", "context_shape", "expected"),
    [((), None, (D,)), (4, None, (4, D)), ((2, 3), None, (2, 3, D)), (0, None, (0, D)),
     ((), (5, K), (5, D)), (3, (5, K), (3, 5, D)), ((2, 3), (4, K), (2, 3, 4, D)), (0, (5, K), (0, 5, D))],
)
def test_sample_shapes(sample_shape, context_shape, expected) -> None:
    dist = _coupling_dist(context=K if context_shape else 0)
    context = None if context_shape is None else torch.randn(context_shape)
    for draw in (dist.sample, dist.rsample, lambda *a: dist.sample_and_log_prob(*a)[0]):
        assert draw(sample_shape, context).shape == expected
    assert dist.sample_and_log_prob(sample_shape, context)[1].shape == expected[:-1]


def test_several_samples_per_context_row_use_their_row() -> None:
    dist = _coupling_dist(context=K)
    context = torch.randn(2, K)
    x = dist.sample(3, context, temperature=0.0)  # (3, 2, D): the mode of each row, 3 times
    torch.testing.assert_close(x[0], x[2])
    torch.testing.assert_close(x[0], dist.transform.inverse(torch.zeros(2, D), context)[0])
    assert not torch.allclose(x[0, 0], x[0, 1])
    # log_prob broadcasts the (2, K) context over the leading (3, 2) shape.
    torch.testing.assert_close(dist.log_prob(x, context)[1], dist.log_prob(x[1], context))


def test_sampling_inverts_the_transform_at_temperature_zero() -> None:
    dist = flows.FlowDistribution(flows.ScalarAffine(2.0, 1.0), flows.StandardNormal(D))
    torch.testing.assert_close(dist.sample(4, temperature=0.0), torch.full((4, D), -0.5))


def test_sample_has_no_gradient_and_rsample_has() -> None:
    dist = _coupling_dist()
    assert not dist.sample(3).requires_grad
    assert dist.rsample(3).requires_grad


def test_rsample_gives_the_reparameterization_gradient_of_a_known_expectation() -> None:
    """x = (z - t) exp(-s) for z ~ N(0, 1) (the inverse of an affine flow): E[x^2] =
    exp(-2s) + t^2, so dE/dt = 2t and dE/ds = -2 exp(-2s). The Monte Carlo gradient
    through rsample must agree within 5 standard errors (a false alarm about 1e-6)."""
    flow = flows.ActNorm(1)
    flow.initialized.fill_(True)
    flow._is_initialized = True
    with torch.no_grad():  # ActNorm: z = (x + bias) exp(log_scale), so x = z exp(-s) - bias
        flow.bias.fill_(0.7)
        flow.log_scale.fill_(0.4)
    dist = flows.FlowDistribution(flow, flows.StandardNormal(1))
    n = 100_000
    per_sample = []
    for _ in range(n // 10_000):
        flow.zero_grad()
        dist.rsample(10_000).square().mean().backward()
        per_sample.append(torch.stack([flow.bias.grad[0].clone(), flow.log_scale.grad[0].clone()]))
    estimates = torch.stack(per_sample)
    mean, stderr = estimates.mean(0), estimates.std(0) / math.sqrt(len(per_sample))
    exact = torch.tensor([2 * 0.7, -2 * math.exp(-0.8)])  # d/d bias of (x^2) with x = z e^{-s} - bias
    assert bool(((mean - exact).abs() < 5 * stderr + 1e-3).all()), (mean, exact, stderr)


def test_sample_and_log_prob_equals_sample_then_log_prob_with_gradients() -> None:
    dist = _coupling_dist(context=K)
    context = torch.randn(4, K)
    params = list(dist.parameters())
    torch.manual_seed(11)
    x, log_p = dist.sample_and_log_prob(3, context, temperature=0.8)
    grads = torch.autograd.grad(log_p.sum(), params)
    torch.manual_seed(11)
    x2 = dist.rsample(3, context, temperature=0.8)
    log_p2 = dist.log_prob(x2, context)
    grads2 = torch.autograd.grad(log_p2.sum(), params)
    torch.testing.assert_close(x, x2)
    torch.testing.assert_close(log_p, log_p2)
    for g, g2 in zip(grads, grads2):
        torch.testing.assert_close(g, g2)


def test_learnable_and_mixture_bases_under_a_flow() -> None:
    for base in (flows.DiagonalNormal(D, context_features=K), flows.GaussianMixture(D, 3, context_features=K)):
        perturb(base, 0.2)
        dist = flows.FlowDistribution(_coupling_dist(context=K).transform, base)
        context = torch.randn(4, K)
        x, log_p = dist.sample_and_log_prob(2, context)
        torch.testing.assert_close(log_p, dist.log_prob(x, context))


# torch distributions as bases


def test_any_torch_distribution_serves_as_a_base() -> None:
    loc, scale = torch.tensor([0.5, -1.0, 0.0]), torch.tensor([1.0, 2.0, 0.5])
    base = Independent(Normal(loc, scale), 1)
    dist = flows.FlowDistribution(flows.ScalarAffine(2.0), base)
    x = torch.randn(5, D)
    torch.testing.assert_close(dist.log_prob(x), base.log_prob(2 * x) + D * math.log(2.0))
    assert dist.sample(4).shape == (4, D)
    x, log_p = dist.sample_and_log_prob(6)
    torch.testing.assert_close(log_p, dist.log_prob(x))
    with pytest.raises(ValueError, match=r"base Independent has no temperature"):
        dist.sample(2, temperature=0.5)
    with pytest.raises(ValueError, match=r"expects a base with batch_shape \(\) .* got Normal with batch_shape \(3,\)"):
        flows.FlowDistribution(flows.ScalarAffine(2.0), Normal(loc, scale))


# Modules: compile, functional_call, errors


def test_compile_and_functional_call_go_through_forward() -> None:
    dist = _coupling_dist()
    x = torch.randn(4, D)
    compiled = torch.compile(dist, backend="eager")
    torch.testing.assert_close(compiled(x), dist.log_prob(x))
    zeros = {name: torch.zeros_like(p) for name, p in dist.named_parameters()}  # zero nets: the identity flow
    torch.testing.assert_close(
        torch.func.functional_call(dist, zeros, (x,)), Normal(0.0, 1.0).log_prob(x).sum(-1)
    )


def test_bad_input_is_refused_with_a_clear_error() -> None:
    dist = _coupling_dist(context=K)  # float64 (the tests' default)
    context = torch.randn(4, K)
    with pytest.raises(TypeError, match=r"expects input of dtype torch.float64 \(its parameters'\), got torch.float32"):
        dist.log_prob(torch.randn(4, D, dtype=torch.float32), context)
    with pytest.raises(ValueError, match=r"FlowDistribution expects a temperature >= 0, got -1"):
        dist.sample(2, context, temperature=-1)
    with pytest.raises(ValueError, match=r"FlowDistribution expects samples of shape \(\.\.\., 3\), got \(4, 2\)"):
        dist.log_prob(torch.randn(4, 2), context)
    with pytest.raises(ValueError, match=r"expects a sample shape of sizes >= 0, got \(-1,\)"):
        dist.sample(-1, context)
    with pytest.raises(ValueError, match=r"broadcasts to the samples' leading shape \(4,\), got \(3, 2\)"):
        dist.log_prob(torch.randn(4, D), torch.randn(3, K))
    with pytest.raises(TypeError, match=r"FlowDistribution expects a flows.Flow as transform, got Linear"):
        flows.FlowDistribution(torch.nn.Linear(2, 2), flows.StandardNormal(2))


def test_a_context_given_to_an_unconditional_flow_is_refused() -> None:
    dist = _coupling_dist(context=0)
    with pytest.raises(ValueError, match=r"AffineCoupling was built without context \(context_features=0\) but got a"):
        dist.log_prob(torch.randn(4, D), torch.randn(4, K))
