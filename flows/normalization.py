"""Activation normalization (Glow's ActNorm)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from flows.base import Flow, constant_logdet, spatial_size
from flows.validation import check_input

__all__ = ["ActNorm"]


def _channel_view(t: Tensor, x: Tensor) -> Tensor:
    """Reshapes a ``(C,)`` parameter to broadcast over ``x`` (``(1, C)`` or ``(1, C, 1, 1)``)."""
    return t.view(1, -1, *([1] * (x.dim() - 2)))


class ActNorm(Flow):
    """Per-channel affine normalization with data-dependent initialization.

    ``y = (x + bias) * exp(log_scale)``, per channel on dim 1;
    ``logdet = H*W * sum(log_scale)`` (``H*W = 1`` for vectors).

    Accepts ``(B, C)`` and ``(B, C, H, W)``. On the first ``forward`` in training mode
    (or an explicit :meth:`initialize`) bias and scale are set so that the output has
    zero mean and unit variance per channel; statistics are averaged over all processes
    when ``torch.distributed`` is initialized. A channel with zero variance keeps scale
    1. Whether it is initialized is a persistent buffer, so a loaded model is never
    re-initialized; a Python mirror of it avoids a host sync on every call.

    Args:
        features: channels ``C`` (the size of dim 1).
        eps: standard deviations below this count as zero variance.

    References:
        Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions",
        NeurIPS 2018, arXiv:1807.03039.

    Example:
        >>> import torch, flows
        >>> layer = flows.ActNorm(3)
        >>> y, logdet = layer(torch.randn(16, 3, 4, 4) * 5 + 2)
        >>> bool(y.mean().abs() < 1e-5), logdet.shape
        (True, torch.Size([16]))
    """

    def __init__(self, features: int, eps: float = 1e-6) -> None:
        super().__init__()
        if features < 1:
            raise ValueError(f"ActNorm needs features >= 1, got {features}")
        self.features = features
        self.eps = eps
        self.bias = nn.Parameter(torch.zeros(features))
        self.log_scale = nn.Parameter(torch.zeros(features))
        self.register_buffer("initialized", torch.tensor(False))
        self._is_initialized = False
        self.register_load_state_dict_post_hook(_sync_initialized_flag)

    @property
    def is_initialized(self) -> bool:
        return self._is_initialized

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Sets bias and scale from the batch ``x`` so its output is standardized per channel."""
        check_input("ActNorm", x, self.features)
        dims = [d for d in range(x.dim()) if d != 1]
        x = x.double()
        count = torch.tensor(float(x.numel() // x.shape[1]), device=x.device, dtype=torch.float64)
        mean = _global_sum(x.sum(dims)) / _global_sum(count)
        # Two passes (mean, then centered second moment) avoid the cancellation of E[x^2] - mean^2.
        var = _global_sum(((x - _channel_view(mean, x)) ** 2).sum(dims)) / _global_sum(count)
        std = var.sqrt()
        # A constant channel has nothing to normalize: keep its scale at 1 rather than
        # dividing by zero (which would give inf, or a huge spurious logdet).
        log_scale = torch.where(std > self.eps, -torch.log(std.clamp_min(self.eps)), torch.zeros_like(std))
        self.bias.copy_(-mean.to(self.bias.dtype))
        self.log_scale.copy_(log_scale.to(self.log_scale.dtype))
        self.initialized.fill_(True)
        self._is_initialized = True

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_input("ActNorm", x, self.features)
        if self.training and not self._is_initialized:
            self.initialize(x)
        y = (x + _channel_view(self.bias, x)) * _channel_view(self.log_scale.exp(), x)
        return y, self._logdet(x)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_input("ActNorm", y, self.features)
        x = y * _channel_view(torch.exp(-self.log_scale), y) - _channel_view(self.bias, y)
        return x, -self._logdet(y)

    def _logdet(self, x: Tensor) -> Tensor:
        return constant_logdet(self.log_scale.sum() * spatial_size(x), x)

    def jacobian_mask(self, shape: tuple[int, ...]) -> Tensor:
        size = torch.Size(shape).numel()
        return torch.eye(size, dtype=torch.bool)


def _global_sum(t: Tensor) -> Tensor:
    """Sum over all processes when ``torch.distributed`` is initialized; ``t`` otherwise."""
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
    return t


def _sync_initialized_flag(module: ActNorm, incompatible_keys) -> None:
    """After ``load_state_dict``: mirror the loaded buffer (one host sync, at load time)."""
    module._is_initialized = bool(module.initialized)
