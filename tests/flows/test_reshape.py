"""Squeeze and Split."""

from __future__ import annotations

from functools import partial

import pytest
import torch

import flows
from flows.nets import GlowConvNet
from tests.registry import perturb


def test_squeeze_moves_each_block_into_channels() -> None:
    x = torch.arange(16.0).view(1, 1, 4, 4)
    y, logdet = flows.Squeeze()(x)
    assert y.shape == (1, 4, 2, 2) and torch.all(logdet == 0)
    # Channel i*2 + j holds pixel (i, j) of each 2x2 block.
    torch.testing.assert_close(y[0, :, 0, 0], torch.tensor([0.0, 1.0, 4.0, 5.0]))
    torch.testing.assert_close(y[0, 3], torch.tensor([[5.0, 7.0], [13.0, 15.0]]))


def test_squeeze_round_trip_with_factor_3() -> None:
    x = torch.randn(2, 2, 6, 3)
    squeeze = flows.Squeeze(3)
    y, _ = squeeze(x)
    assert y.shape == (2, 18, 2, 1)
    assert torch.equal(squeeze.inverse(y)[0], x)


def test_squeeze_odd_size_error() -> None:
    with pytest.raises(ValueError, match=r"Squeeze\(factor=2\) needs H and W divisible by 2, got input of shape \(8, 3, 7, 8\); pad or crop"):
        flows.Squeeze()(torch.randn(8, 3, 7, 8))


def test_squeeze_rank_error() -> None:
    with pytest.raises(ValueError, match=r"Squeeze expects input of rank 4 \(B, C, H, W\), got shape \(8, 3\)"):
        flows.Squeeze()(torch.randn(8, 3))


def test_unsqueeze_channel_error() -> None:
    with pytest.raises(ValueError, match=r"Squeeze\(factor=2\).inverse needs channels divisible by 4, got input of shape \(1, 6, 2, 2\)"):
        flows.Inverse(flows.Squeeze())(torch.randn(1, 6, 2, 2))


def test_split_keeps_the_shape_and_inverts_exactly() -> None:
    split = flows.Split(flows.ActNorm(3), features=5, kept=3, prior_net=partial(GlowConvNet, hidden_features=4))
    perturb(split)
    x = torch.randn(2, 5, 2, 2)
    z, logdet = split(x)
    assert z.shape == x.shape
    x_back, inverse_logdet = split.inverse(z)
    torch.testing.assert_close(x_back, x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(inverse_logdet, -logdet, rtol=1e-12, atol=1e-12)


def test_split_prior_starts_standard_normal() -> None:
    """With the prior net zero-initialized, the factored half passes unchanged."""
    split = flows.Split(flows.Reverse(), features=4, prior_net=partial(GlowConvNet, hidden_features=4))
    x = torch.randn(2, 4, 2, 2)
    z, logdet = split(x)
    torch.testing.assert_close(z[:, 2:], x[:, 2:], rtol=0, atol=0)
    assert torch.all(logdet == 0)


@pytest.mark.parametrize("kept", [0, 4])
def test_split_kept_must_leave_both_parts(kept: int) -> None:
    with pytest.raises(ValueError, match=f"Split needs 0 < kept < features, got kept={kept}, features=4"):
        flows.Split(flows.Reverse(), features=4, kept=kept)
