"""Flows and ``torch.distributions`` transforms, each usable as the other.

- :class:`FlowAsTransform`: a flow where torch expects a ``Transform`` (for example in a
  ``TransformedDistribution``), its ``log_abs_det_jacobian`` the flow's own logdet.
- :class:`TransformAsFlow`: a bijective torch ``Transform`` as a flow, so it composes
  with jacflow layers and the oracle checks it like any layer.
"""

from __future__ import annotations

import torch
from torch import Size, Tensor, nn
from torch.distributions import constraints
from torch.distributions.transforms import Transform

from flows.base import Flow, sum_per_sample

__all__ = ["FlowAsTransform", "TransformAsFlow"]


class FlowAsTransform(Transform):
    """A flow as a ``torch.distributions.Transform``: ``transform(x) = flow(x)[0]``.

    The transform maps like the flow's ``forward`` (data -> latent); its ``.inv`` maps like
    ``inverse``. ``log_abs_det_jacobian(x, y)`` is the flow's logdet, taken from the call
    that produced ``y`` (or ``x`` for ``.inv``) when it is the last one, else recomputed.
    Leading dims beyond one batch dim are flattened for the flow and restored.

    Args:
        flow: the flow.
        event_dim: dims of one sample (1 for vectors, 3 for images).

    Example:
        >>> import torch, flows
        >>> from torch.distributions import Independent, Normal, TransformedDistribution
        >>> flow = flows.ActNorm(2)
        >>> base = Independent(Normal(torch.zeros(2), torch.ones(2)), 1)
        >>> # torch maps base -> data, the flow data -> latent: use the inverse direction.
        >>> dist = TransformedDistribution(base, [FlowAsTransform(flow, event_dim=1).inv])
        >>> x = torch.randn(5, 2)
        >>> torch.allclose(dist.log_prob(x), flows.FlowDistribution(flow, flows.StandardNormal(2)).log_prob(x))
        True
    """

    bijective = True

    def __init__(self, flow: Flow, event_dim: int) -> None:
        if not isinstance(flow, Flow):
            raise TypeError(f"FlowAsTransform expects a flows.Flow, got {type(flow).__name__}")
        if not isinstance(event_dim, int) or event_dim < 1:
            raise ValueError(f"FlowAsTransform expects event_dim >= 1 (dims of one sample), got {event_dim!r}")
        super().__init__()
        self.flow = flow
        self._event_dim = event_dim
        self._last: tuple[Tensor, Tensor, Tensor] | None = None  # (x, y, log|det dy/dx|)

    @property
    def domain(self) -> constraints.Constraint:  # type: ignore[override]
        return constraints.independent(constraints.real, self._event_dim)

    @property
    def codomain(self) -> constraints.Constraint:  # type: ignore[override]
        return constraints.independent(constraints.real, self._event_dim)

    def _leading(self, t: Tensor) -> Size:
        if t.dim() < self._event_dim:
            raise ValueError(
                f"FlowAsTransform expects tensors of at least {self._event_dim} dims, got shape {tuple(t.shape)}"
            )
        return t.shape[: t.dim() - self._event_dim]

    def _run(self, t: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        leading = self._leading(t)
        flat = t.reshape(-1, *t.shape[len(leading):])
        out, logdet = (self.flow.inverse if inverse else self.flow)(flat)
        return out.reshape(*leading, *out.shape[1:]), logdet.reshape(leading)

    def _call(self, x: Tensor) -> Tensor:
        y, logdet = self._run(x, inverse=False)
        self._last = (x, y, logdet)
        return y

    def _inverse(self, y: Tensor) -> Tensor:
        x, inverse_logdet = self._run(y, inverse=True)
        self._last = (x, y, -inverse_logdet)
        return x

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        if self._last is not None and x is self._last[0] and y is self._last[1]:
            return self._last[2]
        return self._run(x, inverse=False)[1]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FlowAsTransform) and other.flow is self.flow

    def __hash__(self) -> int:
        return id(self.flow)


class TransformAsFlow(Flow):
    """A bijective ``torch.distributions.Transform`` as a flow: ``y = transform(x)``,
    ``logdet = log_abs_det_jacobian(x, y)`` summed per sample.

    Accepts ``(B, ...)``; the transform sees the batch as is. A transform that acts
    elementwise (``domain.event_dim == 0``) declares a diagonal Jacobian, which the
    oracle checks. Modules the transform holds (a :class:`FlowAsTransform`'s flow, say)
    are registered, so ``.to()``, ``parameters()`` and ``state_dict`` reach them.

    Args:
        transform: a bijective torch transform (e.g. ``SigmoidTransform()``,
            ``AffineTransform(loc, scale)``, a ``ComposeTransform``).

    Example:
        >>> import torch
        >>> from torch.distributions.transforms import SigmoidTransform
        >>> layer = TransformAsFlow(SigmoidTransform())
        >>> y, logdet = layer(torch.randn(4, 3))
        >>> logdet.shape
        torch.Size([4])
    """

    def __init__(self, transform: Transform) -> None:
        super().__init__()
        if not isinstance(transform, Transform):
            raise TypeError(f"TransformAsFlow expects a torch.distributions.Transform, got {type(transform).__name__}")
        if not transform.bijective:
            raise ValueError(f"TransformAsFlow expects a bijective transform, got {transform}")
        self.transform = transform
        self.held = nn.ModuleList(v for v in vars(transform).values() if isinstance(v, nn.Module))

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        y = self.transform(x)
        return y, sum_per_sample(self.transform.log_abs_det_jacobian(x, y).reshape(x.shape[0], -1))

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x = self.transform.inv(y)
        return x, -sum_per_sample(self.transform.log_abs_det_jacobian(x, y).reshape(y.shape[0], -1))

    def jacobian_mask(self, shape: tuple[int, ...]) -> Tensor | None:
        if self.transform.domain.event_dim != 0:
            return None
        return torch.eye(Size(shape).numel(), dtype=torch.bool)

    def extra_repr(self) -> str:
        return repr(self.transform)
