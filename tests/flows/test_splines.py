"""Tests of flows/splines.py: the rational-quadratic spline primitive."""

from __future__ import annotations

import pytest
import torch

from flows import splines
from flows.splines import rational_quadratic_spline, spline_param_count

F64 = torch.float64
F32 = torch.float32
BOUND = 3.0


def _params(shape: tuple[int, ...], num_bins: int, std: float = 1.0, dtype=F64):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(*shape, num_bins, generator=g, dtype=dtype) * std
    h = torch.randn(*shape, num_bins, generator=g, dtype=dtype) * std
    d = torch.randn(*shape, num_bins - 1, generator=g, dtype=dtype) * std
    return w, h, d


def _knots(w: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The knots exactly as the spline computes them (same float operations)."""
    x_knots, _ = splines._knots(w, BOUND, 1e-3)
    y_knots, _ = splines._knots(h, BOUND, 1e-3)
    return x_knots, y_knots


def _autograd_log_derivative(inputs: torch.Tensor, params, inverse: bool) -> torch.Tensor:
    """``log d out_i / d in_i`` by autograd; the map is elementwise, so the gradient of
    the sum is the diagonal of the Jacobian."""
    inputs = inputs.clone().requires_grad_(True)
    out, _ = rational_quadratic_spline(inputs, *params, inverse=inverse, tail_bound=BOUND)
    (grad,) = torch.autograd.grad(out.sum(), inputs)
    return grad.log()


def test_param_count():
    assert spline_param_count(1) == 2
    assert spline_param_count(8) == 23


@pytest.mark.parametrize("inverse", [False, True])
def test_zero_parameters_give_the_identity(inverse):
    x = torch.linspace(-5, 5, 101, dtype=F64)
    w, h, d = (torch.zeros(101, 6, dtype=F64), torch.zeros(101, 6, dtype=F64), torch.zeros(101, 5, dtype=F64))
    y, logabsdet = rational_quadratic_spline(x, w, h, d, inverse=inverse, tail_bound=BOUND)
    torch.testing.assert_close(y, x, atol=1e-15, rtol=0)
    torch.testing.assert_close(logabsdet, torch.zeros_like(x), atol=1e-15, rtol=0)


def test_one_bin_is_the_identity():
    # One bin with derivative 1 at both ends and slope 1 is the line y = x.
    x = torch.linspace(-4, 4, 17, dtype=F64)
    y, logabsdet = rational_quadratic_spline(x, *_params((17,), 1), tail_bound=BOUND)
    torch.testing.assert_close(y, x, atol=1e-14, rtol=0)
    torch.testing.assert_close(logabsdet, torch.zeros_like(x), atol=1e-14, rtol=0)


@pytest.mark.parametrize("num_bins", [2, 8])
def test_monotonic_and_maps_the_interval_onto_itself(num_bins):
    x = torch.linspace(-4, 4, 4001, dtype=F64)
    one = _params((), num_bins, std=2.0)
    params = [p.expand(4001, -1) for p in one]
    y, logabsdet = rational_quadratic_spline(x, *params, tail_bound=BOUND)
    assert bool((y[1:] > y[:-1]).all())
    assert bool(torch.isfinite(logabsdet).all())
    edges = torch.tensor([-BOUND, BOUND], dtype=F64)
    ends = rational_quadratic_spline(edges, *[p.expand(2, -1) for p in one], tail_bound=BOUND)
    torch.testing.assert_close(ends[0], edges, atol=1e-14, rtol=0)
    # Derivative 1 at +-B: the map is C1 across the identity tails.
    torch.testing.assert_close(ends[1], torch.zeros(2, dtype=F64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("inverse", [False, True])
def test_logabsdet_is_log_of_the_autograd_derivative(inverse):
    x = torch.cat([torch.linspace(-4.5, 4.5, 37, dtype=F64), torch.tensor([-BOUND, BOUND], dtype=F64)])
    params = _params(x.shape, 5)
    _, logabsdet = rational_quadratic_spline(x, *params, inverse=inverse, tail_bound=BOUND)
    expected = _autograd_log_derivative(x, params, inverse)
    torch.testing.assert_close(logabsdet, expected, atol=1e-10, rtol=1e-10)


def test_inverse_logabsdet_is_minus_the_forward_at_the_matching_point():
    x = torch.linspace(-4, 4, 81, dtype=F64)
    params = _params(x.shape, 8)
    y, forward_logabsdet = rational_quadratic_spline(x, *params, tail_bound=BOUND)
    x_back, inverse_logabsdet = rational_quadratic_spline(y, *params, inverse=True, tail_bound=BOUND)
    torch.testing.assert_close(x_back, x, atol=1e-12, rtol=0)
    torch.testing.assert_close(inverse_logabsdet, -forward_logabsdet, atol=1e-10, rtol=0)


def test_inputs_exactly_on_knots():
    num_bins = 6
    w, h, d = _params((num_bins + 1,), num_bins)
    x_knots, y_knots = _knots(w, h)
    # Element k has its own parameters and sits on its own knot k; -B and B included.
    x, y_expected = torch.diagonal(x_knots), torch.diagonal(y_knots)
    knot_derivative = torch.diagonal(splines._derivatives(d, 1e-3))
    y, logabsdet = rational_quadratic_spline(x, w, h, d, tail_bound=BOUND)
    torch.testing.assert_close(y, y_expected, atol=1e-14, rtol=0)
    torch.testing.assert_close(logabsdet, knot_derivative.log(), atol=1e-12, rtol=0)
    expected = _autograd_log_derivative(x, (w, h, d), inverse=False)
    torch.testing.assert_close(logabsdet, expected, atol=1e-10, rtol=1e-10)
    x_back, inverse_logabsdet = rational_quadratic_spline(y, w, h, d, inverse=True, tail_bound=BOUND)
    torch.testing.assert_close(x_back, x, atol=1e-14, rtol=0)
    torch.testing.assert_close(inverse_logabsdet, -logabsdet, atol=1e-12, rtol=0)


def test_a_batch_entirely_in_the_tails():
    x = torch.tensor([-7.0, -3.0001, 3.0001, 1e6], dtype=F64, requires_grad=True)
    params = [p.requires_grad_(True) for p in _params((4,), 4)]
    for inverse in (False, True):
        y, logabsdet = rational_quadratic_spline(x, *params, inverse=inverse, tail_bound=BOUND)
        assert torch.equal(y, x.detach()) and torch.equal(logabsdet, torch.zeros(4, dtype=F64))
        grads = torch.autograd.grad(y.sum() + logabsdet.sum(), [x, *params])
        assert torch.equal(grads[0], torch.ones(4, dtype=F64))
        assert all(bool((g == 0).all()) for g in grads[1:])  # no NaN leaks from the spline branch


def test_gradients_are_finite_everywhere():
    x = torch.cat([torch.linspace(-5, 5, 41, dtype=F64), torch.tensor([-BOUND, BOUND], dtype=F64)])
    params = [p.requires_grad_(True) for p in _params(x.shape, 8, std=3.0)]
    for inverse in (False, True):
        y, logabsdet = rational_quadratic_spline(x, *params, inverse=inverse, tail_bound=BOUND)
        grads = torch.autograd.grad((y + logabsdet).sum(), params)
        assert all(bool(torch.isfinite(g).all()) for g in grads)


def test_float32_round_trip_inside_and_outside_the_tails():
    g = torch.Generator().manual_seed(0)
    n, worst_x, worst_logdet = 100_000, 0.0, 0.0
    for num_bins in (2, 8, 16):
        x = torch.empty(n, dtype=F32).uniform_(-4, 4, generator=g)  # a quarter in the tails
        params = [torch.randn(n, k, generator=g, dtype=F32) * 0.5 for k in (num_bins, num_bins, num_bins - 1)]
        y, logabsdet = rational_quadratic_spline(x, *params, tail_bound=BOUND)
        x_back, inverse_logabsdet = rational_quadratic_spline(y, *params, inverse=True, tail_bound=BOUND)
        worst_x = max(worst_x, float((x_back - x).abs().max()))
        worst_logdet = max(worst_logdet, float((logabsdet + inverse_logabsdet).abs().max()))
    # Measured (5 seeds, K in 2/8/16, 1e5 points each): max |x_back - x| = 1.3e-5 and
    # max |logdet_f + logdet_i| = 4.6e-5. The error is the rounding of y (ulp(3) = 2.4e-7)
    # times the inverse's slope dx/dy, which reaches ~300 for these parameters; the
    # bounds are ~10x above the measurements.
    assert worst_x < 1e-4
    assert worst_logdet < 5e-4


def _textbook_discriminant(y, w, h, d) -> torch.Tensor:
    """``b^2 - 4ac`` of the inverse's quadratic as usually written (NSF, appendix A), for
    inputs in the first of two bins, in the inputs' dtype."""
    x_knots, y_knots = _knots(w, h)
    width, height = x_knots[:, 1] - x_knots[:, 0], y_knots[:, 1] - y_knots[:, 0]
    d_k, d_k1 = torch.ones_like(y), splines._derivatives(d, 1e-3)[:, 1]
    slope, offset = height / width, y - y_knots[:, 0]
    kappa = d_k + d_k1 - 2 * slope
    a, b, c = height * (slope - d_k) + offset * kappa, height * d_k - offset * kappa, -slope * offset
    return b * b - 4 * a * c


def test_near_zero_discriminant_in_float32():
    # Found by a search: y an ulp-scale distance below the top knot of a steep first bin
    # whose right derivative is near its minimum. The true discriminant, (h d_{k+1})^2, is
    # tiny next to b^2, and b^2 - 4ac as usually written rounds below zero in float32.
    hexes = [["-0x1.9ead6cp+1", "-0x1.e3f9ecp-1"], ["0x1.c6c49p+1", "-0x1.4c6b1p+0"], ["-0x1.febd86p+3"]]
    w, h, d = (torch.tensor([[float.fromhex(v) for v in row]], dtype=F32) for row in hexes)
    y = torch.tensor([float.fromhex("0x1.79495ep+1")], dtype=F32, requires_grad=True)
    assert float(_textbook_discriminant(y.detach(), w, h, d)) < 0, "the case no longer tests this"
    params = [p.requires_grad_(True) for p in (w, h, d)]
    x, inverse_logabsdet = rational_quadratic_spline(y, *params, inverse=True, tail_bound=BOUND)
    assert bool(torch.isfinite(x).all()) and bool(torch.isfinite(inverse_logabsdet).all())
    # dx/dy ~ 1e3 here; autograd through the root must agree with the reported logdet
    # (a discriminant clamped to 0 would cut sqrt's gradient and get ~4e-3 instead).
    grads = torch.autograd.grad(x.sum(), [y, *params])
    torch.testing.assert_close(grads[0].log(), inverse_logabsdet.detach(), atol=1e-3, rtol=0)
    assert all(bool(torch.isfinite(g).all()) for g in grads)
    with torch.no_grad():
        y_back, logabsdet = rational_quadratic_spline(x, w, h, d, tail_bound=BOUND)
        # dy/dx ~ 1e-3, so the float32 x maps back within a few ulps of y.
        assert float((y_back - y).abs().max()) < 1e-5
        assert float((logabsdet + inverse_logabsdet).abs().max()) < 1e-4


def test_linear_bin_has_a_zero_leading_coefficient():
    # Equal derivatives and slope make a = 0: the textbook (-b + sqrt) / 2a would be 0/0.
    y = torch.linspace(-2.9, 2.9, 11, dtype=torch.float32)
    zeros = [torch.zeros(11, k, dtype=F32) for k in (4, 4, 3)]
    x, logabsdet = rational_quadratic_spline(y, *zeros, inverse=True, tail_bound=BOUND)
    torch.testing.assert_close(x, y, atol=1e-6, rtol=0)
    assert bool(torch.isfinite(logabsdet).all())


@pytest.mark.parametrize(
    ("shapes", "kwargs", "match"),
    [
        (((3,), (3, 4), (3, 5), (3, 3)), {}, r"K >= 1 widths, K heights and K - 1 interior"),
        (((3,), (3, 4), (3, 4), (3, 4)), {}, r"K >= 1 widths, K heights and K - 1 interior"),
        (((3,), (3, 0), (3, 0), (3, 0)), {}, r"K >= 1 widths"),
        (((3,), (2, 4), (2, 4), (2, 3)), {}, r"unnormalized_widths of shape \(\*inputs.shape, n\)"),
        (((3,), (3, 4), (3, 4), (3, 4, 3)), {}, r"unnormalized_derivatives of shape"),
        (((3,), (3, 4), (3, 4), (3, 3)), {"tail_bound": 0.0}, r"tail_bound > 0, got 0.0"),
        (((3,), (3, 4), (3, 4), (3, 3)), {"min_bin_width": 0.3}, r"below 1 / 4, got 0.3"),
    ],
)
def test_bad_arguments_raise(shapes, kwargs, match):
    tensors = [torch.zeros(s) for s in shapes]
    with pytest.raises(ValueError, match=match):
        rational_quadratic_spline(*tensors, **kwargs)
