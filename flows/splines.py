"""Monotonic rational-quadratic splines (Neural Spline Flows), as pure tensor functions.

A spline with ``K`` bins maps ``[-B, B]`` onto itself through ``K`` rational-quadratic
pieces (Gregory & Delbourgo 1982) and is the identity outside it ("linear tails").
It is parametrized per element by ``K`` unnormalized bin widths, ``K`` unnormalized
bin heights and ``K - 1`` unnormalized derivatives at the interior knots; the
derivatives at ``±B`` are fixed to 1, so the map is continuously differentiable
across the tails. With all parameters zero the spline is the identity, so a
zero-initialized conditioner starts a flow as the identity.

References:
    Durkan, Bekasov, Murray & Papamakarios, "Neural Spline Flows", NeurIPS 2019,
    arXiv:1906.04032 (section 3 and appendix A).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["rational_quadratic_spline", "spline_param_count", "packed_spline"]


def spline_param_count(num_bins: int) -> int:
    """Parameters per element of a ``num_bins`` spline: ``K`` widths, ``K`` heights, ``K - 1``
    interior derivatives, that is ``3K - 1``.

    Example:
        >>> spline_param_count(8)
        23
    """
    return 3 * num_bins - 1


def _knots(unnormalized: Tensor, bound: float, minimum: float) -> tuple[Tensor, Tensor]:
    """Bin sizes from softmax, each at least ``minimum`` of the span; returns the knots
    ``(..., K + 1)`` from ``-bound`` to ``bound`` exactly and the sizes ``(..., K)``."""
    num_bins = unnormalized.shape[-1]
    fractions = minimum + (1 - minimum * num_bins) * torch.softmax(unnormalized, dim=-1)
    knots = F.pad(torch.cumsum(fractions, dim=-1), (1, 0))
    knots = 2 * bound * knots - bound
    # Pin the ends: cumsum's round-off must not leave a gap next to the tails.
    end = knots.new_full((*knots.shape[:-1], 1), bound)
    knots = torch.cat([-end, knots[..., 1:-1], end], dim=-1)
    return knots, knots[..., 1:] - knots[..., :-1]


def _derivatives(unnormalized: Tensor, minimum: float) -> Tensor:
    """Knot derivatives ``(..., K + 1)``: 1 at both ends, ``> minimum`` inside.

    The softplus is shifted so that a zero parameter gives derivative 1 (the identity).
    """
    shift = math.log(math.expm1(1 - minimum))
    interior = minimum + F.softplus(unnormalized + shift)
    one = interior.new_ones(*interior.shape[:-1], 1)
    return torch.cat([one, interior, one], dim=-1)


def _gather(values: Tensor, index: Tensor) -> Tensor:
    """``values[..., index]`` for a ``(...,)`` index, returning ``(...,)``."""
    return torch.gather(values, -1, index.unsqueeze(-1)).squeeze(-1)


def _clamp_unit(xi: Tensor) -> Tensor:
    """``xi`` clamped to ``[0, 1]`` in value, with the gradient of ``xi`` itself.

    Round-off can put ``xi`` a hair outside its bin (the inverse at ``y = B``, say); a
    plain clamp would zero the derivative there, so only the value is clamped.
    """
    return xi + (xi.clamp(0, 1) - xi).detach()


class _Bin(NamedTuple):
    """The bin each element falls in: left knot ``(x_k, y_k)``, width, height, and the
    derivatives at its left and right knots; every field shaped like the inputs."""

    x_k: Tensor
    width: Tensor
    y_k: Tensor
    height: Tensor
    d_k: Tensor
    d_k1: Tensor


def _log_derivative(xi: Tensor, b: _Bin) -> Tensor:
    """``log dy/dx`` at relative position ``xi`` in the bin (NSF, section 3)."""
    slope = b.height / b.width
    between = xi * (1 - xi)
    denominator = slope + (b.d_k + b.d_k1 - 2 * slope) * between
    numerator = slope**2 * (b.d_k1 * xi**2 + 2 * slope * between + b.d_k * (1 - xi) ** 2)
    return torch.log(numerator) - 2 * torch.log(denominator)


def _forward_in_bin(x: Tensor, b: _Bin) -> tuple[Tensor, Tensor]:
    """``y`` and ``log dy/dx`` for ``x`` inside ``[-B, B]`` (NSF, section 3)."""
    slope = b.height / b.width
    xi = _clamp_unit((x - b.x_k) / b.width)
    between = xi * (1 - xi)
    # The denominator is >= slope / 2 > 0 since xi (1 - xi) <= 1/4.
    denominator = slope + (b.d_k + b.d_k1 - 2 * slope) * between
    y = b.y_k + b.height * (slope * xi**2 + b.d_k * between) / denominator
    return y, _log_derivative(xi, b)


def _inverse_in_bin(y: Tensor, b: _Bin) -> tuple[Tensor, Tensor]:
    """``x`` and ``log dx/dy`` for ``y`` inside ``[-B, B]``.

    Inverting the bin's map means solving ``a xi^2 + beta xi + c = 0`` with
    ``a = h (s - d_k) + o kappa``, ``beta = h d_k - o kappa``, ``c = -s o``, where
    ``o = y - y_k`` and ``kappa = d_k + d_{k+1} - 2s`` (NSF, appendix A). The root in
    ``[0, 1]`` is taken in the stable form ``2c / (-beta - sqrt(beta^2 - 4ac))``.
    """
    slope = b.height / b.width
    offset = y - b.y_k  # >= 0: y lies at or above its bin's left knot
    beta = b.height * b.d_k - offset * (b.d_k + b.d_k1 - 2 * slope)
    # beta^2 - 4ac cancels catastrophically near the top of a bin whose right derivative
    # is small, and can round below zero. Since a = h s - beta, it equals the sum of two
    # non-negative terms, (beta + 2c)^2 + 4 s^2 o (h - o), which cannot; (h - o), which
    # round-off can make negative by an ulp at the top of a bin, is clamped to 0. The
    # first term is then >= (h d_{k+1})^2 > 0 there, so sqrt's gradient stays finite.
    discriminant = (beta - 2 * slope * offset) ** 2 + 4 * slope**2 * offset * (b.height - offset).clamp(min=0)
    # -beta - sqrt(...) < 0 always: a > 0 whenever beta <= 0, because a + beta = h s > 0.
    xi = _clamp_unit(2 * slope * offset / (beta + torch.sqrt(discriminant)))
    return b.x_k + xi * b.width, -_log_derivative(xi, b)


def _validate(
    inputs: Tensor,
    widths: Tensor,
    heights: Tensor,
    derivatives: Tensor,
    tail_bound: float,
    min_bin_width: float,
    min_bin_height: float,
) -> None:
    """Raises ``ValueError`` on parameter counts, shapes or bounds that cannot make a spline."""
    name = "rational_quadratic_spline"
    num_bins = widths.shape[-1] if widths.dim() else 0
    if num_bins < 1 or heights.shape[-1:] != (num_bins,) or derivatives.shape[-1:] != (num_bins - 1,):
        raise ValueError(
            f"{name} expects K >= 1 widths, K heights and K - 1 interior derivatives on the "
            f"last dim, got shapes {tuple(widths.shape)}, {tuple(heights.shape)} and "
            f"{tuple(derivatives.shape)}; the derivatives at -B and B are fixed to 1"
        )
    for label, t in (("widths", widths), ("heights", heights), ("derivatives", derivatives)):
        if t.shape[:-1] != inputs.shape:
            raise ValueError(
                f"{name} expects unnormalized_{label} of shape (*inputs.shape, n) with inputs "
                f"{tuple(inputs.shape)}, got {tuple(t.shape)}"
            )
    if tail_bound <= 0:
        raise ValueError(f"{name} expects tail_bound > 0, got {tail_bound}")
    if max(min_bin_width, min_bin_height) * num_bins >= 1:
        raise ValueError(
            f"{name} with {num_bins} bins needs min_bin_width and min_bin_height below "
            f"1 / {num_bins}, got {min_bin_width} and {min_bin_height}"
        )


def rational_quadratic_spline(
    inputs: Tensor,
    unnormalized_widths: Tensor,
    unnormalized_heights: Tensor,
    unnormalized_derivatives: Tensor,
    inverse: bool = False,
    tail_bound: float = 3.0,
    min_bin_width: float = 1e-3,
    min_bin_height: float = 1e-3,
    min_derivative: float = 1e-3,
) -> tuple[Tensor, Tensor]:
    """Elementwise monotonic rational-quadratic spline with identity tails.

    In bin ``k`` with ``xi = (x - x_k) / w_k`` and slope ``s_k = h_k / w_k``:
    ``y = y_k + h_k (s_k xi^2 + d_k xi(1-xi)) / (s_k + (d_k + d_{k+1} - 2 s_k) xi(1-xi))``;
    ``log dy/dx = log(s_k^2 (d_{k+1} xi^2 + 2 s_k xi(1-xi) + d_k (1-xi)^2)) - 2 log(denominator)``.
    Outside ``[-B, B]`` the map is the identity with log-derivative 0.

    Args:
        inputs: ``(...)`` any shape; ``x`` for the forward map, ``y`` for the inverse.
        unnormalized_widths: ``(..., K)``, softmax-normalized to bin widths summing to ``2B``.
        unnormalized_heights: ``(..., K)``, likewise for bin heights.
        unnormalized_derivatives: ``(..., K - 1)``, the derivatives at the ``K - 1``
            interior knots through a shifted softplus (0 gives 1); the derivatives at
            ``-B`` and ``B`` are fixed to 1 to match the identity tails.
        inverse: compute the inverse map, by the closed-form root of a quadratic.
        tail_bound: ``B``.
        min_bin_width, min_bin_height: smallest bin size, as a fraction of ``2B``.
        min_derivative: lower bound on the interior derivatives.

    Returns:
        ``(outputs, logabsdet)``, both shaped like ``inputs``; ``logabsdet`` is
        ``log|d outputs / d inputs|`` per element (for the inverse, minus the forward's
        at the corresponding point).

    References:
        Durkan, Bekasov, Murray & Papamakarios, "Neural Spline Flows", NeurIPS 2019,
        arXiv:1906.04032.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.tensor([-5.0, -1.0, 0.5, 2.0])
        >>> w, h, d = (0.5 * torch.randn(4, n, generator=g) for n in (5, 5, 4))
        >>> y, logabsdet = rational_quadratic_spline(x, w, h, d)
        >>> x_back, inverse_logabsdet = rational_quadratic_spline(y, w, h, d, inverse=True)
        >>> torch.allclose(x_back, x, atol=1e-5), torch.allclose(logabsdet, -inverse_logabsdet)
        (True, True)
    """
    _validate(
        inputs, unnormalized_widths, unnormalized_heights, unnormalized_derivatives,
        tail_bound, min_bin_width, min_bin_height,
    )
    inside = (inputs >= -tail_bound) & (inputs <= tail_bound)
    # Every element goes through the spline, with tail elements clamped into [-B, B], so
    # the unused branch stays finite and cannot put NaN into values or gradients.
    clamped = inputs.clamp(-tail_bound, tail_bound)
    x_knots, widths = _knots(unnormalized_widths, tail_bound, min_bin_width)
    y_knots, heights = _knots(unnormalized_heights, tail_bound, min_bin_height)
    derivatives = _derivatives(unnormalized_derivatives, min_derivative)
    knots = y_knots if inverse else x_knots
    # Counting the interior knots <= input gives the bin; the clamp only guards round-off.
    index = torch.searchsorted(knots[..., 1:-1].contiguous(), clamped.unsqueeze(-1), right=True)
    index = index.squeeze(-1).clamp(0, widths.shape[-1] - 1)
    per_element = (x_knots, widths, y_knots, heights, derivatives)
    bin_ = _Bin(*(_gather(t, index) for t in per_element), _gather(derivatives, index + 1))
    outputs, log_derivative = (_inverse_in_bin if inverse else _forward_in_bin)(clamped, bin_)
    outputs = torch.where(inside, outputs, inputs)
    return outputs, torch.where(inside, log_derivative, torch.zeros_like(log_derivative))


def packed_spline(inputs: Tensor, params: Tensor, inverse: bool = False, tail_bound: float = 3.0) -> tuple[Tensor, Tensor]:
    """:func:`rational_quadratic_spline` with its parameters packed in one tensor.

    ``params`` is ``(*inputs.shape, 3K - 1)``: ``K`` widths, ``K`` heights, then ``K - 1``
    interior derivatives, as a conditioner outputs them (``K`` from the last dimension).
    """
    k = (params.shape[-1] + 1) // 3
    widths, heights, derivatives = params[..., :k], params[..., k : 2 * k], params[..., 2 * k :]
    return rational_quadratic_spline(inputs, widths, heights, derivatives, inverse=inverse, tail_bound=tail_bound)
