"""flows/bases.py: the base distributions as torch distributions and modules."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Categorical, Distribution, Independent, MixtureSameFamily, Normal

import flows
from tests.registry import perturb

D, K = 3, 2


def test_standard_normal_log_prob_over_any_leading_shape() -> None:
    base = flows.StandardNormal((2, 3))
    z = torch.randn(4, 5, 2, 3)
    expected = Normal(0.0, 1.0).log_prob(z).flatten(2).sum(-1)
    torch.testing.assert_close(base.log_prob(z), expected)
    assert isinstance(base, Distribution) and base.event_shape == (2, 3) and base.batch_shape == ()


def test_standard_normal_shape_error() -> None:
    with pytest.raises(ValueError, match=r"StandardNormal expects samples of shape \(\.\.\., 3\), got \(4, 2\)"):
        flows.StandardNormal(3).log_prob(torch.randn(4, 2))


def test_temperature_scales_samples() -> None:
    z = flows.StandardNormal(1000).sample(20, temperature=0.5)
    assert z.shape == (20, 1000)
    assert abs(float(z.std()) - 0.5) < 0.01


def test_diagonal_normal_matches_torch_and_learns() -> None:
    base = flows.DiagonalNormal((2, 2))
    with torch.no_grad():
        base.loc.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
        base.log_scale.copy_(torch.tensor([0.1, -0.3, 0.0, 0.7]))
    z = torch.randn(6, 2, 2)
    reference = Independent(Normal(base.loc.detach().view(2, 2), base.log_scale.detach().exp().view(2, 2)), 2)
    torch.testing.assert_close(base.log_prob(z), reference.log_prob(z))
    x = base.rsample((40_000,))
    torch.testing.assert_close(x.mean(0).flatten(), base.loc.detach(), atol=0.05, rtol=0)
    x.sum().backward()
    assert base.loc.grad is not None and base.log_scale.grad is not None


def test_diagonal_normal_with_context() -> None:
    base = flows.DiagonalNormal((D,), context_features=K)
    perturb(base, 0.3)
    context = torch.randn(4, K)
    assert base.rsample((5,), context).shape == (5, 4, D)
    z = torch.randn(4, D)
    h = base.net(context).view(4, 2, D)
    reference = Independent(Normal(h[:, 0], h[:, 1].exp()), 1)
    torch.testing.assert_close(base.log_prob(z, context), reference.log_prob(z))
    with pytest.raises(ValueError, match=r"DiagonalNormal expects a context of shape \(\.\.\., 2\), got None"):
        base.log_prob(z)


def test_gaussian_mixture_matches_torch() -> None:
    mixture = flows.GaussianMixture((D,), num_components=4)
    perturb(mixture, 0.5)
    reference = MixtureSameFamily(
        Categorical(logits=mixture.logits.detach()),
        Independent(Normal(mixture.loc.detach(), mixture.log_scale.detach().exp()), 1),
    )
    z = torch.randn(7, D) * 2
    torch.testing.assert_close(mixture.log_prob(z), reference.log_prob(z))
    x = mixture.sample((50_000,))
    torch.testing.assert_close(x.mean(0), reference.mean, atol=0.05, rtol=0)


def test_gaussian_mixture_with_context_and_bad_arguments() -> None:
    mixture = flows.GaussianMixture((D,), num_components=3, context_features=K)
    context = torch.randn(5, K)
    assert mixture.rsample((2,), context).shape == (2, 5, D)
    assert mixture.log_prob(torch.randn(2, 5, D), context).shape == (2, 5)
    with pytest.raises(ValueError, match=r"GaussianMixture expects num_components >= 1, got 0"):
        flows.GaussianMixture((D,), num_components=0)
    with pytest.raises(ValueError, match=r"GaussianMixture was built without context"):
        flows.GaussianMixture((D,)).log_prob(torch.randn(2, D), context)
