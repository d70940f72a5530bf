"""Coupling layers: the input is split by a mask; one part conditions an elementwise
invertible map of the other. Additive (NICE), affine (RealNVP / Glow) and
rational-quadratic spline (NSF) couplings, and any :mod:`flows.maps` map."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from flows.base import Flow, inside_function_transform, sum_per_sample, zero_logdet
from flows.maps import AdditiveMap, AffineMap, ElementwiseMap, SplineMap
from flows.validation import check_context, check_input

__all__ = ["Coupling", "AdditiveCoupling", "AffineCoupling", "RQSplineCoupling", "checkerboard"]

SubnetFactory = Callable[[int, int], nn.Module]


def checkerboard(shape: tuple[int, ...], parity: int = 0) -> Tensor:
    """Bool mask of one sample's shape, ``True`` where ``(sum of spatial indices + parity)``
    is odd; for vectors ``(D,)`` alternate features, for images ``(C, H, W)`` alternate
    pixels (the same for every channel)."""
    if len(shape) == 1:
        pattern = torch.arange(shape[0]) % 2
        return (pattern + parity) % 2 == 1
    rows = torch.arange(shape[-2]).view(-1, 1)
    cols = torch.arange(shape[-1]).view(1, -1)
    pattern = ((rows + cols + parity) % 2 == 1).expand(shape[-2:])
    return pattern.expand(shape)


class Coupling(Flow):
    """A coupling layer: ``y_b = m(x_b; theta(x_a, context))``, ``y_a = x_a``, for any
    elementwise map ``m`` (:mod:`flows.maps`); ``logdet = sum log|m'(x_b)|``.

    ``mask="channel"`` splits dim 1 into halves (for odd counts the halves differ by
    one); the conditioner sees the untouched half (plus context) and outputs the
    parameters of the transformed half. ``mask="checkerboard"`` alternates features of
    vectors or pixels of images; the conditioner sees the whole input with the
    transformed entries zeroed (RealNVP's ``b * x``) and outputs parameters for every
    entry, of which the masked ones are used. ``parity=1`` swaps the two parts.
    The Jacobian is triangular up to a permutation (declared by :meth:`jacobian_mask`).

    Accepts ``(B, D)`` or ``(B, C, H, W)``. The concrete layers below fix the map; use
    this class directly for a map of your own.

    Args:
        features: size of dim 1 (``D``, or ``C`` for images).
        subnet: factory ``(in_features, out_features) -> nn.Module`` for the conditioner.
        elementwise: the map applied to the transformed entries.
        mask: ``"channel"`` or ``"checkerboard"``.
        parity: 0 or 1, which part is transformed.
        context_features: size ``K`` of a ``(B, K)`` context concatenated to the
            conditioner's input (broadcast over space for images); 0 for none.

    Example:
        >>> import torch, flows
        >>> layer = flows.Coupling(4, flows.nets.MLP, flows.maps.AffineMap(clamp=3.0))
        >>> x = torch.randn(8, 4)
        >>> z, logdet = layer(x)
        >>> torch.allclose(layer.inverse(z)[0], x), logdet.shape
        (True, torch.Size([8]))
    """

    def __init__(
        self,
        features: int,
        subnet: SubnetFactory,
        elementwise: ElementwiseMap,
        mask: str = "channel",
        parity: int = 0,
        context_features: int = 0,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if not isinstance(elementwise, ElementwiseMap):
            raise TypeError(f"{name} expects a flows.maps.ElementwiseMap, got {type(elementwise).__name__}")
        if mask not in ("channel", "checkerboard"):
            raise ValueError(f"{name} mask must be 'channel' or 'checkerboard', got {mask!r}")
        if parity not in (0, 1):
            raise ValueError(f"{name} parity must be 0 or 1, got {parity!r}")
        if features < 2 and mask == "channel":
            raise ValueError(f"{name} with a channel mask needs features >= 2, got {features}")
        self.features = features
        self.elementwise = elementwise
        self.mask = mask
        self.parity = parity
        self.context_features = context_features
        self._masks: dict[tuple, Tensor] = {}  # checkerboard masks by (shape, device, inference mode)
        half = features // 2
        # parity 0 transforms the second half [half, D), parity 1 the first [0, half).
        self._transformed = slice(half, None) if parity == 0 else slice(0, half)
        self._channel_split = (half, features - half)  # (first, second) part sizes on dim 1
        if mask == "channel":
            n_in = self._channel_split[parity]  # the conditioning part: first for parity 0
            n_out = features - n_in
        else:
            n_in, n_out = features, features
        self.subnet = subnet(n_in + context_features, n_out * elementwise.param_count)

    def _params(self, conditioner_input: Tensor, context: Tensor | None) -> Tensor:
        """Runs the conditioner; returns ``(B, n, *spatial, param_count)``."""
        if self.context_features:
            ctx = context.view(*context.shape, *([1] * (conditioner_input.dim() - 2)))
            ctx = ctx.expand(-1, -1, *conditioner_input.shape[2:])  # (B, K, H, W) for images
            conditioner_input = torch.cat([conditioner_input, ctx.to(conditioner_input.dtype)], 1)
        h = self.subnet(conditioner_input)  # (B, n * P, *spatial)
        h = h.reshape(h.shape[0], -1, self.elementwise.param_count, *h.shape[2:])  # (B, n, P, *spatial)
        return h.movedim(2, -1)

    def _validate(self, x: Tensor, context: Tensor | None) -> None:
        name = type(self).__name__
        check_input(name, x, self.features)
        check_context(name, context, self.context_features, x.shape[0])

    def _couple(self, x: Tensor, context: Tensor | None, inverse: bool) -> tuple[Tensor, Tensor]:
        self._validate(x, context)
        elementwise = self.elementwise.inverse if inverse else self.elementwise.forward
        if self.mask == "channel":
            # One split (its backward is one cat) rather than two slices (each of whose
            # backward fills a zero tensor of the input's size).
            first, second = x.split(self._channel_split, dim=1)
            x_cond, x_tr = (first, second) if self.parity == 0 else (second, first)
            y_tr, log_derivative = elementwise(x_tr, self._params(x_cond, context))
            parts = [x_cond, y_tr] if self.parity == 0 else [y_tr, x_cond]
            y = torch.cat(parts, dim=1)
            selected = log_derivative
        else:
            m = self._checkerboard_on(x)
            y_all, log_derivative = elementwise(x, self._params(x * ~m, context))
            y = torch.where(m, y_all, x)
            selected = None if log_derivative is None else torch.where(m, log_derivative, 0.0)
        if selected is None:
            return y, zero_logdet(x)
        return y, sum_per_sample(selected)

    def _checkerboard_on(self, x: Tensor) -> Tensor:
        """The ``(1, *sample shape)`` checkerboard on ``x``'s device, built once per shape.

        Cached so that no mask is rebuilt and copied to the device on every call; the
        key holds the inference mode, since a mask made under ``torch.inference_mode``
        cannot be saved for a later backward pass.
        """
        key = (tuple(x.shape[1:]), x.device, torch.is_inference_mode_enabled())
        if inside_function_transform():  # a mask made here would be wrapped for the transform
            return checkerboard(key[0], self.parity).to(x.device).unsqueeze(0)
        mask = self._masks.get(key)
        if mask is None:
            mask = checkerboard(key[0], self.parity).to(x.device).unsqueeze(0)
            self._masks[key] = mask
        return mask

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._couple(x, context, inverse=False)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._couple(y, context, inverse=True)

    def transformed_entries(self, shape: tuple[int, ...]) -> Tensor:
        """Bool mask of one sample's shape: ``True`` where the entry is transformed."""
        if self.mask == "checkerboard":
            return checkerboard(shape, self.parity)
        channels = torch.zeros(shape[0], dtype=torch.bool)
        channels[self._transformed] = True
        return channels.view(-1, *([1] * (len(shape) - 1))).expand(shape)

    def jacobian_mask(self, shape: tuple[int, ...]) -> Tensor:
        """Identity rows for untouched entries; transformed entries depend on themselves
        and on the untouched ones only (a triangular Jacobian up to permutation)."""
        t = self.transformed_entries(shape).reshape(-1)
        return torch.eye(t.numel(), dtype=torch.bool) | (t[:, None] & ~t[None, :])


class AdditiveCoupling(Coupling):
    """NICE's additive coupling: ``y_b = x_b + t(x_a)``; ``logdet = 0``.

    Inputs ``(B, D)`` or ``(B, C, H, W)``; see :class:`Coupling` for masks and context.

    Args:
        features, subnet, mask, parity, context_features: see :class:`Coupling`.

    References:
        Dinh, Krueger & Bengio, "NICE: Non-linear Independent Components Estimation",
        ICLR 2015 workshop, arXiv:1410.8516.

    Example:
        >>> import torch, flows
        >>> layer = flows.AdditiveCoupling(4, flows.nets.MLP)
        >>> z, logdet = layer(torch.randn(8, 4))
        >>> logdet.shape
        torch.Size([8])
    """

    def __init__(
        self,
        features: int,
        subnet: SubnetFactory,
        mask: str = "channel",
        parity: int = 0,
        context_features: int = 0,
    ) -> None:
        super().__init__(features, subnet, AdditiveMap(), mask, parity, context_features)


class AffineCoupling(Coupling):
    """Affine coupling (RealNVP, Glow): ``y_b = x_b * exp(s(x_a)) + t(x_a)``;
    ``logdet = sum s`` over the transformed entries (:class:`flows.maps.AffineMap`).

    ``scale="exp"`` soft-clamps the log-scale, ``s = c * tanh(h / c)`` (the identity at
    ``h = 0``, so a zero-initialized subnet starts as the identity). ``scale="sigmoid"``
    is Glow's ``exp(s) = sigmoid(h + 2)``, in ``(0, 1)``.

    Args:
        features, subnet, mask, parity, context_features: see :class:`Coupling`.
        scale: ``"exp"`` or ``"sigmoid"``.
        clamp: ``c`` of the soft clamp.

    References:
        Dinh, Sohl-Dickstein & Bengio, "Density estimation using Real NVP", ICLR 2017,
        arXiv:1605.08803. Kingma & Dhariwal, "Glow", NeurIPS 2018, arXiv:1807.03039.

    Example:
        >>> import torch, flows
        >>> layer = flows.AffineCoupling(3, flows.nets.GlowConvNet, mask="checkerboard")
        >>> x = torch.randn(2, 3, 4, 4)
        >>> z, logdet = layer(x)
        >>> torch.allclose(layer.inverse(z)[0], x)
        True
    """

    def __init__(
        self,
        features: int,
        subnet: SubnetFactory,
        mask: str = "channel",
        parity: int = 0,
        context_features: int = 0,
        scale: str = "exp",
        clamp: float = 2.0,
    ) -> None:
        super().__init__(features, subnet, AffineMap(scale, clamp), mask, parity, context_features)


class RQSplineCoupling(Coupling):
    """Rational-quadratic spline coupling (NSF): ``y_b = RQS(x_b; theta(x_a))``;
    ``logdet = sum log RQS'(x_b)`` over the transformed entries (:class:`flows.maps.SplineMap`).

    Each transformed entry gets a monotonic spline with ``num_bins`` bins on
    ``[-tail_bound, tail_bound]`` and the identity outside; the conditioner outputs
    ``3 * num_bins - 1`` parameters per entry. A zero-initialized subnet gives uniform
    bins with unit derivatives: the identity.

    Args:
        features, subnet, mask, parity, context_features: see :class:`Coupling`.
        num_bins: bins ``K`` of each spline.
        tail_bound: ``B``; inputs outside ``[-B, B]`` pass unchanged.

    References:
        Durkan, Bekasov, Murray & Papamakarios, "Neural Spline Flows", NeurIPS 2019,
        arXiv:1906.04032.

    Example:
        >>> import torch, flows
        >>> layer = flows.RQSplineCoupling(4, flows.nets.MLP, num_bins=6)
        >>> z, logdet = layer(torch.randn(3, 4))
        >>> z.shape, logdet.shape
        (torch.Size([3, 4]), torch.Size([3]))
    """

    def __init__(
        self,
        features: int,
        subnet: SubnetFactory,
        mask: str = "channel",
        parity: int = 0,
        context_features: int = 0,
        num_bins: int = 8,
        tail_bound: float = 3.0,
    ) -> None:
        super().__init__(features, subnet, SplineMap(num_bins, tail_bound), mask, parity, context_features)
