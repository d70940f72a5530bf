"""Base distributions of flows, as torch distributions that are also modules.

Shapes follow ``torch.distributions``: ``event_shape`` is one sample's shape and
``sample(sample_shape, context)`` returns ``sample_shape + context.shape[:-1] + event_shape``;
``log_prob(z, context)`` sums over the event dims. Being modules, the bases follow
``.to(device, dtype)`` and can learn; each takes a ``temperature`` when sampling (the
spread is scaled by it). ``FlowDistribution`` (flows/distributions.py) builds on them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Size, Tensor, nn
from torch.distributions import Distribution, constraints


__all__ = ["StandardNormal", "DiagonalNormal", "GaussianMixture", "ModuleDistribution", "TorchBase"]

ShapeLike = int | Sequence[int] | Size


def _size(shape: ShapeLike) -> Size:
    return Size((shape,)) if isinstance(shape, int) else Size(shape)


def _check_temperature(owner: str, temperature: float) -> None:
    if not temperature >= 0:
        raise ValueError(f"{owner} expects a temperature >= 0, got {temperature}")


def _check_sample_shape(owner: str, sample_shape: ShapeLike) -> Size:
    shape = _size(sample_shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"{owner} expects a sample shape of sizes >= 0, got {tuple(shape)}")
    return shape


class ModuleDistribution(nn.Module, Distribution):
    """A ``torch.distributions.Distribution`` that is also an ``nn.Module``.

    The module side gives parameters, buffers, ``.to()``, ``state_dict`` and ``forward``
    (which returns ``log_prob``); the distribution side gives torch's interface.
    """

    has_rsample = True
    arg_constraints: dict = {}

    def __init__(self, event_shape: Size) -> None:
        nn.Module.__init__(self)
        Distribution.__init__(self, batch_shape=Size(), event_shape=event_shape, validate_args=False)
        # A buffer only to follow the module's device and dtype.
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    @property
    def support(self) -> constraints.Constraint:
        return constraints.independent(constraints.real, len(self.event_shape))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """``log_prob(x, context)``, so ``module(x)``, DDP and ``torch.compile`` work directly."""
        return self.log_prob(x, context)

    def sample(self, sample_shape: ShapeLike = Size(), context: Tensor | None = None,
               temperature: float = 1.0) -> Tensor:
        """:meth:`rsample` without gradients."""
        with torch.no_grad():
            return self.rsample(sample_shape, context, temperature)

    def _leading(self, x: Tensor, owner: str) -> Size:
        """``x``'s shape before its event dims; raises unless its last dims are the event shape."""
        k = len(self.event_shape)
        if x.dim() < k or x.shape[x.dim() - k:] != self.event_shape:
            raise ValueError(
                f"{owner} expects samples of shape (..., {', '.join(map(str, self.event_shape))}), "
                f"got {tuple(x.shape)}"
            )
        return x.shape[: x.dim() - k]

    def __repr__(self) -> str:
        return nn.Module.__repr__(self)


