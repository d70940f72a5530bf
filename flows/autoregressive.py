"""Autoregressive flows: the MADE conditioner, MAF (and IAF by inversion), and the
autoregressive rational-quadratic spline flow of NSF.

Feature ``i`` is transformed by an elementwise map whose parameters depend only on
the features of lower degree (earlier in the ordering), so the Jacobian is triangular
in that ordering and the log-determinant is the sum of the elementwise log-derivatives.
The density direction (``forward``) takes one network pass; ``inverse`` takes ``D``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flows.base import Flow, sum_per_sample, zero_logdet
from flows.maps import AffineMap, ElementwiseMap, SplineMap
from flows.validation import check_context, check_input

__all__ = ["MADE", "Autoregressive", "MaskedAffineAutoregressive", "RQSplineAutoregressive"]

ORDERS = ("natural", "reversed", "random")


def input_degrees(features: int, order: str, seed: int | None = None) -> Tensor:
    """Degrees ``1..D`` of the inputs: ``(D,)`` long, a permutation of ``1..D``."""
    if order == "natural":
        return torch.arange(1, features + 1)
    if order == "reversed":
        return torch.arange(features, 0, -1)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return torch.randperm(features, generator=generator) + 1


def hidden_degrees(features: int, hidden_features: int) -> Tensor:
    """Degrees of hidden units, cycling through ``1..D-1`` (all 0 when ``D = 1``) so that
    every degree that can carry information has units (Germain et al., section 4)."""
    if features == 1:
        return torch.zeros(hidden_features, dtype=torch.long)
    return torch.arange(hidden_features) % (features - 1) + 1


class MaskedLinear(nn.Linear):
    """A linear layer whose weight is multiplied by a fixed 0/1 mask.

    Context columns, when there are any, are appended to the input and never masked:
    the context may influence every output.
    """

    def __init__(self, mask: Tensor, context_features: int = 0) -> None:
        out_features, in_features = mask.shape
        super().__init__(in_features + context_features, out_features)
        full = torch.cat([mask, torch.ones(out_features, context_features, dtype=torch.bool)], 1)
        self.register_buffer("mask", full)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        if context is not None:
            x = torch.cat([x, context.to(x.dtype)], dim=1)
        return F.linear(x, self.weight * self.mask, self.bias)


class MaskedResidualBlock(nn.Module):
    """``h + W2 act(W1 act(h))`` with hidden-to-hidden masks ``degree_out >= degree_in``,
    so the block keeps each unit's degree and the skip connection stays autoregressive."""

    def __init__(
        self, mask: Tensor, context_features: int, activation: Callable[[], nn.Module], dropout: float
    ) -> None:
        super().__init__()
        self.first = MaskedLinear(mask, context_features)
        self.second = MaskedLinear(mask, context_features)
        self.activation = activation()
        self.dropout = nn.Dropout(dropout) if dropout else None  # none at all: sampling runs a block D times

    def forward(self, h: Tensor, context: Tensor | None) -> Tensor:
        residual = self.activation(self.first(self.activation(h), context))
        if self.dropout is not None:
            residual = self.dropout(residual)
        return h + self.second(residual, context)


class MaskedFeedforwardBlock(nn.Module):
    """``W act(h)`` with a hidden-to-hidden mask ``degree_out >= degree_in``."""

    def __init__(
        self, mask: Tensor, context_features: int, activation: Callable[[], nn.Module], dropout: float
    ) -> None:
        super().__init__()
        self.linear = MaskedLinear(mask, context_features)
        self.activation = activation()
        self.dropout = nn.Dropout(dropout) if dropout else None

    def forward(self, h: Tensor, context: Tensor | None) -> Tensor:
        h = self.activation(h)
        if self.dropout is not None:
            h = self.dropout(h)
        return self.linear(h, context)


