"""Coupling layers: the input is split by a mask; one part conditions an elementwise
invertible map of the other. Additive (NICE), affine (RealNVP / Glow) and
rational-quadratic spline (NSF) couplings."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flows._checks import check_context, check_input
from flows.base import Flow, zero_logdet
from flows.splines import packed_spline, spline_param_count

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
    """Base of the coupling layers: owns the mask, the conditioner and split / merge.

    ``mask="channel"`` splits dim 1 into halves (for odd counts the halves differ by
    one); the conditioner sees the untouched half (plus context) and outputs the
    parameters of the transformed half. ``mask="checkerboard"`` alternates features of
    vectors or pixels of images; the conditioner sees the whole input with the
    transformed entries zeroed (RealNVP's ``b * x``) and outputs parameters for every
    entry, of which the masked ones are used. ``parity=1`` swaps the two parts.
    Subclasses implement :meth:`transform` and :meth:`inverse_transform`, elementwise
    maps given parameters of shape ``(*x.shape, params_per_feature)``.

    Args:
        num_features: size of dim 1 of ``(B, D)`` or ``(B, C, H, W)`` inputs.
        subnet: factory ``(in_features, out_features) -> nn.Module`` for the conditioner.
        mask: ``"channel"`` or ``"checkerboard"``.
        parity: 0 or 1, which part is transformed.
        context_features: size ``K`` of a ``(B, K)`` context concatenated to the
            conditioner's input (broadcast over space for images); 0 for none.
        params_per_feature: parameters the elementwise map takes per entry.
    """

    def __init__(
        self,
        num_features: int,
        subnet: SubnetFactory,
        mask: str = "channel",
        parity: int = 0,
        context_features: int = 0,
        params_per_feature: int = 1,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if mask not in ("channel", "checkerboard"):
            raise ValueError(f"{name} mask must be 'channel' or 'checkerboard', got {mask!r}")
        if parity not in (0, 1):
            raise ValueError(f"{name} parity must be 0 or 1, got {parity!r}")
        if num_features < 2 and mask == "channel":
            raise ValueError(f"{name} with a channel mask needs num_features >= 2, got {num_features}")
        self.num_features = num_features
        self.mask = mask
        self.parity = parity
        self.context_features = context_features
        self.params_per_feature = params_per_feature
        self._masks: dict[tuple, Tensor] = {}  # checkerboard masks by (shape, device, inference mode)
        half = num_features // 2
        # parity 0 transforms the second half [half, D), parity 1 the first [0, half).
        self._transformed = slice(half, None) if parity == 0 else slice(0, half)
        self._channel_split = (half, num_features - half)  # (first, second) part sizes on dim 1
        if mask == "channel":
            n_in = self._channel_split[parity]  # the conditioning part: first for parity 0
            n_out = num_features - n_in
        else:
            n_in, n_out = num_features, num_features
        self.subnet = subnet(n_in + context_features, n_out * params_per_feature)

    def transform(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor | None]:
        """Elementwise map of the transformed entries: ``(y, log|dy/dx| per entry or None)``."""
        raise NotImplementedError

    def inverse_transform(self, y: Tensor, params: Tensor) -> tuple[Tensor, Tensor | None]:
        """Inverse of :meth:`transform`: ``(x, log|dx/dy| per entry or None)``."""
        raise NotImplementedError

    def _params(self, conditioner_input: Tensor, context: Tensor | None) -> Tensor:
        """Runs the conditioner; returns ``(B, n, *spatial, params_per_feature)``."""
        if self.context_features:
            ctx = context.view(*context.shape, *([1] * (conditioner_input.dim() - 2)))
            ctx = ctx.expand(-1, -1, *conditioner_input.shape[2:])  # (B, K, H, W) for images
            conditioner_input = torch.cat([conditioner_input, ctx.to(conditioner_input.dtype)], 1)
        h = self.subnet(conditioner_input)  # (B, n * P, *spatial)
        h = h.reshape(h.shape[0], -1, self.params_per_feature, *h.shape[2:])  # (B, n, P, *spatial)
        return h.movedim(2, -1)

    def _validate(self, x: Tensor, context: Tensor | None) -> None:
        name = type(self).__name__
        check_input(name, x, self.num_features)
        check_context(name, context, self.context_features, x.shape[0])

    def _couple(self, x: Tensor, context: Tensor | None, inverse: bool) -> tuple[Tensor, Tensor]:
        self._validate(x, context)
        elementwise = self.inverse_transform if inverse else self.transform
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
        logdet = selected.flatten(1).sum(1)
        return y, logdet.to(torch.promote_types(logdet.dtype, torch.float32))

    def _checkerboard_on(self, x: Tensor) -> Tensor:
        """The ``(1, *sample shape)`` checkerboard on ``x``'s device, built once per shape.

        Cached so that no mask is rebuilt and copied to the device on every call; the
        key holds the inference mode, since a mask made under ``torch.inference_mode``
        cannot be saved for a later backward pass.
        """
        key = (tuple(x.shape[1:]), x.device, torch.is_inference_mode_enabled())
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
        num_features: int,
        subnet: SubnetFactory,
        mask: str = "channel",
        parity: int = 0,
        context_features: int = 0,
    ) -> None:
        super().__init__(num_features, subnet, mask, parity, context_features, params_per_feature=1)

    def transform(self, x: Tensor, params: Tensor) -> tuple[Tensor, None]:
        return x + params.squeeze(-1), None

    def inverse_transform(self, y: Tensor, params: Tensor) -> tuple[Tensor, None]:
        return y - params.squeeze(-1), None


class AffineCoupling(Coupling):
    """Affine coupling (RealNVP, Glow): ``y_b = x_b * scale(x_a) + shift(x_a)``;
    ``logdet = sum log scale`` over the transformed entries.

    ``scale="exp"`` uses a soft-clamped exponential ``exp(c * tanh(h / c))`` (bounded
    by ``e^±c``; the identity at ``h = 0``, so a zero-initialised subnet starts as the
    identity). ``scale="sigmoid"`` is Glow's ``sigmoid(h + 2)``, in ``(0, 1)``.

    Args:
        num_features, subnet, mask, parity, context_features: see :class:`Coupling`.
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
        num_features: int,
        subnet: SubnetFactory,
        mask: str = "channel",
        parity: int = 0,
        context_features: int = 0,
        scale: str = "exp",
        clamp: float = 2.0,
    ) -> None:
        if scale not in ("exp", "sigmoid"):
            raise ValueError(f"AffineCoupling scale must be 'exp' or 'sigmoid', got {scale!r}")
        super().__init__(num_features, subnet, mask, parity, context_features, params_per_feature=2)
        self.scale = scale
        self.clamp = clamp

    def _shift_log_scale(self, params: Tensor) -> tuple[Tensor, Tensor]:
        # Unbound on the dim where the conditioner laid them out (``_params`` moved it last as
        # a view), so backward stacks the two gradients straight into the conditioner's
        # layout: one stack, no zero-filled selects, no copy to make it contiguous again.
        shift, h = params.movedim(-1, 2).unbind(2)
        if self.scale == "sigmoid":
            return shift, F.logsigmoid(h + 2.0)
        return shift, self.clamp * torch.tanh(h / self.clamp)

    def transform(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        shift, log_scale = self._shift_log_scale(params)
        return x * log_scale.exp() + shift, log_scale

    def inverse_transform(self, y: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        shift, log_scale = self._shift_log_scale(params)
        return (y - shift) * torch.exp(-log_scale), -log_scale


class RQSplineCoupling(Coupling):
    """Rational-quadratic spline coupling (NSF): ``y_b = RQS(x_b; theta(x_a))``;
    ``logdet = sum log RQS'(x_b)`` over the transformed entries.

    Each transformed entry gets a monotonic spline with ``num_bins`` bins on
    ``[-tail_bound, tail_bound]`` and the identity outside (see
    :func:`flows.splines.rational_quadratic_spline`); the conditioner outputs
    ``3 * num_bins - 1`` parameters per entry. A zero-initialised subnet gives uniform
    bins with unit derivatives: the identity.

    Args:
        num_features, subnet, mask, parity, context_features: see :class:`Coupling`.
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
        num_features: int,
        subnet: SubnetFactory,
        mask: str = "channel",
        parity: int = 0,
        context_features: int = 0,
        num_bins: int = 8,
        tail_bound: float = 3.0,
    ) -> None:
        if num_bins < 1:
            raise ValueError(f"RQSplineCoupling needs num_bins >= 1, got {num_bins}")
        super().__init__(
            num_features, subnet, mask, parity, context_features, params_per_feature=spline_param_count(num_bins)
        )
        self.num_bins = num_bins
        self.tail_bound = tail_bound

    def transform(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        return packed_spline(x, params, inverse=False, tail_bound=self.tail_bound)

    def inverse_transform(self, y: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        return packed_spline(y, params, inverse=True, tail_bound=self.tail_bound)
