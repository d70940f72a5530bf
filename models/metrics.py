"""Likelihood metrics: uniform dequantization, nats, and bits per dimension.

Discrete data ``x`` with ``K = num_levels`` integer levels per value (0..K-1) has no
density, so a flow is fitted to a continuous variable made by adding uniform noise
``u ~ U[0, 1)^D`` (Theis et al., 2016). Two scalings of that variable are in use, and
the bits-per-dimension formula depends on which one the model's density is over:

* **level units**, ``v = x + u`` in ``[0, K)^D``: the model's flow itself contains the
  scaling to ``[0, 1]`` (and any logit) as a layer with its log-determinant, as jacflow's
  models do (see DESIGN.md). Use :func:`bits_per_dim`::

      bits/dim = nll_v / (D ln 2)

* **unit scale**, ``y = (x + u) / K`` in ``[0, 1)^D``, as :func:`dequantize` returns:
  the model's density is over ``y``. Since ``p_v(v) = p_y(v / K) K^-D``,
  ``nll_v = nll_y + D log K``, so use :func:`bits_per_dim_unit_scale`::

      bits/dim = (nll_y + D log K) / (D ln 2) = nll_y / (D ln 2) + log2 K

In both cases ``nll`` is ``-log p`` in nats of one sample (or a mean over samples) and
``D`` the number of values per sample (C*H*W for images). Averaged over ``u``, this is
an upper bound on the discrete data's ``-log2 P(x) / D`` (Theis et al., 2016, Sec. 3.1).
A uniform model scores exactly ``log2 K`` bits/dim in both conventions.

References:
    Theis, van den Oord and Bethge, "A note on the evaluation of generative models",
    ICLR 2016, arXiv:1511.01844.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["dequantize", "bits_per_dim", "bits_per_dim_unit_scale", "nats_mean_and_stderr"]


def _check_num_levels(num_levels: int) -> None:
    if isinstance(num_levels, bool) or not isinstance(num_levels, int) or num_levels < 2:
        raise ValueError(f"num_levels: expected an integer >= 2, got {num_levels!r}")


def _check_num_dims(num_dims: int) -> None:
    if isinstance(num_dims, bool) or not isinstance(num_dims, int) or num_dims < 1:
        raise ValueError(f"num_dims: expected a positive integer, got {num_dims!r}")


def dequantize(
    x_levels: Tensor, num_levels: int, generator: torch.Generator | None = None
) -> Tensor:
    """Uniform dequantization of integer levels onto ``[0, 1)``: ``y = (x + u) / K``.

    ``u ~ U[0, 1)`` independently per value, so the level ``x`` covers the bin
    ``[x / K, (x + 1) / K)`` (up to rounding at interior bin edges; the result is always
    below 1). The values are not checked to lie in ``0..K-1`` (that
    would cost a host sync per batch); the data loaders guarantee it.

    Args:
        x_levels: integer levels ``0..K-1`` of any shape, as an integer or float tensor.
        num_levels: ``K``, the number of levels (17 for digits, 256 for 8-bit images).
        generator: random number generator for ``u``; the global one when ``None``.

    Returns:
        A float tensor of ``x_levels``' shape (the default float dtype when
        ``x_levels`` is an integer tensor) with values in ``[0, 1)``. Its density is
        over the unit scale: score it with :func:`bits_per_dim_unit_scale`.

    Example:
        >>> y = dequantize(torch.tensor([0, 3, 16]), num_levels=17)
        >>> bool(((y * 17).floor() == torch.tensor([0.0, 3.0, 16.0])).all())
        True
    """
    _check_num_levels(num_levels)
    dtype = x_levels.dtype if x_levels.is_floating_point() else torch.get_default_dtype()
    u = torch.rand(x_levels.shape, generator=generator, dtype=dtype, device=x_levels.device)
    y = (x_levels.to(dtype) + u) / num_levels
    # x + u can round up to x + 1 (float32, K = 256: about once in 2^17 top-level values),
    # which would put y = 1 outside [0, 1); 1 - eps/2 is the largest float below 1.
    return y.clamp_(max=1.0 - torch.finfo(dtype).eps / 2)


def bits_per_dim(nll_nats: Tensor | float, num_dims: int) -> Tensor | float:
    """Bits per dimension of a density over level units: ``nll / (D ln 2)``.

    Use this when the model's density is over ``x + u`` in ``[0, K)^D``, i.e. its flow
    includes the scaling to ``[0, 1]`` as a layer (jacflow's image models do), or for
    continuous data. Being linear, it also converts a standard error.

    Args:
        nll_nats: ``-log p`` in nats per sample, a float or a tensor of any shape.
        num_dims: ``D``, the number of values per sample (C*H*W for images).

    Returns:
        Bits per dimension, of ``nll_nats``' type and shape.

    Example:
        >>> bits_per_dim(784 * math.log(2.0), num_dims=784)
        1.0
    """
    _check_num_dims(num_dims)
    return nll_nats / (num_dims * math.log(2.0))


def bits_per_dim_unit_scale(
    nll_nats: Tensor | float, num_dims: int, num_levels: int
) -> Tensor | float:
    """Bits per dimension of a density over ``[0, 1)^D``: ``(nll + D log K) / (D ln 2)``.

    Use this when the model's density is over ``y = (x + u) / K`` as
    :func:`dequantize` returns it. The ``D log K`` term is the log-determinant of the
    scaling from level units to the unit cube: each bin of width 1 becomes width ``1/K``,
    so a density over ``y`` is ``K^D`` times larger than the same model over ``x + u``.
    A standard error converts with :func:`bits_per_dim` (the offset does not apply).

    Args:
        nll_nats: ``-log p(y)`` in nats per sample, a float or a tensor of any shape.
        num_dims: ``D``, the number of values per sample.
        num_levels: ``K``, the number of levels per value.

    Returns:
        Bits per dimension, of ``nll_nats``' type and shape.

    Example:
        >>> bits_per_dim_unit_scale(0.0, num_dims=3072, num_levels=256)  # uniform on [0, 1)
        8.0
    """
    _check_num_levels(num_levels)
    return bits_per_dim(nll_nats, num_dims) + math.log2(num_levels)


def nats_mean_and_stderr(values: Tensor) -> tuple[float, float]:
    """Mean of per-sample values and its standard error ``std / sqrt(N)``.

    The standard deviation uses Bessel's correction; both are computed in float64.
    Non-finite values propagate into the result rather than being dropped.

    Args:
        values: ``(N,)`` per-sample values (e.g. ``-log p`` in nats), ``N >= 2``.

    Returns:
        ``(mean, standard error)`` as Python floats.

    Example:
        >>> nats_mean_and_stderr(torch.tensor([1.0, 3.0]))
        (2.0, 1.0)
    """
    if values.dim() != 1 or values.shape[0] < 2:
        raise ValueError(
            f"values: expected a 1-D tensor of at least 2 per-sample values, "
            f"got shape {tuple(values.shape)}"
        )
    wide = values.detach().to(torch.float64)
    mean = wide.mean()
    stderr = wide.std(correction=1) / math.sqrt(wide.shape[0])
    return float(mean), float(stderr)
