"""Tests of flows/autoregressive.py: MADE, MAF / IAF and the autoregressive spline flow."""

from __future__ import annotations

import pytest
import torch

from flows import splines
from flows.autoregressive import MADE, MaskedAffineAutoregressive, RQSplineAutoregressive
from flows.base import Inverse
from flows.jacobian import FlowCheckError, check_flow

F64 = torch.float64
D, K = 5, 2  # features, context features


def _random_parameters(module: torch.nn.Module, std: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """Every parameter replaced by N(0, std^2) draws of its own generator (unlike the registry's
    `perturb`, which adds noise to the initial values): the tolerances below were measured on these."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return module


def _inputs(batch: int, context_features: int, scale: float = 1.0):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, D, generator=g, dtype=F64) * scale
    context = torch.randn(batch, context_features, generator=g, dtype=F64) if context_features else None
    return x, context


def _made_jacobian(made: MADE, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
    """``d out[b, i, m] / d x[b, j]`` per sample: ``(B, D, M, D)``."""
    def one(v: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        return made(v[None], None if c is None else c[None])[0]

    in_dims = (0, None if context is None else 0)
    return torch.func.vmap(torch.func.jacrev(one), in_dims=in_dims)(x, context)


# --- MADE -----------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["natural", "reversed", "random"])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("context_features", [0, K])
def test_made_is_autoregressive_in_its_degrees(order, residual, context_features):
    # tanh has no dead units, so every path the masks allow carries a non-zero derivative
    made = MADE(D, 12, 3, num_blocks=2, order=order, seed=3, residual=residual,
                context_features=context_features, activation=torch.nn.Tanh).double()
    _random_parameters(made)
    x, context = _inputs(4, context_features)
    jac = _made_jacobian(made, x, context).detach().abs().amax(dim=(0, 2))  # (D_out, D_in)
    degrees = made.degrees
    allowed = degrees[None, :] < degrees[:, None]
    assert float(jac[~allowed].max()) == 0.0  # exactly zero: the masks, not round-off
    # and every allowed connection is used (hidden_features >= D - 1)
    assert bool((jac[allowed] > 0).all())


def test_made_context_reaches_every_output():
    made = _random_parameters(MADE(D, 12, 2, context_features=K, zero_init=False).double())
    x, context = _inputs(3, K)
    jac = torch.autograd.functional.jacobian(lambda c: made(x[:1], c[None])[0], context[0])
    assert bool((jac.abs().amax(dim=(1, 2)) > 0).all())  # feature of degree 1 included


def test_made_degrees_per_order():
    assert MADE(D, 8, 1, order="natural").degrees.tolist() == [1, 2, 3, 4, 5]
    assert MADE(D, 8, 1, order="reversed").degrees.tolist() == [5, 4, 3, 2, 1]
    first = MADE(D, 8, 1, order="random", seed=7).degrees
    assert sorted(first.tolist()) == [1, 2, 3, 4, 5]
    assert torch.equal(first, MADE(D, 8, 1, order="random", seed=7).degrees)


def test_made_starts_at_zero_and_has_the_right_shape():
    made = MADE(D, 8, 3).double()
    out = made(torch.randn(4, D, dtype=F64))
    assert out.shape == (4, D, 3) and bool((out == 0).all())


def test_made_with_one_feature_is_constant():
    made = _random_parameters(MADE(1, 4, 2).double())
    out = made(torch.randn(6, 1, dtype=F64))
    assert torch.equal(out, out[:1].expand_as(out))


def test_random_order_survives_a_state_dict_round_trip():
    flow = _random_parameters(MaskedAffineAutoregressive(D, 8, order="random", seed=1).double())
    copy = MaskedAffineAutoregressive(D, 8, order="random", seed=2).double()
    copy.load_state_dict(flow.state_dict())
    x, _ = _inputs(3, 0)
    assert torch.equal(copy.made.degrees, flow.made.degrees)
    torch.testing.assert_close(copy(x)[0], flow(x)[0], atol=0, rtol=0)


# --- flows against the oracle ---------------------------------------------------------


def _maf(order="natural", residual=False, context_features=0):
    return MaskedAffineAutoregressive(D, 10, order=order, seed=0, residual=residual,
                                      context_features=context_features)


def _spline(order="natural", residual=False, context_features=0):
    return RQSplineAutoregressive(D, 10, num_bins=4, tail_bound=3.0, order=order, seed=0,
                                  residual=residual, context_features=context_features)


FLOWS = {
    "maf": _maf,
    "iaf": lambda **kw: Inverse(_maf(**kw)),
    "spline": _spline,
}


@pytest.mark.parametrize("name", list(FLOWS))
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("context_features", [0, K])
@pytest.mark.parametrize(("order", "residual"), [("natural", False), ("random", True)])
def test_check_flow(name, batch, context_features, order, residual):
    flow = _random_parameters(FLOWS[name](order=order, residual=residual, context_features=context_features).double())
    x, context = _inputs(batch, context_features, scale=2.0)  # some |x| > 3: the spline's tails
    check_flow(flow, x, context)


def test_spline_flow_on_bin_edges_and_tail_bounds():
    flow = _random_parameters(_spline(context_features=K).double(), std=0.5)
    x, context = _inputs(3, K)
    first = int(torch.nonzero(flow.made.degrees == 1))
    # The first feature's spline depends on the context only; put its inputs on knots.
    with torch.no_grad():
        params = flow.made(x, context)[:, first]
    knots, _ = splines._knots(params[:, :4], 3.0, 1e-3)  # (B, 5) from -3 to 3
    x[:, first] = knots[:, [1, 2, 3]].diagonal()
    x[0, (first + 1) % D], x[1, (first + 1) % D] = -3.0, 3.0  # the tail bounds themselves
    check_flow(flow, x, context)


def test_spline_flow_batch_entirely_in_the_tails():
    flow = _random_parameters(_spline().double())
    x = torch.tensor([[4.0, -5.0, 3.5, -3.1, 7.0], [-9.0, 3.01, 4.0, 5.0, -6.0]], dtype=F64)
    z, logdet = flow(x)
    assert torch.equal(z, x) and torch.equal(logdet, torch.zeros(2, dtype=F64))
    check_flow(flow, x)


# The affine inverse is exact to round-off. The spline's closed-form root loses a few
# more digits where a bin is steep or flat (measured 1e-11 here), so it gets 1e-10.
@pytest.mark.parametrize(("name", "atol"), [("maf", 1e-12), ("iaf", 1e-12), ("spline", 1e-10)])
def test_inverse_is_exact(name, atol):
    flow = _random_parameters(FLOWS[name](context_features=K).double(), std=0.5)
    x, context = _inputs(16, K, scale=2.0)
    z, logdet = flow(x, context)
    x_back, inverse_logdet = flow.inverse(z, context)
    torch.testing.assert_close(x_back, x, atol=atol, rtol=0)
    torch.testing.assert_close(inverse_logdet, -logdet, atol=atol, rtol=0)
    z_back, _ = flow(flow.inverse(x, context)[0], context)
    torch.testing.assert_close(z_back, x, atol=atol, rtol=0)


@pytest.mark.parametrize("build", [MaskedAffineAutoregressive, RQSplineAutoregressive])
def test_new_layer_is_the_identity(build):
    flow = build(D, hidden_features=8).double()
    x, _ = _inputs(3, 0, scale=2.0)
    z, logdet = flow(x)
    torch.testing.assert_close(z, x, atol=1e-14, rtol=0)
    torch.testing.assert_close(logdet, torch.zeros(3, dtype=F64), atol=1e-14, rtol=0)


def test_gradients_reach_every_parameter():
    for flow in (_maf(context_features=K), _spline(residual=True, context_features=K)):
        flow = _random_parameters(flow.double())
        x, context = _inputs(3, K, scale=2.0)
        z, logdet = flow(x, context)
        (z.square().sum() - logdet.sum()).backward()
        assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in flow.parameters())


def test_declared_mask_follows_the_order():
    mask = _maf(order="reversed").jacobian_mask((D,))
    assert torch.equal(mask, torch.ones(D, D, dtype=torch.bool).triu())
    assert torch.equal(_maf().jacobian_mask((D,)), torch.ones(D, D, dtype=torch.bool).tril())


# --- the oracle catches broken variants -----------------------------------------------


class _ClaimsDiagonal(MaskedAffineAutoregressive):
    """Claims an elementwise Jacobian, which a MAF does not have."""

    def jacobian_mask(self, shape):
        return torch.eye(shape[0], dtype=torch.bool)


def test_a_false_mask_claim_is_caught():
    flow = _random_parameters(_ClaimsDiagonal(D, 10).double())
    x, _ = _inputs(3, 0)
    with pytest.raises(FlowCheckError, match="declared Jacobian structure violated"):
        check_flow(flow, x)


def test_a_leaky_made_is_caught():
    flow = _random_parameters(_maf().double())
    flow.made.first.mask.fill_(True)  # every hidden unit now sees every input
    x, _ = _inputs(3, 0)
    with pytest.raises(FlowCheckError, match="declared Jacobian structure violated"):
        check_flow(flow, x)


# --- errors ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["maf", "spline"])
@pytest.mark.parametrize("direction", ["forward", "inverse"])
@pytest.mark.parametrize(
    ("x_shape", "context_shape", "match"),
    [
        ((3, D, 2, 2), (3, K), r"expects input of rank 2 \(B, D\), got shape \(3, 5, 2, 2\)"),
        ((3, D + 1), (3, K), r"expects 5 features on dim 1, got input of shape \(3, 6\)"),
        ((3, D), (2, K), r"expects context of shape \(3, 2\), got \(2, 2\)"),
        ((3, D), (3, K, 1), r"expects context of shape \(3, 2\), got \(3, 2, 1\)"),
        ((3, D), None, r"built with context_features=2 but got context=None"),
    ],
)
def test_bad_input_raises(name, direction, x_shape, context_shape, match):
    flow = FLOWS[name](context_features=K).double()
    x = torch.randn(x_shape, dtype=F64)
    context = None if context_shape is None else torch.randn(context_shape, dtype=F64)
    with pytest.raises(ValueError, match=match):
        getattr(flow, direction)(x, context)


def test_made_bad_input_raises():
    made = MADE(D, 8, 2, context_features=K)
    with pytest.raises(ValueError, match=r"MADE expects 5 features on dim 1"):
        made(torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"MADE was built with context_features=2 but got context=None"):
        made(torch.randn(3, D))


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: MADE(D, 8, 2, order="sorted"), r"MADE order must be one of \('natural', 'reversed', 'random'\)"),
        (lambda: MADE(0, 8, 2), r"MADE features must be an integer >= 1, got 0"),
        (lambda: MADE(D, 8, 0), r"MADE out_multiplier must be an integer >= 1, got 0"),
        (lambda: MADE(D, 8, 2, num_blocks=-1), r"MADE num_blocks must be an integer >= 0, got -1"),
        (lambda: MaskedAffineAutoregressive(D, clamp=0.0), r"clamp must be > 0, got 0.0"),
        (lambda: RQSplineAutoregressive(D, num_bins=0), r"num_bins must be an integer >= 1, got 0"),
        (lambda: RQSplineAutoregressive(D, tail_bound=-1.0), r"tail_bound must be > 0, got -1.0"),
        (lambda: _maf().jacobian_mask((D + 1,)), r"has 5 features, got sample shape \(6,\)"),
    ],
)
def test_bad_construction_raises(build, match):
    with pytest.raises(ValueError, match=match):
        build()
