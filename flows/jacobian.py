"""The oracle: exact Jacobians by autograd, their log-determinants, and `check_flow`.

Use these to check any flow, including your own layers::

    from flows.jacobian import check_flow
    check_flow(my_flow.double(), torch.randn(3, 5, dtype=torch.float64))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from flows.base import Flow, InverseNotAvailable

__all__ = ["jacobian", "batch_jacobian", "exact_logdet", "check_flow", "FlowCheckError"]


_ROWS_PER_CHUNK = 512  # Jacobian rows (samples x output entries) per batched backward pass


class FlowCheckError(AssertionError):
    """Raised by :func:`check_flow`; the message lists every failed check."""


def _per_sample_function(flow: Flow, shape: tuple[int, ...]):
    """``x_flat (D,), context (K,) | None -> y_flat (D_out,)`` for one sample."""

    def function(x_flat: Tensor, context: Tensor | None) -> Tensor:
        x = x_flat.reshape(1, *shape)
        ctx = None if context is None else context.unsqueeze(0)
        y, _ = flow(x, ctx)
        return y.reshape(-1)

    return function


def jacobian(flow: Flow, x: Tensor, context: Tensor | None = None) -> Tensor:
    """The exact per-sample Jacobian ``dy/dx`` of ``flow.forward``, shape ``(B, D_out, D_in)``.

    Computed with ``torch.func.vmap`` over ``jacrev`` (or ``jacfwd`` when the output is
    larger than the input, where forward mode needs fewer passes). A flow that cannot
    be vmapped (data-dependent control flow, in-place updates of batched tensors)
    falls back to ``torch.autograd.functional.jacobian`` one sample at a time.

    Args:
        flow: any flow; data-dependent initialization (ActNorm) should have run already.
        x: ``(B, ...)`` input.
        context: optional ``(B, K)`` context.
    """
    shape = tuple(x.shape[1:])
    function = _per_sample_function(flow, shape)
    x_flat = x.detach().reshape(x.shape[0], -1)
    ctx = None if context is None else context.detach()
    try:
        with torch.no_grad():
            out_features = function(x_flat[0], None if ctx is None else ctx[0]).numel()
        transform = torch.func.jacfwd if out_features > x_flat.shape[1] else torch.func.jacrev
        # Chunks of about _ROWS_PER_CHUNK Jacobian rows over the whole batch keep the
        # batched intermediates small enough to be reused instead of freshly mapped by the
        # allocator: on benchmarks/oracle_speed.py 512 rows took ~1,500 page faults and
        # 0.23 s, 1024 rows 6,000-23,000 and 0.28 s, all 3072 rows at once 27,000-64,000
        # and 0.27-0.35 s. The chunks also bound the memory for large D.
        chunk_size = max(1, _ROWS_PER_CHUNK // x_flat.shape[0])
        per_sample = transform(function, argnums=0, chunk_size=chunk_size)
        # torch.func differentiates inside its own transform whatever the outer grad
        # mode; no_grad only stops ordinary autograd from also recording the vmapped
        # computation for the parameters, which nobody differentiates.
        with torch.no_grad():
            return torch.func.vmap(per_sample, in_dims=(0, None if ctx is None else 0))(x_flat, ctx)
    except (RuntimeError, NotImplementedError):
        return _jacobian_loop(function, x_flat, ctx)


def _jacobian_loop(function, x_flat: Tensor, context: Tensor | None) -> Tensor:
    """Fallback: one ``autograd.functional.jacobian`` per sample."""
    rows = []
    for b in range(x_flat.shape[0]):
        ctx = None if context is None else context[b]
        rows.append(torch.autograd.functional.jacobian(lambda v: function(v, ctx), x_flat[b]))
    return torch.stack(rows).detach()


def batch_jacobian(flow: Flow, x: Tensor, context: Tensor | None = None) -> Tensor:
    """The Jacobian of the whole batch, ``(B, D_out, B, D_in)``: ``dy[b, i] / dx[b', j]``.

    Unlike :func:`jacobian` it does not assume samples are independent, so its
    off-diagonal blocks show whether a flow mixes samples.
    """
    shape = tuple(x.shape)

    def function(x_flat: Tensor) -> Tensor:
        y, _ = flow(x_flat.reshape(shape), context)
        return y.reshape(shape[0], -1)

    x_flat = x.detach().reshape(-1)
    try:
        with torch.no_grad():  # as in `jacobian`: torch.func still differentiates
            full = torch.func.jacrev(function)(x_flat)
    except (RuntimeError, NotImplementedError):
        full = torch.autograd.functional.jacobian(function, x_flat)
    return full.detach().reshape(shape[0], -1, shape[0], x[0].numel())


def exact_logdet(flow: Flow, x: Tensor, context: Tensor | None = None) -> Tensor:
    """``log|det dy/dx|`` per sample from the exact Jacobian, in float64, shape ``(B,)``."""
    return torch.linalg.slogdet(jacobian(flow, x, context).double())[1]


@dataclass
class _Tolerance:
    atol: float
    rtol: float

    def excess(self, error: Tensor, reference: Tensor) -> Tensor:
        """How far ``error`` exceeds ``atol + rtol * |reference|`` (<= 0 means fine)."""
        return error - (self.atol + self.rtol * reference.abs())


def _default_tolerance(dtype: torch.dtype) -> tuple[float, float]:
    # float64 leaves ~1e-12 of round-off on these small Jacobians; 1e-7 is far below any
    # real logdet mistake. float32 carries ~1e-6 relative error per layer.
    return (1e-7, 1e-7) if dtype == torch.float64 else (2e-3, 2e-3)


def check_flow(
    flow: Flow,
    x: Tensor,
    context: Tensor | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    require_inverse: bool = True,
) -> dict[str, float]:
    """Checks a flow against autograd; raises :class:`FlowCheckError` on any failure.

    Checks that (1) ``logdet`` is ``(B,)``; (2) it equals ``slogdet`` of the exact
    Jacobian; (3) ``inverse(forward(x))`` gives back ``x``; (4) the inverse's logdet is
    minus the forward's; (5) the batch Jacobian is block-diagonal (samples do not
    interact); (6) a structure declared by ``flow.jacobian_mask`` really holds.
    Run it in float64 for tight tolerances. The flow is called once before the
    Jacobians are taken, so data-dependent initialization (ActNorm) happens first.

    Args:
        flow: the flow to check.
        x: ``(B, ...)`` input; the flow's parameters should have ``x``'s dtype.
        context: optional ``(B, K)`` context.
        atol, rtol: tolerances; default ``1e-7`` in float64, ``2e-3`` otherwise.
        require_inverse: fail for a flow whose ``inverse`` raises ``InverseNotAvailable``;
            ``False`` checks such a flow's forward alone (its report's ``inverse`` is nan).

    Returns:
        The largest error found for each check (useful for reporting).
    """
    default_atol, default_rtol = _default_tolerance(x.dtype)
    tol = _Tolerance(default_atol if atol is None else atol, default_rtol if rtol is None else rtol)
    name = type(flow).__name__
    with torch.no_grad():
        y, logdet = flow(x, context)
    failures: list[str] = []
    if logdet.shape != (x.shape[0],):
        raise FlowCheckError(
            f"{name}: logdet must have shape (batch,) = ({x.shape[0]},), got {tuple(logdet.shape)}"
        )
    if y.shape[0] != x.shape[0] or y[0].numel() != x[0].numel():
        raise FlowCheckError(
            f"{name}: output {tuple(y.shape)} must keep the batch and the per-sample size of "
            f"input {tuple(x.shape)}"
        )
    report: dict[str, float] = {}
    full = batch_jacobian(flow, x, context).double()
    _check_block_diagonal(name, full, tol, failures, report)
    blocks = torch.stack([full[b, :, b, :] for b in range(x.shape[0])])
    _check_logdet(name, blocks, logdet, tol, failures, report)
    _check_mask(name, flow, tuple(x.shape[1:]), blocks, tol, failures, report)
    _check_inverse(name, flow, x, y, logdet, context, tol, failures, report, require_inverse)
    if failures:
        raise FlowCheckError(f"{name} failed check_flow:\n  - " + "\n  - ".join(failures))
    return report


def _check_block_diagonal(name, full, tol, failures, report) -> None:
    batch = full.shape[0]
    off = full.clone()
    for b in range(batch):
        off[b, :, b, :] = 0
    worst = off.abs().amax() if off.numel() else torch.tensor(0.0)
    report["cross_sample"] = float(worst)
    if worst > tol.atol:
        index = torch.nonzero(off.abs() == worst)[0].tolist()
        failures.append(
            f"samples interact: d y[{index[0]}][{index[1]}] / d x[{index[2]}][{index[3]}] = "
            f"{float(off[tuple(index)]):.3e}, but the batch Jacobian must be block-diagonal"
        )


def _check_logdet(name, blocks, logdet, tol, failures, report) -> None:
    sign, exact = torch.linalg.slogdet(blocks)
    if bool((sign == 0).any()):
        failures.append(f"the Jacobian is singular for samples {torch.nonzero(sign == 0).flatten().tolist()}")
        return
    error = (logdet.double() - exact).abs()
    report["logdet"] = float(error.max())
    excess = tol.excess(error, exact)
    if bool((excess > 0).any()):
        b = int(excess.argmax())
        failures.append(
            f"logdet is wrong: sample {b} reports {float(logdet[b]):.6g}, the exact "
            f"log|det J| is {float(exact[b]):.6g} (difference {float(logdet[b] - exact[b]):.3e}, "
            f"atol={tol.atol:g}, rtol={tol.rtol:g})"
        )


def _check_mask(name, flow, shape, blocks, tol, failures, report) -> None:
    mask = flow.jacobian_mask(shape)
    if mask is None:
        return
    if mask.shape != blocks.shape[1:]:
        failures.append(f"jacobian_mask has shape {tuple(mask.shape)}, expected {tuple(blocks.shape[1:])}")
        return
    outside = blocks.abs() * (~mask.to(blocks.device))
    worst = outside.amax()
    report["structure"] = float(worst)
    if worst > tol.atol:
        b, i, j = torch.nonzero(outside == worst)[0].tolist()
        failures.append(
            f"declared Jacobian structure violated: d y[{i}] / d x[{j}] = {float(blocks[b, i, j]):.3e} "
            f"in sample {b}, where jacobian_mask says it must be 0 (a leaky mask?)"
        )


def _check_inverse(name, flow, x, y, logdet, context, tol, failures, report, require_inverse) -> None:
    try:
        with torch.no_grad():
            x_back, inverse_logdet = flow.inverse(y, context)
    except InverseNotAvailable as error:
        report["inverse"] = float("nan")
        if require_inverse:
            failures.append(
                f"inverse is not available ({error}); pass require_inverse=False to check the forward alone"
            )
        return
    if x_back.shape != x.shape:
        failures.append(f"inverse returned shape {tuple(x_back.shape)}, expected {tuple(x.shape)}")
        return
    error = (x_back - x).abs()
    report["round_trip"] = float(error.max())
    excess = tol.excess(error, x)
    if bool((excess > 0).any()):
        index = tuple(torch.nonzero(excess == excess.max())[0].tolist())
        failures.append(
            f"inverse(forward(x)) != x: largest error {float(error[index]):.3e} at index {index}"
        )
    if inverse_logdet.shape != logdet.shape:
        failures.append(f"inverse logdet has shape {tuple(inverse_logdet.shape)}, expected {tuple(logdet.shape)}")
        return
    gap = (inverse_logdet + logdet).abs()
    report["inverse_logdet"] = float(gap.max())
    excess = tol.excess(gap, logdet)
    if bool((excess > 0).any()):
        b = int(excess.argmax())
        failures.append(
            f"inverse logdet is not minus the forward logdet: sample {b} has forward "
            f"{float(logdet[b]):.6g} and inverse {float(inverse_logdet[b]):.6g}"
        )
