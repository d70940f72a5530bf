"""The flow contract: `Flow`, composition with `Sequential`, and `Inverse`.

Direction convention (as in nflows, FrEIA and Glow): ``forward`` maps data ``x`` to
latent ``z`` (the density direction) and ``inverse`` maps latent to data. Both return
``(output, logdet)`` where ``logdet`` has shape ``(batch,)`` and is ``log|det dy/dx|``
of the map that method computes, so ``forward`` then ``inverse`` sums to zero.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

__all__ = [
    "Flow", "InverseNotAvailable", "Sequential", "Inverse", "InverseFlow",
    "zero_logdet", "sum_per_sample", "constant_logdet", "logdet_dtype", "inside_function_transform",
]


class InverseNotAvailable(NotImplementedError):
    """Raised by ``inverse`` of a flow that has no closed-form inverse."""


def logdet_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a logdet is kept in: ``dtype`` widened to at least float32.

    Under mixed precision a layer computes in bf16/fp16; summing its per-entry terms in
    half precision would lose the small ones, so every logdet is summed and kept wide.
    """
    return torch.promote_types(dtype, torch.float32)


def zero_logdet(x: Tensor) -> Tensor:
    """A ``(batch,)`` tensor of zeros in float32 or wider, on ``x``'s device."""
    return torch.zeros(x.shape[0], dtype=logdet_dtype(x.dtype), device=x.device)


def sum_per_sample(values: Tensor) -> Tensor:
    """``(B, ...)`` per-entry log-derivatives summed per sample: a ``(B,)`` logdet.

    The sum runs in float32 or wider (:func:`logdet_dtype`), never in half precision.
    """
    return values.reshape(values.shape[0], -1).sum(1, dtype=logdet_dtype(values.dtype))


def constant_logdet(value: Tensor | float, x: Tensor) -> Tensor:
    """A logdet that is the same for every sample of ``x``: ``value`` as a ``(B,)`` tensor.

    ``value`` is a number or a 0-d tensor (e.g. ``H*W * sum(log_scale)``); a tensor keeps
    its autograd graph, and the result is an expanded view (no copy per sample).
    """
    dtype = logdet_dtype(x.dtype)
    if not isinstance(value, Tensor):
        return torch.full((x.shape[0],), value, dtype=dtype, device=x.device)
    return value.to(logdet_dtype(value.dtype)).expand(x.shape[0])


def spatial_size(x: Tensor) -> int:
    """Positions that share one channel's parameters: ``H*W`` for ``(B, C, H, W)``, 1 for ``(B, D)``.

    From the shape alone (indexing ``x`` to count would dispatch a tensor op per call).
    """
    return math.prod(x.shape[2:])


def inside_function_transform() -> bool:
    """Whether a ``torch.func`` transform (grad, jvp, vmap) is running.

    Inside one, every tensor an op makes is wrapped for that transform's level, so a layer
    must not keep such a tensor in a cache: it would escape the transform and break the
    next call. (There is no public API for this; ``peek_interpreter_stack`` is functorch's.)
    """
    return torch._C._functorch.peek_interpreter_stack() is not None


def accumulate(total: Tensor, logdet: Tensor) -> Tensor:
    """Adds a layer's logdet to a running total, never narrower than float32.

    A layer's logdet is already wide (:func:`logdet_dtype`); the cast only guards
    layers written elsewhere.
    """
    return total + logdet.to(total.dtype)


def compose(flows: Iterable[Flow], x: Tensor, context: Tensor | None, inverted: bool) -> tuple[Tensor, Tensor]:
    """``flows`` applied in the order given (their ``inverse`` if ``inverted``), logdets summed."""
    total = zero_logdet(x)
    for flow in flows:
        x, logdet = flow.inverse(x, context) if inverted else flow(x, context)
        total = accumulate(total, logdet)
    return x, total


class Flow(nn.Module):
    """Base class of every invertible layer.

    Subclasses implement ``forward(x, context=None) -> (y, logdet)`` (data -> latent)
    and ``inverse(y, context=None) -> (x, logdet)``; ``logdet`` is ``(batch,)`` and is
    ``log|det J|`` of the direction computed. ``context`` is accepted by every flow and
    ignored by flows without a conditioner.

    A flow may declare the sparsity of its per-sample Jacobian by overriding
    :meth:`jacobian_mask`; :func:`flows.jacobian.check_flow` then verifies it.

    Attributes:
        iterative_inverse: ``True`` for a flow whose ``inverse`` is not one closed-form
            step (an autoregressive layer's takes ``D`` passes); memory-saving
            backpropagation, which recomputes inputs through ``inverse``, checks it.
    """

    iterative_inverse: bool = False

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} does not implement forward")

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        raise InverseNotAvailable(f"{type(self).__name__} has no closed-form inverse")

    def jacobian_mask(self, shape: tuple[int, ...]) -> Tensor | None:
        """Entries of the per-sample Jacobian ``dy/dx`` that may be non-zero.

        Args:
            shape: the shape of one input sample, without the batch dimension.

        Returns:
            ``None`` (no structure declared) or a bool tensor ``(D_out, D_in)`` over the
            flattened sample, ``True`` where ``dy_i/dx_j`` is allowed to be non-zero.
        """
        return None


class Sequential(Flow):
    """Composition ``f_n ∘ ... ∘ f_1``; logdets add up, inverse runs in reverse.

    Args:
        *flows: the flows, applied in the given order by ``forward``.

    Example:
        >>> import torch, flows
        >>> f = flows.Sequential(flows.Reverse(), flows.ActNorm(3))
        >>> z, logdet = f(torch.randn(4, 3))
        >>> logdet.shape
        torch.Size([4])
    """

    def __init__(self, *flows: Flow) -> None:
        super().__init__()
        for i, flow in enumerate(flows):
            if not isinstance(flow, Flow):
                raise TypeError(
                    f"Sequential expects flows.Flow instances, got {type(flow).__name__} at position {i}"
                )
        self.flows = nn.ModuleList(flows)

    def __len__(self) -> int:
        return len(self.flows)

    @property
    def iterative_inverse(self) -> bool:  # type: ignore[override]
        return any(flow.iterative_inverse for flow in self.flows)

    def __iter__(self) -> Iterator[Flow]:
        return iter(self.flows)

    def __getitem__(self, index: int) -> Flow:
        return self.flows[index]

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return compose(self.flows, x, context, inverted=False)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return compose(reversed(self.flows), y, context, inverted=True)


class InverseFlow(Flow):
    """The flow ``flow`` with its directions swapped; build it with :func:`Inverse`."""

    def __init__(self, flow: Flow) -> None:
        super().__init__()
        if not isinstance(flow, Flow):
            raise TypeError(f"Inverse expects a flows.Flow, got {type(flow).__name__}")
        self.flow = flow

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.flow.inverse(x, context)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.flow(y, context)


def Inverse(flow: Flow) -> Flow:  # noqa: N802 - reads as a layer at the call site
    """The inverse of ``flow``: its ``forward`` is ``flow.inverse`` and vice versa.

    ``Inverse(Inverse(f))`` returns ``f`` itself. Used for IAF (an inverted MAF) and
    for unsqueezing (``Inverse(Squeeze())``).

    Example:
        >>> import torch, flows
        >>> f = flows.ActNorm(2)
        >>> flows.Inverse(flows.Inverse(f)) is f
        True
    """
    if isinstance(flow, InverseFlow):
        return flow.flow
    return InverseFlow(flow)
