"""Derivatives of ``log p(x)`` for any flow distribution: score, Hessian-vector products,
per-sample Hessians and the Laplacian, batched through ``torch.func``.

Samples never interact, so ``d/dx_i sum_j log p(x_j) = d/dx_i log p(x_i)``: one backward
pass of the batch's summed log-density gives every sample's score, and one
forward-over-reverse pass (``jvp`` of that gradient) gives every sample's Hessian-vector
product. The per-sample Hessian is ``D`` such products, vmapped over the basis
directions, never a Python loop over samples or dimensions.

``dist`` is anything with ``log_prob(x, context)`` returning one value per sample (a
:class:`flows.FlowDistribution`, a ready model); ``x`` is ``(B, *event_shape)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from flows.freeform import probe

__all__ = ["score", "hessian_vector_product", "hessian", "laplacian"]


def _summed_log_prob(dist, context: Tensor | None) -> Callable[[Tensor], Tensor]:
    return lambda x: dist.log_prob(x, context).sum()


def score(dist, x: Tensor, context: Tensor | None = None, create_graph: bool = False) -> Tensor:
    """``grad_x log p(x | context)`` per sample, shaped like ``x``.

    Args:
        dist: the density.
        x: ``(B, *event_shape)``.
        context: optional ``(B, K)``.
        create_graph: keep the graph, to differentiate the score again (e.g. in a loss).

    Example:
        >>> import torch, flows
        >>> dist = flows.FlowDistribution(flows.ScalarAffine(2.0), flows.StandardNormal(3))
        >>> x = torch.randn(4, 3)
        >>> torch.allclose(score(dist, x), -4 * x)  # z = 2x ~ N(0, 1): log p = -2 x^2 + c
        True
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        (gradient,) = torch.autograd.grad(dist.log_prob(x, context).sum(), x, create_graph=create_graph)
    return gradient


def hessian_vector_product(dist, x: Tensor, v: Tensor, context: Tensor | None = None) -> Tensor:
    """``H(x_i) v_i`` per sample, ``H`` the Hessian of ``log p`` in ``x``; shaped like ``x``.

    Forward-over-reverse (``torch.func.jvp`` of the score); flows that ``torch.func``
    cannot transform fall back to reverse-over-reverse (a second backward pass).
    """
    if v.shape != x.shape:
        raise ValueError(f"hessian_vector_product expects v shaped like x {tuple(x.shape)}, got {tuple(v.shape)}")
    try:
        return _hvp_forward_over_reverse(dist, x, v, context)
    except (RuntimeError, NotImplementedError):
        return _hvp_reverse_over_reverse(dist, x, v, context)


def _hvp_forward_over_reverse(dist, x: Tensor, v: Tensor, context: Tensor | None) -> Tensor:
    gradient = torch.func.grad(_summed_log_prob(dist, context))
    return torch.func.jvp(gradient, (x.detach(),), (v,))[1]


def _hvp_reverse_over_reverse(dist, x: Tensor, v: Tensor, context: Tensor | None) -> Tensor:
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        (gradient,) = torch.autograd.grad(dist.log_prob(x, context).sum(), x, create_graph=True)
        (product,) = torch.autograd.grad((gradient * v).sum(), x)
    return product


def hessian(dist, x: Tensor, context: Tensor | None = None) -> Tensor:
    """The per-sample Hessian of ``log p``, ``(B, D, D)`` over the flattened sample.

    ``D`` Hessian-vector products with the basis directions (each batched over the
    samples), vmapped in one call; where ``torch.func`` cannot vmap the flow, one
    batched product per direction.

    Example:
        >>> import torch, flows
        >>> dist = flows.FlowDistribution(flows.ScalarAffine(2.0), flows.StandardNormal(2))
        >>> hessian(dist, torch.randn(3, 2))[0]
        tensor([[-4., -0.],
                [-0., -4.]])
    """
    batch, size = x.shape[0], x[0].numel()
    basis = torch.eye(size, dtype=x.dtype, device=x.device).view(size, 1, *x.shape[1:]).expand(size, *x.shape)
    try:
        columns = torch.func.vmap(lambda v: _hvp_forward_over_reverse(dist, x, v, context))(basis)
    except (RuntimeError, NotImplementedError):
        columns = torch.stack([_hvp_reverse_over_reverse(dist, x, v, context) for v in basis])
    return columns.reshape(size, batch, size).permute(1, 2, 0)  # (B, D, D): column k is H e_k


def laplacian(
    dist, x: Tensor, context: Tensor | None = None, num_probes: int | None = None, kind: str = "rademacher"
) -> Tensor:
    """``tr H(x_i)`` per sample, ``(B,)``: exact, or Hutchinson's unbiased estimate.

    Args:
        num_probes: ``None`` for the exact trace (the diagonal of :func:`hessian`), else
            the number of probes ``v`` in ``mean(v^T H v)`` (unbiased; variance falls as
            ``1 / num_probes``).
        kind: the probes' distribution, ``"rademacher"`` or ``"gaussian"``.
    """
    if num_probes is None:
        return torch.diagonal(hessian(dist, x, context), dim1=-2, dim2=-1).sum(-1)
    if num_probes < 1:
        raise ValueError(f"laplacian expects num_probes >= 1 or None (exact), got {num_probes}")
    probes = torch.stack([probe(x, kind) for _ in range(num_probes)])
    try:
        products = torch.func.vmap(lambda v: _hvp_forward_over_reverse(dist, x, v, context))(probes)
    except (RuntimeError, NotImplementedError):
        products = torch.stack([_hvp_reverse_over_reverse(dist, x, v, context) for v in probes])
    return (probes * products).flatten(2).sum(-1).mean(0)