class MADE(nn.Module):
    """Masked autoencoder for distribution estimation: an autoregressive network.

    ``out[:, i, :]`` depends only on the inputs ``x_j`` with ``degree(j) < degree(i)``
    (and on the context, unmasked); in the natural order, on ``x_1..x_{i-1}``.
    Maps ``(B, features)`` (and an optional ``(B, context_features)``) to
    ``(B, features, out_multiplier)``. Hidden units get degrees ``1..D-1`` in turn;
    a hidden-to-hidden weight is kept where ``degree_out >= degree_in`` and a
    hidden-to-output weight where ``degree_out > degree_in``.

    Args:
        features: ``D``.
        hidden_features: width of the hidden layers; at least ``D - 1`` lets every
            feature see all the features before it.
        out_multiplier: outputs per feature (e.g. 2 for shift and scale).
        num_blocks: hidden blocks between the input layer and the output layer (a
            block is one masked hidden layer, or two with a skip when ``residual``).
        order: ``"natural"``, ``"reversed"`` or ``"random"`` (a permutation drawn with
            ``seed``, or from torch's global generator when ``seed`` is None).
        seed: seed of the random order.
        residual: use residual blocks (two masked layers and a skip) instead of plain ones.
        context_features: size ``K`` of a context appended to every masked layer's input.
        activation: factory of the nonlinearity.
        zero_init: zero the output layer, so a flow built on it starts as the identity.
        dropout: probability of dropping a hidden unit inside each block (training only).

    Attributes:
        degrees: ``(D,)`` long buffer, the degree (1..D) of each input feature.

    References:
        Germain, Gregor, Murray & Larochelle, "MADE: Masked Autoencoder for Distribution
        Estimation", ICML 2015, arXiv:1502.03509.

    Example:
        >>> import torch
        >>> made = MADE(4, hidden_features=8, out_multiplier=2, zero_init=False)
        >>> made(torch.randn(3, 4)).shape
        torch.Size([3, 4, 2])
    """

    def __init__(
        self,
        features: int,
        hidden_features: int,
        out_multiplier: int,
        num_blocks: int = 2,
        order: str = "natural",
        seed: int | None = None,
        residual: bool = False,
        context_features: int = 0,
        activation: Callable[[], nn.Module] = nn.ReLU,
        zero_init: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        _check_made_args(features, hidden_features, out_multiplier, num_blocks, order, context_features)
        if not 0 <= dropout < 1:
            raise ValueError(f"MADE dropout must be in [0, 1), got {dropout!r}")
        self.features = features
        self.order = order
        self.out_multiplier = out_multiplier
        self.context_features = context_features
        self.register_buffer("degrees", input_degrees(features, order, seed))
        hidden = hidden_degrees(features, hidden_features)
        outputs = self.degrees.repeat_interleave(out_multiplier)  # unit i*M + m belongs to feature i
        self.first = MaskedLinear(hidden[:, None] >= self.degrees[None, :], context_features)
        block = MaskedResidualBlock if residual else MaskedFeedforwardBlock
        square = hidden[:, None] >= hidden[None, :]
        self.blocks = nn.ModuleList(
            block(square, context_features, activation, dropout) for _ in range(num_blocks)
        )
        self.activation = activation()
        self.last = MaskedLinear(outputs[:, None] > hidden[None, :], context_features)
        if zero_init:
            nn.init.zeros_(self.last.weight)
            nn.init.zeros_(self.last.bias)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        check_input("MADE", x, self.features, ranks=(2,))
        check_context("MADE", context, self.context_features, x.shape[0])
        if not self.context_features:
            context = None  # ignored, as by every layer without a conditioner on it
        h = self.first(x, context)
        for block in self.blocks:
            h = block(h, context)
        out = self.last(self.activation(h), context)
        return out.view(x.shape[0], self.features, self.out_multiplier)  # (B, D, M)


def _check_made_args(
    features: int, hidden_features: int, out_multiplier: int, num_blocks: int, order: str, context_features: int
) -> None:
    if order not in ORDERS:
        raise ValueError(f"MADE order must be one of {ORDERS}, got {order!r}")
    for name, value, least in (
        ("features", features, 1),
        ("hidden_features", hidden_features, 1),
        ("out_multiplier", out_multiplier, 1),
        ("num_blocks", num_blocks, 0),
        ("context_features", context_features, 0),
    ):
        if not isinstance(value, int) or value < least:
            raise ValueError(f"MADE {name} must be an integer >= {least}, got {value!r}")


class Autoregressive(Flow):
    """An autoregressive layer: ``y_i = m(x_i; theta_i(x_<i, context))`` for any elementwise
    map ``m`` (:mod:`flows.maps`), ``theta`` from a :class:`MADE`; ``logdet = sum_i log|m'(x_i)|``.

    Owns the MADE, the one-pass forward (the density direction), the ``D``-pass inverse
    and the triangular structure (declared by :meth:`jacobian_mask`). Accepts ``(B, D)``.
    The concrete layers below fix the map; use this class directly for a map of your own.

    Args:
        features: ``D`` of ``(B, D)`` inputs.
        elementwise: the map applied to each feature.
        hidden_features, num_blocks, order, seed, residual, context_features, dropout:
            see :class:`MADE`.

    Example:
        >>> import torch, flows
        >>> layer = flows.Autoregressive(3, flows.maps.AffineMap(), hidden_features=8)
        >>> layer(torch.randn(2, 3))[1].shape
        torch.Size([2])
    """

    #: ``inverse`` takes ``D`` sequential passes of the MADE (not one closed-form step).
    iterative_inverse = True

    def __init__(
        self,
        features: int,
        elementwise: ElementwiseMap,
        hidden_features: int = 64,
        num_blocks: int = 2,
        order: str = "natural",
        seed: int | None = None,
        residual: bool = False,
        context_features: int = 0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not isinstance(elementwise, ElementwiseMap):
            raise TypeError(
                f"{type(self).__name__} expects a flows.maps.ElementwiseMap, got {type(elementwise).__name__}"
            )
        self.features = features
        self.elementwise = elementwise
        self.context_features = context_features
        self.made = MADE(
            features, hidden_features, elementwise.param_count, num_blocks, order, seed, residual,
            context_features, dropout=dropout,
        )

    def _validate(self, x: Tensor, context: Tensor | None) -> None:
        name = type(self).__name__
        check_input(name, x, self.features, ranks=(2,))
        check_context(name, context, self.context_features, x.shape[0])

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._validate(x, context)
        y, log_derivative = self.elementwise.forward(x, self.made(x, context))
        return y, _logdet(log_derivative, x)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._validate(y, context)
        # Pass k fixes the feature of degree k, whose parameters depend only on features
        # of lower degree, already exact after pass k - 1: D passes invert exactly.
        x = torch.zeros_like(y)
        for _ in range(self.features):
            x, log_derivative = self.elementwise.inverse(y, self.made(x, context))
        return x, _logdet(log_derivative, y)

    def jacobian_mask(self, shape: tuple[int, ...]) -> Tensor:
        """``dy_i/dx_j`` may be non-zero iff ``i == j`` or ``degree(j) < degree(i)``."""
        if tuple(shape) != (self.features,):
            raise ValueError(
                f"{type(self).__name__} has {self.features} features, got sample shape {tuple(shape)}"
            )
        degrees = self.made.degrees.cpu()
        return torch.eye(shape[0], dtype=torch.bool) | (degrees[None, :] < degrees[:, None])


def _logdet(log_derivative: Tensor | None, x: Tensor) -> Tensor:
    """The per-sample sum, or zeros for a volume-preserving map (which returns ``None``)."""
    return zero_logdet(x) if log_derivative is None else sum_per_sample(log_derivative)


class MaskedAffineAutoregressive(Autoregressive):
    """Masked autoregressive flow (MAF) layer; ``flows.Inverse`` of it is IAF.

    ``z_i = x_i * exp(s_i(x_<i)) + t_i(x_<i)``; ``logdet = sum_i s_i``, with the
    log-scale soft-clamped, ``s = c * tanh(h / c)`` (:class:`flows.maps.AffineMap`).
    (The paper writes ``z_i = (x_i - mu_i) exp(-alpha_i)``: the same family, with
    ``s = -alpha`` and ``t = -mu exp(-alpha)``.)

    Accepts ``(B, D)``. ``forward`` (the density direction) is one MADE pass; ``inverse``
    (sampling) is ``D`` passes. ``flows.Inverse(MaskedAffineAutoregressive(...))`` is an
    inverse autoregressive flow (IAF): sampling in one pass, density in ``D``. A new
    layer is the identity (the MADE's output layer is zero-initialized).

    Args:
        features: ``D``.
        hidden_features, num_blocks, order, seed, residual, context_features, dropout:
            see :class:`MADE`.
        clamp: ``c`` of the soft clamp; the scale stays within ``e^±c``.

    References:
        Papamakarios, Pavlakou & Murray, "Masked Autoregressive Flow for Density
        Estimation", NeurIPS 2017, arXiv:1705.07057. Kingma et al., "Improved Variational
        Inference with Inverse Autoregressive Flow", NeurIPS 2016, arXiv:1606.04934.

    Example:
        >>> import torch, flows
        >>> maf = MaskedAffineAutoregressive(4, hidden_features=16)
        >>> x = torch.randn(8, 4)
        >>> z, logdet = maf(x)
        >>> torch.allclose(maf.inverse(z)[0], x), logdet.shape
        (True, torch.Size([8]))
        >>> iaf = flows.Inverse(MaskedAffineAutoregressive(4, hidden_features=16))
        >>> iaf(x)[1].shape
        torch.Size([8])
    """

    def __init__(
        self,
        features: int,
        hidden_features: int = 64,
        num_blocks: int = 2,
        order: str = "natural",
        seed: int | None = None,
        residual: bool = False,
        context_features: int = 0,
        clamp: float = 2.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(
            features, AffineMap("exp", clamp), hidden_features, num_blocks, order, seed, residual,
            context_features, dropout,
        )


class RQSplineAutoregressive(Autoregressive):
    """Autoregressive rational-quadratic spline flow (the autoregressive NSF layer).

    ``z_i = RQS(x_i; theta_i(x_<i))``, a monotonic spline on ``[-B, B]`` and the identity
    outside; ``logdet = sum_i log RQS'(x_i)`` (:class:`flows.maps.SplineMap`).

    Accepts ``(B, D)``. ``forward`` is one MADE pass, ``inverse`` ``D`` passes, each
    spline inverted in closed form. The MADE outputs ``3K - 1`` parameters per feature
    (``K`` widths, ``K`` heights, ``K - 1`` interior derivatives); zero-initialized, a
    new layer is the identity.

    Args:
        features: ``D``.
        hidden_features, num_blocks, order, seed, residual, context_features, dropout:
            see :class:`MADE`.
        num_bins: ``K``.
        tail_bound: ``B``.

    References:
        Durkan, Bekasov, Murray & Papamakarios, "Neural Spline Flows", NeurIPS 2019,
        arXiv:1906.04032.

    Example:
        >>> import torch
        >>> layer = RQSplineAutoregressive(3, hidden_features=16, num_bins=4)
        >>> x = 4 * torch.randn(5, 3)
        >>> z, logdet = layer(x)
        >>> torch.allclose(layer.inverse(z)[0], x, atol=1e-5), logdet.shape
        (True, torch.Size([5]))
    """

    def __init__(
        self,
        features: int,
        hidden_features: int = 64,
        num_bins: int = 8,
        tail_bound: float = 3.0,
        num_blocks: int = 2,
        order: str = "natural",
        seed: int | None = None,
        residual: bool = False,
        context_features: int = 0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(
            features, SplineMap(num_bins, tail_bound), hidden_features, num_blocks, order, seed, residual,
            context_features, dropout,
        )
