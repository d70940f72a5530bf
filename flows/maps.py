"""Elementwise maps: the invertible scalar functions that conditioned layers apply per entry.

A map turns each entry ``x`` into ``y = m(x; theta)`` given ``param_count`` parameters
``theta`` per entry, and returns the per-entry ``log|dy/dx|``. The two conditioned
families share them: a coupling layer (:class:`flows.Coupling`) computes ``theta`` from
the untouched part, an autoregressive layer (:class:`flows.Autoregressive`) from the
features before each one. So a new map is written once and both families get it.

Every map is the identity when its parameters are all zero, so a layer whose
conditioner's last layer is zero-initialized starts as the identity. Parameters come
packed on the last dimension: ``params`` has shape ``(*x.shape, param_count)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from flows.splines import packed_spline, spline_param_count

__all__ = ["ElementwiseMap", "AdditiveMap", "AffineMap", "SplineMap", "soft_clamp"]


def soft_clamp(h: Tensor, bound: float) -> Tensor:
    """``bound * tanh(h / bound)``: the one clamping rule of log-scales in jacflow.

    Smooth, the identity near 0 (slope 1), and bounded by ``±bound``, so a scale
    ``exp(soft_clamp(h))`` stays within ``e^±bound`` however large the network's output.
    """
    return bound * torch.tanh(h / bound)


class ElementwiseMap:
    """Base of the elementwise maps; subclasses set :attr:`param_count` and the two maps.

    ``forward(x, params) -> (y, log|dy/dx|)`` and ``inverse(y, params) -> (x, log|dx/dy|)``,
    every tensor shaped like ``x`` (``params`` with one more, last, dimension).
    """

    param_count: int = 1
    #: ``False`` for maps whose log-derivative is 0 everywhere (the layer then skips the sum).
    has_logdet: bool = True

    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def inverse(self, y: Tensor, params: Tensor) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"

    def extra_repr(self) -> str:
        return ""


class AdditiveMap(ElementwiseMap):
    """``y = x + t``: one parameter per entry; volume-preserving (``log|dy/dx| = 0``).

    Returns ``None`` for the log-derivative, so a layer built on it adds no sum.
    """

    param_count = 1
    has_logdet = False

    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, None]:
        return x + params.squeeze(-1), None

    def inverse(self, y: Tensor, params: Tensor) -> tuple[Tensor, None]:
        return y - params.squeeze(-1), None


class AffineMap(ElementwiseMap):
    """``y = x * exp(s) + t`` with ``s = scale_fn(h)``; ``log|dy/dx| = s``.

    Two parameters per entry, the shift ``t`` and the raw log-scale ``h``, in that order.

    Args:
        scale: ``"exp"``: ``s = soft_clamp(h, clamp)`` (:func:`soft_clamp`); ``"sigmoid"``:
            Glow's ``s = log sigmoid(h + 2)``, a scale in ``(0, 1)`` (``clamp`` unused).
        clamp: the bound of ``s`` for ``scale="exp"``.

    Example:
        >>> import torch
        >>> m = AffineMap()
        >>> x, params = torch.randn(4, 3), torch.randn(4, 3, 2)
        >>> y, log_derivative = m.forward(x, params)
        >>> torch.allclose(m.inverse(y, params)[0], x)
        True
    """

    param_count = 2

    def __init__(self, scale: str = "exp", clamp: float = 2.0) -> None:
        if scale not in ("exp", "sigmoid"):
            raise ValueError(f"AffineMap scale must be 'exp' or 'sigmoid', got {scale!r}")
        if not clamp > 0:
            raise ValueError(f"AffineMap clamp must be > 0, got {clamp}")
        self.scale = scale
        self.clamp = float(clamp)

    def shift_and_log_scale(self, params: Tensor) -> tuple[Tensor, Tensor]:
        """``(t, s)`` from packed ``(..., 2)`` parameters."""
        shift, h = params.unbind(-1)
        if self.scale == "sigmoid":
            # Glow's +2: a zero-initialized conditioner starts at scale sigmoid(2) = 0.88.
            return shift, F.logsigmoid(h + 2.0)
        return shift, soft_clamp(h, self.clamp)

    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        shift, log_scale = self.shift_and_log_scale(params)
        return x * log_scale.exp() + shift, log_scale

    def inverse(self, y: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        shift, log_scale = self.shift_and_log_scale(params)
        inverse_log_scale = -log_scale  # one negation for both: sampling runs this D times per layer
        return (y - shift) * inverse_log_scale.exp(), inverse_log_scale

    def extra_repr(self) -> str:
        return f"scale={self.scale!r}" + (f", clamp={self.clamp}" if self.scale == "exp" else "")


class SplineMap(ElementwiseMap):
    """A monotonic rational-quadratic spline on ``[-B, B]``, the identity outside (NSF).

    ``3K - 1`` parameters per entry (``K`` widths, ``K`` heights, ``K - 1`` interior
    derivatives); see :func:`flows.splines.rational_quadratic_spline`. The inverse is in
    closed form (the root of a quadratic).

    Args:
        num_bins: ``K``.
        tail_bound: ``B``.

    References:
        Durkan, Bekasov, Murray & Papamakarios, "Neural Spline Flows", NeurIPS 2019,
        arXiv:1906.04032.

    Example:
        >>> import torch
        >>> m = SplineMap(num_bins=4)
        >>> x, params = torch.randn(5), torch.randn(5, m.param_count)
        >>> y, _ = m.forward(x, params)
        >>> torch.allclose(m.inverse(y, params)[0], x, atol=1e-5)
        True
    """

    def __init__(self, num_bins: int = 8, tail_bound: float = 3.0) -> None:
        if not isinstance(num_bins, int) or num_bins < 1:
            raise ValueError(f"SplineMap num_bins must be an integer >= 1, got {num_bins!r}")
        if not tail_bound > 0:
            raise ValueError(f"SplineMap tail_bound must be > 0, got {tail_bound}")
        self.num_bins = num_bins
        self.tail_bound = float(tail_bound)
        self.param_count = spline_param_count(num_bins)

    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        return packed_spline(x, params, inverse=False, tail_bound=self.tail_bound)

    def inverse(self, y: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        return packed_spline(y, params, inverse=True, tail_bound=self.tail_bound)

    def extra_repr(self) -> str:
        return f"num_bins={self.num_bins}, tail_bound={self.tail_bound}"
