"""Multi-scale plumbing: space-to-depth squeezing and the split / factor-out layer."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from flows.base import Flow, accumulate, sum_per_sample, zero_logdet
from flows.maps import AffineMap
from flows.validation import check_input

__all__ = ["Flatten", "Squeeze", "Split"]


class Squeeze(Flow):
    """Space-to-depth: ``(B, C, H, W) -> (B, C*f*f, H/f, W/f)``; ``logdet = 0``.

    Each ``f x f`` block of pixels becomes ``f*f`` channels (Glow's ordering: channel
    ``c*f*f + i*f + j`` holds pixel ``(i, j)`` of the block of channel ``c``). Use
    ``flows.Inverse(Squeeze())`` to unsqueeze.

    Args:
        factor: the block size ``f``; ``H`` and ``W`` must be divisible by it.

    References:
        Dinh, Sohl-Dickstein & Bengio, "Density estimation using Real NVP", ICLR 2017,
        arXiv:1605.08803.

    Example:
        >>> import torch, flows
        >>> flows.Squeeze()(torch.randn(1, 3, 4, 6))[0].shape
        torch.Size([1, 12, 2, 3])
    """

    def __init__(self, factor: int = 2) -> None:
        super().__init__()
        if factor < 1:
            raise ValueError(f"Squeeze needs factor >= 1, got {factor}")
        self.factor = factor

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_input("Squeeze", x, ranks=(4,))
        f = self.factor
        b, c, h, w = x.shape
        if h % f or w % f:
            raise ValueError(
                f"Squeeze(factor={f}) needs H and W divisible by {f}, got input of shape "
                f"{tuple(x.shape)}; pad or crop to a multiple of {f}"
            )
        y = x.reshape(b, c, h // f, f, w // f, f)  # (B, C, H/f, f, W/f, f)
        y = y.permute(0, 1, 3, 5, 2, 4)  # (B, C, f, f, H/f, W/f)
        return y.reshape(b, c * f * f, h // f, w // f), zero_logdet(x)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_input("Squeeze.inverse", y, ranks=(4,))
        f = self.factor
        b, c, h, w = y.shape
        if c % (f * f):
            raise ValueError(
                f"Squeeze(factor={f}).inverse needs channels divisible by {f * f}, got input "
                f"of shape {tuple(y.shape)}"
            )
        x = y.reshape(b, c // (f * f), f, f, h, w).permute(0, 1, 4, 2, 5, 3)  # (B, C, H, f, W, f)
        return x.reshape(b, c // (f * f), h * f, w * f), zero_logdet(y)


class Flatten(Flow):
    """``(B, *shape) -> (B, prod(shape))``; ``logdet = 0``. Lets vector layers act on images.

    Args:
        shape: one sample's shape, e.g. ``(C, H, W)``.

    Example:
        >>> import torch, flows
        >>> flows.Flatten((3, 2, 2))(torch.randn(5, 3, 2, 2))[0].shape
        torch.Size([5, 12])
    """

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = tuple(int(s) for s in shape)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"Flatten expects input of shape (B, {', '.join(map(str, self.shape))}), got {tuple(x.shape)}")
        return x.flatten(1), zero_logdet(x)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        size = math.prod(self.shape)
        if y.dim() != 2 or y.shape[1] != size:
            raise ValueError(f"Flatten.inverse expects input of shape (B, {size}), got {tuple(y.shape)}")
        return y.reshape(y.shape[0], *self.shape), zero_logdet(y)

    def jacobian_mask(self, shape: tuple[int, ...]) -> Tensor:
        return torch.eye(math.prod(shape), dtype=torch.bool)


class Split(Flow):
    """Factor-out: keeps the first channels for ``flow``, the rest leave the stack.

    With ``x = [x1, x2]`` split on dim 1 (``x1`` has ``kept`` channels):
    ``y = [flow(x1), prior(x2 | x1)]`` where the learned prior is Glow's conditional
    affine map ``prior(x2 | x1) = x2 * exp(s(x1)) + t(x1)`` (:class:`flows.maps.AffineMap`;
    the identity when ``prior_net`` is ``None``, as in RealNVP). Glow writes it
    ``(x2 - mu) / sigma``: the same map with ``s = -log sigma``, ``t = -mu / sigma``. So the
    output has the input's shape, the whole multi-scale model stays one bijection, and
    the base distribution is the only distribution. ``logdet = logdet_flow + sum(s)``.

    Sampling inverts it exactly: ``x1 = flow^-1(y1)``, then ``x2 = (y2 - t(x1)) exp(-s(x1))``
    with ``y2`` drawn from the base (scaled by the temperature there).

    Args:
        flow: the flow applied to the kept channels (the next levels), shape-preserving.
        features: channels ``C`` of the input (the size of dim 1).
        kept: channels kept (default ``C // 2``).
        prior_net: factory ``(kept, 2 * (C - kept)) -> nn.Module`` for the prior's
            parameters (zero-initialized last layer: the prior starts standard normal),
            or ``None``.
        clamp: bound of the prior's log-scale ``s`` (the soft clamp of :class:`flows.maps.AffineMap`);
            wider than a coupling's, since a factored-out part given the kept one may
            legitimately have a small spread.

    Example:
        >>> import torch, flows
        >>> split = flows.Split(flows.ActNorm(2), features=4)
        >>> split(torch.randn(3, 4, 2, 2))[0].shape
        torch.Size([3, 4, 2, 2])
    """

    def __init__(
        self,
        flow: Flow,
        features: int,
        kept: int | None = None,
        prior_net: Callable[[int, int], nn.Module] | None = None,
        clamp: float = 8.0,
    ) -> None:
        super().__init__()
        kept = features // 2 if kept is None else kept
        if not 0 < kept < features:
            raise ValueError(f"Split needs 0 < kept < features, got kept={kept}, features={features}")
        self.flow = flow
        self.features = features
        self.kept = kept
        self.elementwise = AffineMap("exp", clamp)
        self.prior = None if prior_net is None else prior_net(kept, 2 * (features - kept))

    def _prior_params(self, x1: Tensor) -> Tensor:
        """The prior's ``(B, C - kept, *spatial, 2)`` parameters, shift then raw log-scale per channel."""
        h = self.prior(x1)  # (B, 2 (C - kept), *spatial), channels interleaved (t_0, h_0, t_1, ...)
        return h.reshape(h.shape[0], -1, 2, *h.shape[2:]).movedim(2, -1)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_input("Split", x, self.features)
        x1, x2 = x.split((self.kept, self.features - self.kept), dim=1)
        logdet = zero_logdet(x)
        if self.prior is not None:
            x2, log_derivative = self.elementwise.forward(x2, self._prior_params(x1))
            logdet = logdet + sum_per_sample(log_derivative)
        y1, logdet1 = self.flow(x1, context)
        return torch.cat([y1, x2], dim=1), accumulate(logdet, logdet1)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_input("Split", y, self.features)
        y1, y2 = y.split((self.kept, self.features - self.kept), dim=1)
        x1, logdet = self.flow.inverse(y1, context)
        logdet = accumulate(zero_logdet(y), logdet)
        if self.prior is not None:
            y2, log_derivative = self.elementwise.inverse(y2, self._prior_params(x1))
            logdet = logdet + sum_per_sample(log_derivative)
        return torch.cat([x1, y2], dim=1), logdet
