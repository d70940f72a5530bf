"""Sequential, Inverse and the Flow base class."""

from __future__ import annotations

import pytest
import torch

import flows
from flows.base import InverseFlow


def test_sequential_sums_logdets_and_inverts_in_reverse() -> None:
    a, b = flows.ActNorm(3), flows.InvConv1x1(3, lu=False)
    seq = flows.Sequential(a, flows.Reverse(), b)
    x = torch.randn(4, 3) * 2 + 1
    z, logdet = seq(x)
    za, la = a(x)
    zb, lb = b(za.flip(1))
    torch.testing.assert_close(z, zb)
    torch.testing.assert_close(logdet, la + lb)
    x_back, inverse_logdet = seq.inverse(z)
    torch.testing.assert_close(x_back, x)
    torch.testing.assert_close(inverse_logdet, -logdet)
    assert len(seq) == 3 and seq[1].__class__ is flows.Reverse and list(seq)[0] is a


def test_sequential_keeps_float32_logdets_under_half_inputs() -> None:
    seq = flows.Sequential(flows.Reverse(), flows.Reverse())
    _, logdet = seq(torch.randn(2, 3, dtype=torch.bfloat16))
    assert logdet.dtype == torch.float32


def test_sequential_rejects_non_flows() -> None:
    with pytest.raises(TypeError, match="Sequential expects flows.Flow instances, got Linear at position 1"):
        flows.Sequential(flows.Reverse(), torch.nn.Linear(2, 2))


def test_inverse_swaps_directions() -> None:
    f = flows.ActNorm(2)
    f(torch.randn(8, 2) * 3)
    g = flows.Inverse(f)
    assert isinstance(g, InverseFlow)
    x = torch.randn(3, 2)
    torch.testing.assert_close(g(x)[0], f.inverse(x)[0])
    torch.testing.assert_close(g.inverse(x)[1], f(x)[1])


def test_inverse_of_inverse_is_the_flow_itself() -> None:
    f = flows.Reverse()
    assert flows.Inverse(flows.Inverse(f)) is f


def test_inverse_rejects_non_flows() -> None:
    with pytest.raises(TypeError, match="Inverse expects a flows.Flow, got Linear"):
        flows.Inverse(torch.nn.Linear(2, 2))


def test_base_class_without_inverse_raises_named_error() -> None:
    class ForwardOnly(flows.Flow):
        def forward(self, x, context=None):
            return x, torch.zeros(x.shape[0])

    with pytest.raises(flows.InverseNotAvailable, match="ForwardOnly has no closed-form inverse"):
        ForwardOnly().inverse(torch.randn(2, 2))
