"""flows/derivatives.py: score, Hessian-vector products, Hessians and the Laplacian of log p,
against closed forms and against autograd's per-sample Hessian."""

from __future__ import annotations

from functools import partial

import pytest
import torch

import flows
from flows.derivatives import hessian, hessian_vector_product, laplacian, score
from flows.nets import MLP
from tests.registry import perturb

D, K = 4, 2


def _gaussian() -> tuple[flows.FlowDistribution, torch.Tensor, torch.Tensor]:
    """z = W x + b with z ~ N(0, I): x ~ N(mu, Sigma) with Sigma^-1 = W^T W, mu = -W^-1 b."""
    linear = flows.InvConv1x1(D, lu=False, seed=1)
    with torch.no_grad():
        linear.weight.add_(torch.randn(D, D) * 0.5)
    shift = 0.3
    dist = flows.FlowDistribution(flows.Sequential(linear, flows.ScalarAffine(1.0, shift)), flows.StandardNormal(D))
    weight = linear.weight.detach()
    precision = weight.T @ weight
    mean = -torch.linalg.solve(weight, torch.full((D,), shift))
    return dist, precision, mean


def _nonlinear(context: int = 0) -> flows.FlowDistribution:
    torch.manual_seed(5)
    net = partial(MLP, hidden_features=8)
    flow = flows.Sequential(
        flows.AffineCoupling(D, net, context_features=context), flows.InvConv1x1(D),
        flows.RQSplineCoupling(D, net, parity=1, context_features=context, num_bins=4),
    )
    perturb(flow, 0.3)
    return flows.FlowDistribution(flow, flows.StandardNormal(D))


def test_score_and_hessian_of_a_gaussian_pushed_through_an_affine_flow() -> None:
    dist, precision, mean = _gaussian()
    x = torch.randn(5, D)
    torch.testing.assert_close(score(dist, x), -(x - mean) @ precision.T)
    torch.testing.assert_close(hessian(dist, x), -precision.expand(5, D, D))
    v = torch.randn(5, D)
    torch.testing.assert_close(hessian_vector_product(dist, x, v), -v @ precision.T)
    torch.testing.assert_close(laplacian(dist, x), -precision.trace().expand(5))


def test_a_2d_density_of_known_form() -> None:
    """z = sigmoid(x) ~ N(0, 1) per coordinate: log p = -s^2/2 + log s + log(1 - s) + c, s = sigmoid(x)."""
    dist = flows.FlowDistribution(flows.Inverse(flows.Logit(0.0)), flows.StandardNormal(2))
    x = torch.randn(6, 2) * 2
    s = torch.sigmoid(x)
    ds = s * (1 - s)
    expected_score = -s * ds + 1 - 2 * s
    expected_second = -(ds * ds + s * ds * (1 - 2 * s)) - 2 * ds
    torch.testing.assert_close(score(dist, x), expected_score)
    torch.testing.assert_close(hessian(dist, x), torch.diag_embed(expected_second))
    torch.testing.assert_close(laplacian(dist, x), expected_second.sum(-1))


@pytest.mark.parametrize("context", [0, K])
def test_hessian_equals_autograds_per_sample_hessian(context: int) -> None:
    dist = _nonlinear(context)
    x = torch.randn(3, D)
    ctx = torch.randn(3, K) if context else None
    reference = torch.stack([
        torch.autograd.functional.hessian(
            lambda xi, i=i: dist.log_prob(xi[None], None if ctx is None else ctx[i : i + 1])[0], x[i]
        )
        for i in range(3)
    ])
    torch.testing.assert_close(hessian(dist, x, ctx), reference)
    v = torch.randn(3, D)
    torch.testing.assert_close(hessian_vector_product(dist, x, v, ctx), torch.einsum("bij,bj->bi", reference, v))


def test_image_shaped_samples_flatten_in_the_hessian() -> None:
    dist = flows.FlowDistribution(flows.ScalarAffine(2.0), flows.StandardNormal((1, 2, 2)))
    x = torch.randn(2, 1, 2, 2)
    assert score(dist, x).shape == x.shape
    torch.testing.assert_close(hessian(dist, x), -4 * torch.eye(4).expand(2, 4, 4))


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_hutchinson_laplacian_is_unbiased(kind: str) -> None:
    """The mean of n probes against the exact trace, within 5 standard errors (a false alarm
    below 1e-6 per sample); the variance of one probe is known from the exact Hessian:
    2 (||H||_F^2 - sum H_ii^2) for Rademacher probes, 2 ||H||_F^2 for Gaussian ones."""
    dist = _nonlinear()
    x = torch.randn(3, D)
    exact_hessian = hessian(dist, x)
    exact = torch.diagonal(exact_hessian, dim1=-2, dim2=-1).sum(-1)
    frobenius = exact_hessian.pow(2).sum((-2, -1))
    variance = 2 * frobenius - (2 * torch.diagonal(exact_hessian, dim1=-2, dim2=-1).pow(2).sum(-1) if kind == "rademacher" else 0)
    n = 4000
    estimate = laplacian(dist, x, num_probes=n, kind=kind)
    assert bool(((estimate - exact).abs() <= 5 * (variance / n).sqrt() + 1e-12).all()), (estimate, exact)
    # and the test can fail: a biased estimate (the trace plus one) is caught
    assert not bool(((estimate + 1.0 - exact).abs() <= 5 * (variance / n).sqrt()).all())


def test_bad_arguments() -> None:
    dist = _nonlinear()
    x = torch.randn(2, D)
    with pytest.raises(ValueError, match=r"expects v shaped like x \(2, 4\), got \(2, 3\)"):
        hessian_vector_product(dist, x, torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"laplacian expects num_probes >= 1 or None \(exact\), got 0"):
        laplacian(dist, x, num_probes=0)


def test_eval_mode_caches_do_not_leak_out_of_torch_func() -> None:
    """An eval-mode 1x1 convolution caches its weight and a checkerboard coupling its mask;
    filled first inside torch.func, the cache held transform-wrapped tensors and the next
    call failed (and `hessian` fell back to its slow path)."""
    flow = flows.Sequential(flows.InvConv1x1(D), flows.AffineCoupling(D, partial(MLP, hidden_features=8), mask="checkerboard"))
    perturb(flow, 0.3)
    dist = flows.FlowDistribution(flow.eval(), flows.StandardNormal(D))
    x = torch.randn(3, D)
    first = torch.func.vmap(lambda v: flows.derivatives._hvp_forward_over_reverse(dist, x, v, None))(torch.randn(2, 3, D))
    again = torch.func.vmap(lambda v: flows.derivatives._hvp_forward_over_reverse(dist, x, v, None))(torch.randn(2, 3, D))
    assert first.shape == again.shape == (2, 3, D)
    torch.testing.assert_close(dist.log_prob(x), dist.log_prob(x))
