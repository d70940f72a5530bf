"""StandardNormal and FlowDistribution."""

from __future__ import annotations

import math

import pytest
import torch

import flows


def test_standard_normal_log_prob() -> None:
    base = flows.StandardNormal((2, 3))
    z = torch.randn(4, 2, 3)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(z).flatten(1).sum(1)
    torch.testing.assert_close(base.log_prob(z), expected)


def test_standard_normal_shape_error() -> None:
    with pytest.raises(ValueError, match=r"StandardNormal expects samples of shape \(B, 3\), got \(4, 2\)"):
        flows.StandardNormal(3).log_prob(torch.randn(4, 2))


def test_temperature_scales_samples() -> None:
    base = flows.StandardNormal(1000)
    torch.manual_seed(1)
    z = base.sample(20, temperature=0.5)
    assert z.shape == (20, 1000)
    assert abs(float(z.std()) - 0.5) < 0.01


def test_log_prob_is_base_plus_logdet() -> None:
    transform = flows.ScalarAffine(2.0, 1.0)
    dist = flows.FlowDistribution(transform, flows.StandardNormal(3))
    x = torch.randn(5, 3)
    z = 2 * x + 1
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1) + 3 * math.log(2.0)
    torch.testing.assert_close(dist.log_prob(x), expected)
    log_base, logdet = dist.log_prob_parts(x)
    torch.testing.assert_close(log_base + logdet, expected)


def test_sampling_inverts_the_transform() -> None:
    dist = flows.FlowDistribution(flows.ScalarAffine(2.0, 1.0), flows.StandardNormal(3))
    torch.manual_seed(0)
    x = dist.sample(4, temperature=0.0)
    torch.testing.assert_close(x, torch.full((4, 3), -0.5))


def test_sampling_with_context_needs_one_row_per_sample() -> None:
    dist = flows.FlowDistribution(flows.AffineCoupling(2, flows.nets.MLP, context_features=1), flows.StandardNormal(2))
    assert dist.sample(3, context=torch.randn(3, 1)).shape == (3, 2)
    with pytest.raises(ValueError, match=r"FlowDistribution.sample expects context with 3 rows, got \(2, 1\)"):
        dist.sample(3, context=torch.randn(2, 1))