class StandardNormal(ModuleDistribution):
    """``N(0, I)`` on events of shape ``shape``; ignores any context.

    Args:
        shape: the event shape, e.g. ``(D,)`` or ``(C, H, W)``.

    Example:
        >>> import torch
        >>> base = StandardNormal((2,))
        >>> base.log_prob(torch.zeros(1, 2))
        tensor([-1.8379])
        >>> base.sample((3,)).shape
        torch.Size([3, 2])
    """

    def __init__(self, shape: ShapeLike) -> None:
        super().__init__(_size(shape))
        self.shape = tuple(self.event_shape)  # one sample's shape

    def log_prob(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        """``log N(z; 0, I)`` over the event dims: ``z`` is ``(..., *shape)``, the result ``(...)``."""
        self._leading(z, "StandardNormal")
        dims = self.event_shape.numel()
        z = z.flatten(z.dim() - len(self.event_shape)) if self.event_shape else z.unsqueeze(-1)
        return -0.5 * z.pow(2).sum(-1) - 0.5 * dims * math.log(2 * math.pi)

    def rsample(self, sample_shape: ShapeLike = Size(), context: Tensor | None = None,
                temperature: float = 1.0) -> Tensor:
        """``sample_shape + context.shape[:-1] + shape`` draws from ``N(0, temperature^2 I)``."""
        _check_temperature("StandardNormal", temperature)
        batch = Size() if context is None else context.shape[:-1]
        shape = _check_sample_shape("StandardNormal", sample_shape) + batch + self.event_shape
        return torch.randn(shape, device=self._anchor.device, dtype=self._anchor.dtype) * temperature


class DiagonalNormal(ModuleDistribution):
    """A learnable ``N(mu, diag(sigma^2))``, optionally conditioned on a context.

    Without context ``mu`` and ``log sigma`` are parameters (initialized to 0: the
    standard normal). With ``context_features=K`` they are ``net(context)``, a network
    ``(K,) -> 2 * prod(shape)`` whose last layer starts at zero.

    Args:
        shape: the event shape.
        context_features: size ``K`` of a ``(..., K)`` context; 0 for none.
        net: factory ``(in_features, out_features) -> nn.Module`` of the context network
            (default :class:`flows.nets.MLP`).

    Example:
        >>> import torch
        >>> base = DiagonalNormal((3,), context_features=2)
        >>> base.rsample((5,), context=torch.randn(4, 2)).shape
        torch.Size([5, 4, 3])
    """

    def __init__(self, shape: ShapeLike, context_features: int = 0, net=None) -> None:
        super().__init__(_size(shape))
        size = self.event_shape.numel()
        self.context_features = context_features
        if context_features:
            from flows.nets import MLP

            self.net = (net or MLP)(context_features, 2 * size)
        else:
            self.loc = nn.Parameter(torch.zeros(size))
            self.log_scale = nn.Parameter(torch.zeros(size))

    def _params(self, context: Tensor | None, batch: Size) -> tuple[Tensor, Tensor]:
        """``(mu, log sigma)``, each ``batch + (prod(shape),)``."""
        _check_context("DiagonalNormal", context, self.context_features)
        if not self.context_features:
            return self.loc, self.log_scale
        h = self.net(context.reshape(-1, self.context_features)).reshape(*batch, 2, -1)
        return h[..., 0, :], h[..., 1, :]

    def log_prob(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        """``log N(z; mu, sigma^2)`` over the event dims; ``z`` is ``(..., *shape)``."""
        leading = self._leading(z, "DiagonalNormal")
        batch = leading if context is None else context.shape[:-1]
        loc, log_scale = self._params(context, batch)
        flat = z.reshape(*leading, -1)
        u = (flat - loc) * torch.exp(-log_scale)
        total = -0.5 * u.pow(2) - log_scale - 0.5 * math.log(2 * math.pi)
        return total.sum(-1)

    def rsample(self, sample_shape: ShapeLike = Size(), context: Tensor | None = None,
                temperature: float = 1.0) -> Tensor:
        """``sample_shape + context.shape[:-1] + shape`` draws, the spread scaled by ``temperature``."""
        _check_temperature("DiagonalNormal", temperature)
        batch = Size() if context is None else context.shape[:-1]
        sample_shape = _check_sample_shape("DiagonalNormal", sample_shape)
        loc, log_scale = self._params(context, batch)
        eps = torch.randn(sample_shape + batch + (self.event_shape.numel(),), device=self._anchor.device,
                          dtype=loc.dtype)
        return (loc + eps * temperature * log_scale.exp()).reshape(sample_shape + batch + self.event_shape)


class GaussianMixture(ModuleDistribution):
    """A learnable mixture of ``num_components`` diagonal Gaussians, optionally conditioned.

    ``p(z) = sum_k w_k N(z; mu_k, diag(sigma_k^2))``. Without context the weights (as
    logits), means and log-scales are parameters (means drawn from ``N(0, I)``, scales
    1). With ``context_features=K`` a network of the context adds to each of them (its
    last layer starts at zero, so a new mixture does not depend on the context).
    Sampling picks a component, then draws from it (reparameterized given the
    component, so ``rsample`` carries gradients to means and scales, not to weights).

    Args:
        shape: the event shape.
        num_components: ``K`` components.
        context_features: size of a ``(..., K)`` context; 0 for none.
        net: factory of the context network (default :class:`flows.nets.MLP`).

    Example:
        >>> import torch
        >>> mixture = GaussianMixture((2,), num_components=3)
        >>> mixture.log_prob(mixture.sample((4,))).shape
        torch.Size([4])
    """

    def __init__(self, shape: ShapeLike, num_components: int = 8, context_features: int = 0, net=None) -> None:
        super().__init__(_size(shape))
        if not isinstance(num_components, int) or num_components < 1:
            raise ValueError(f"GaussianMixture expects num_components >= 1, got {num_components!r}")
        size = self.event_shape.numel()
        self.num_components = num_components
        self.context_features = context_features
        self.logits = nn.Parameter(torch.zeros(num_components))
        self.loc = nn.Parameter(torch.randn(num_components, size))
        self.log_scale = nn.Parameter(torch.zeros(num_components, size))
        if context_features:
            from flows.nets import MLP

            self.net = (net or MLP)(context_features, num_components * (1 + 2 * size))

    def _params(self, context: Tensor | None, batch: Size) -> tuple[Tensor, Tensor, Tensor]:
        """Log-weights ``batch + (K,)``, means and log-scales ``batch + (K, prod(shape))``."""
        _check_context("GaussianMixture", context, self.context_features)
        logits, loc, log_scale = self.logits, self.loc, self.log_scale
        if self.context_features:
            h = self.net(context.reshape(-1, self.context_features)).reshape(*batch, self.num_components, -1)
            size = self.event_shape.numel()
            logits = logits + h[..., 0]
            loc = loc + h[..., 1 : 1 + size]
            log_scale = log_scale + h[..., 1 + size :]
        return torch.log_softmax(logits, -1), loc, log_scale

    def log_prob(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        """``log p(z)`` over the event dims; ``z`` is ``(..., *shape)``."""
        leading = self._leading(z, "GaussianMixture")
        batch = leading if context is None else context.shape[:-1]
        log_weights, loc, log_scale = self._params(context, batch)
        flat = z.reshape(*leading, 1, -1)  # (..., 1, D) against (..., K, D)
        u = (flat - loc) * torch.exp(-log_scale)
        per_component = (-0.5 * u.pow(2) - log_scale - 0.5 * math.log(2 * math.pi)).sum(-1)
        return torch.logsumexp(log_weights + per_component, -1)

    def rsample(self, sample_shape: ShapeLike = Size(), context: Tensor | None = None,
                temperature: float = 1.0) -> Tensor:
        """``sample_shape + context.shape[:-1] + shape`` draws; every component's spread
        is scaled by ``temperature``."""
        _check_temperature("GaussianMixture", temperature)
        batch = Size() if context is None else context.shape[:-1]
        sample_shape = _check_sample_shape("GaussianMixture", sample_shape)
        log_weights, loc, log_scale = self._params(context, batch)
        shape = sample_shape + batch
        component = torch.distributions.Categorical(logits=log_weights.expand(*shape, -1)).sample()
        pick = component[..., None, None].expand(*shape, 1, loc.shape[-1])  # (..., 1, D)
        chosen_loc = torch.gather(loc.expand(*shape, *loc.shape[-2:]), -2, pick).squeeze(-2)
        chosen_scale = torch.gather(log_scale.expand(*shape, *loc.shape[-2:]), -2, pick).squeeze(-2).exp()
        eps = torch.randn_like(chosen_loc)
        return (chosen_loc + eps * temperature * chosen_scale).reshape(shape + self.event_shape)


def _check_context(owner: str, context: Tensor | None, features: int) -> None:
    if features == 0:
        if context is not None:
            raise ValueError(
                f"{owner} was built without context (context_features=0) but got a context of shape "
                f"{tuple(context.shape)}"
            )
        return
    if context is None or context.shape[-1:] != (features,):
        got = None if context is None else tuple(context.shape)
        raise ValueError(f"{owner} expects a context of shape (..., {features}), got {got}")


class TorchBase(nn.Module):
    """Adapts a ``torch.distributions.Distribution`` to the bases' calls (no context or temperature)."""

    def __init__(self, distribution: Distribution) -> None:
        super().__init__()
        self.distribution = distribution
        self.event_shape = distribution.event_shape

    def log_prob(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        return self.distribution.log_prob(z)

    def rsample(self, sample_shape: ShapeLike = Size(), context: Tensor | None = None,
                temperature: float = 1.0) -> Tensor:
        name = type(self.distribution).__name__
        if temperature != 1.0:
            raise ValueError(
                f"FlowDistribution's base {name} has no temperature; use temperature=1.0, or a base from "
                f"flows.distributions (StandardNormal, DiagonalNormal, GaussianMixture)"
            )
        if context is not None:
            raise ValueError(f"FlowDistribution's base {name} takes no context; its batch shape is fixed")
        shape = _size(sample_shape)
        if self.distribution.has_rsample:
            return self.distribution.rsample(shape)
        return self.distribution.sample(shape)

    def extra_repr(self) -> str:
        return repr(self.distribution)
