"""Lipschitz networks (flows/lipschitz.py): the residual branches respect their declared bounds,
their exact Jacobians match autograd, and the errors name what came."""

from __future__ import annotations

import pytest
import torch

from flows.lipschitz import LipSwish, LipschitzConvNet, LipschitzMLP


pytestmark = pytest.mark.usefixtures("one_thread")


def test_mlp_and_convnet_jacobians_respect_their_bounds() -> None:
    torch.manual_seed(0)
    mlp = LipschitzMLP(4, 16, num_blocks=1, coefficient=0.9)
    net = LipschitzConvNet(2, 4, (3, 3), coefficient=0.9)
    for g, x in [(mlp, 3 * torch.randn(8, 4)), (net, 3 * torch.randn(4, 2, 3, 3))]:
        jac = torch.func.vmap(torch.func.jacrev(lambda v: g(v.unsqueeze(0)).squeeze(0)))(x)
        norms = torch.linalg.matrix_norm(jac.reshape(x.shape[0], x[0].numel(), -1), 2)
        assert norms.max() <= g.lipschitz_bound * (1 + 1e-6)


def test_lipswish_is_one_lipschitz_for_any_beta() -> None:
    act = LipSwish()
    x = torch.linspace(-20, 20, 4001)
    for beta in (-5.0, 0.0, 2.0, 30.0):
        with torch.no_grad():
            act.raw_beta.fill_(beta)
        slope = torch.func.vmap(torch.func.grad(lambda v: act(v)))(x)
        assert slope.abs().max() <= 1.0


def test_context_enters_as_a_bias() -> None:
    mlp = LipschitzMLP(3, 8, context_features=2)
    x = torch.randn(5, 3)
    assert not torch.allclose(mlp(x, torch.zeros(5, 2)), mlp(x, torch.ones(5, 2)))
    with pytest.raises(ValueError, match=r"expects context of shape \(5, 2\), got \(5, 3\)"):
        mlp(x, torch.zeros(5, 3))


def test_mlp_jacobian_by_forward_products_matches_autograd() -> None:
    torch.manual_seed(0)
    mlp = LipschitzMLP(3, 8, num_blocks=2, context_features=2)
    x, context = torch.randn(5, 3), torch.randn(5, 2)
    value, jac = mlp.value_and_jacobian(x, context)
    reference = torch.func.vmap(torch.func.jacrev(lambda v, c: mlp(v[None], c[None])[0]))(x, context)
    torch.testing.assert_close(value, mlp(x, context), rtol=0, atol=1e-14)
    torch.testing.assert_close(jac, reference, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("make", [
    lambda c: LipschitzMLP(2, 4, coefficient=c),
    lambda c: LipschitzConvNet(2, 4, (4, 4), coefficient=c),
])
def test_a_coefficient_of_one_or_more_is_refused(make) -> None:
    message = r"Lipschitz(MLP|ConvNet) coefficient must be in \(0, 1\) so that Lip\(g\) < 1 .*got 1.0"
    with pytest.raises(ValueError, match=message):
        make(1.0)


def test_bad_sizes() -> None:
    with pytest.raises(ValueError, match="LipschitzMLP num_blocks must be >= 0, got -1"):
        LipschitzMLP(2, 4, num_blocks=-1)
    with pytest.raises(ValueError, match="LipschitzConvNet num_blocks must be >= 0, got -2"):
        LipschitzConvNet(2, 4, (4, 4), num_blocks=-2)
