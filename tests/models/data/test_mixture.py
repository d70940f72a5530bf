"""Tests of models/data/mixture.py: the 10-D Gaussian mixture and its data set."""

from __future__ import annotations

import math

import pytest
import torch

from models.data import DataRequest
from models.data.mixture import GaussianMixture, load_mixture


def test_mixture_classes_are_its_weighted_components():
    mixture = GaussianMixture(dim=3, num_components=4)
    x, labels = mixture.sample_labeled(200, torch.Generator().manual_seed(0))
    per_class = torch.stack([mixture.log_prob_given(x, torch.full_like(labels, k)) for k in range(4)])
    torch.testing.assert_close(torch.logsumexp(per_class + mixture.log_weights[:, None], 0), mixture.log_prob(x))
    value, stderr = mixture.conditional_entropy()
    assert value < mixture.entropy()[0] and stderr > 0


def test_mixture_log_prob_is_exact() -> None:
    mixture = GaussianMixture(dim=10, num_components=4, seed=1)
    reference = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(logits=mixture.log_weights),
        torch.distributions.MultivariateNormal(mixture.means, scale_tril=mixture.scale_tril),
    )
    x = torch.cat([mixture.sample(50, torch.Generator().manual_seed(0)), 10 * torch.randn(5, 10)])
    torch.testing.assert_close(mixture.log_prob(x), reference.log_prob(x), rtol=1e-12, atol=1e-10)


def test_mixture_sampling_entropy_and_determinism() -> None:
    mixture = GaussianMixture()
    first = mixture.sample(4, torch.Generator().manual_seed(3))
    assert first.shape == (4, 10)
    assert torch.equal(first, GaussianMixture().sample(4, torch.Generator().manual_seed(3)))
    entropy, stderr = mixture.entropy()
    assert 0 < stderr < 0.02 and math.isfinite(entropy)
    # An independent Monte Carlo estimate agrees within a few standard errors.
    points = mixture.sample(20_000, torch.Generator().manual_seed(9))
    assert abs(float(-mixture.log_prob(points).mean()) - entropy) < 5 * stderr + 0.05
    assert len(mixture.bounds) == 10


def test_mixture_errors_and_registry() -> None:
    with pytest.raises(ValueError, match=r"GaussianMixture expected dim >= 1, .*got 0, 5 and 2.0"):
        GaussianMixture(dim=0)
    with pytest.raises(ValueError, match=r"GaussianMixture.log_prob: expected points of shape \(N, 10\), got \(3, 2\)"):
        GaussianMixture().log_prob(torch.zeros(3, 2))
    train = load_mixture(DataRequest(split="train", num_samples=100))
    test = load_mixture(DataRequest(split="test", num_samples=100))
    assert train.data.shape == (100, 10) and train.density is not None and train.kind == "vector"
    assert train.labels.shape == (100,) and train.num_classes == 5
    assert not torch.equal(train.data, test.data)
