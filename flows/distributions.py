"""Base distributions and the density of a flow, ``FlowDistribution``."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from flows.base import Flow

__all__ = ["StandardNormal", "FlowDistribution"]


class StandardNormal(nn.Module):
    """The standard normal on samples of shape ``shape``.

    Args:
        shape: per-sample shape, e.g. ``(D,)`` or ``(C, H, W)``.

    Example:
        >>> base = StandardNormal((2,))
        >>> base.log_prob(torch.zeros(1, 2))
        tensor([-1.8379])
    """

    def __init__(self, shape: tuple[int, ...] | int) -> None:
        super().__init__()
        self.shape = (shape,) if isinstance(shape, int) else tuple(shape)
        # A buffer only to follow the module's device and dtype.
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    def log_prob(self, z: Tensor) -> Tensor:
        """``log N(z; 0, I)`` per sample, ``(B,)``; ``z`` is ``(B, *shape)``."""
        if tuple(z.shape[1:]) != self.shape:
            raise ValueError(
                f"StandardNormal expects samples of shape (B, {', '.join(map(str, self.shape))}), "
                f"got {tuple(z.shape)}"
            )
        dims = math.prod(self.shape)
        return -0.5 * z.flatten(1).pow(2).sum(1) - 0.5 * dims * math.log(2 * math.pi)

    def sample(self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        """``n`` samples ``(n, *shape)`` from ``N(0, temperature^2 I)``."""
        z = torch.randn(n, *self.shape, device=self._anchor.device, dtype=self._anchor.dtype, generator=generator)
        return z * temperature


class FlowDistribution(nn.Module):
    """The density of ``x`` such that ``transform(x)`` follows ``base``.

    ``log p(x) = log p_base(z) + log|det dz/dx|`` with ``z, logdet = transform(x)``;
    sampling draws ``z`` from the base (scaled by ``temperature``) and inverts.

    Args:
        transform: the flow, data -> latent.
        base: a distribution with ``log_prob(z)`` and ``sample(n, temperature)``.

    Example:
        >>> import torch, flows
        >>> dist = FlowDistribution(flows.ActNorm(2), StandardNormal((2,)))
        >>> dist.log_prob(torch.randn(5, 2)).shape, dist.sample(3).shape
        (torch.Size([5]), torch.Size([3, 2]))
    """

    def __init__(self, transform: Flow, base: nn.Module) -> None:
        super().__init__()
        self.transform = transform
        self.base = base

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """``log p(x | context)`` per sample, ``(B,)``, in float32 or wider."""
        z, logdet = self.transform(x, context)
        return self.base.log_prob(z.to(logdet.dtype)) + logdet

    def log_prob_parts(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(log p_base(z), logdet)`` per sample: the two terms of :meth:`log_prob`."""
        z, logdet = self.transform(x, context)
        return self.base.log_prob(z.to(logdet.dtype)), logdet

    @torch.no_grad()
    def sample(self, n: int, context: Tensor | None = None, temperature: float = 1.0) -> Tensor:
        """``n`` samples; with ``context`` of shape ``(n, K)``, sample ``i`` uses row ``i``."""
        if context is not None and context.shape[0] != n:
            raise ValueError(f"FlowDistribution.sample expects context with {n} rows, got {tuple(context.shape)}")
        z = self.base.sample(n, temperature=temperature)
        x, _ = self.transform.inverse(z, context)
        return x
