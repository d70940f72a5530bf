"""Backpropagation through invertible layers without stored activations.

A flow's input can be rebuilt from its output, so the activations that ordinary
backpropagation keeps for every layer can be recomputed instead (RevNets, i-RevNet). In
a memory-saving run of steps the forward pass keeps only the run's output; the backward
pass walks the run from its end, rebuilds each step's input through ``inverse``, runs the
step again with gradients and backpropagates through it, log-determinant included. The
gradients are those of ordinary backpropagation (up to the round-off of the rebuilt
inputs), and training memory no longer grows with the number of steps.

Use :func:`invertible_backprop` on a flow, a model or a ``FlowDistribution``, or build a
stack with :class:`InvertibleSequential` directly.

References:
    Gomez, Ren, Urtasun & Grosse, "The Reversible Residual Network: Backpropagation
    Without Storing Activations", NeurIPS 2017, arXiv:1707.04585. Jacobsen, Smeulders &
    Oyallon, "i-RevNet: Deep Invertible Networks", ICLR 2018, arXiv:1802.07088.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from flows.autoregressive import Autoregressive
from flows.base import Flow, InverseFlow, Sequential, accumulate, compose, inside_function_transform, zero_logdet
from flows.distributions import FlowDistribution
from flows.freeform import FreeFormFlow
from flows.reshape import Split
from flows.rebuild import Chain, DriftMonitor, RebuildFunction

__all__ = ["invertible_backprop", "InvertibleSequential", "DriftMonitor", "inverse_kind"]

_KINDS = ("exact", "iterative", "none")  # from best to worst



def inverse_kind(flow: Flow) -> str:
    """How ``flow.inverse`` computes its result.

    ``"exact"``: in closed form, one pass; ``"iterative"``: in many passes (an
    autoregressive layer's ``D`` network passes; a residual or continuous flow's numerical
    solve, exact only to its tolerance; a layer says so by ``iterative_inverse = True``);
    ``"none"``: it raises :class:`flows.InverseNotAvailable`.
    """
    if isinstance(flow, InverseFlow):
        return _forward_kind(flow.flow)
    if isinstance(flow, Sequential):
        return _worst(inverse_kind(child) for child in flow)
    if isinstance(flow, Split):
        return inverse_kind(flow.flow)
    if type(flow).inverse is Flow.inverse:
        return "none"
    # Free-form (residual, continuous) flows invert by a numerical solve, exact only to its tolerance.
    if isinstance(flow, (Autoregressive, FreeFormFlow)) or getattr(flow, "iterative_inverse", False):
        return "iterative"
    return "exact"


def _forward_kind(flow: Flow) -> str:
    """As :func:`inverse_kind`, for ``flow.forward`` (closed form but where an inverse runs forward)."""
    if isinstance(flow, InverseFlow):
        return inverse_kind(flow.flow)
    if isinstance(flow, Sequential):
        return _worst(_forward_kind(child) for child in flow)
    if isinstance(flow, Split):
        return _forward_kind(flow.flow)
    return "exact"


def _worst(kinds: Iterator[str]) -> str:
    return max(kinds, key=_KINDS.index, default="exact")


def _layer_name(flow: Flow) -> str:
    return f"Inverse({_layer_name(flow.flow)})" if isinstance(flow, InverseFlow) else type(flow).__name__


def _check_step(step: Flow, where: str, allow_iterative_inverse: bool) -> None:
    """Refuses a step whose input cannot be rebuilt from its output in one closed-form pass."""
    kind = inverse_kind(step)
    name = _layer_name(step)
    if kind == "none":
        raise TypeError(
            f"invertible_backprop expects layers with a closed-form inverse, got {name} at {where}, whose "
            "inverse raises InverseNotAvailable, so its input cannot be rebuilt from its output; "
            "keep it out of the flow given to invertible_backprop"
        )
    if kind == "iterative" and not allow_iterative_inverse:
        raise TypeError(
            f"invertible_backprop expects layers with a one-pass inverse, got {name} at {where}, whose "
            "inverse is iterative (an autoregressive layer's takes one network pass per feature; a "
            "fixed-point inverse is exact only to its tolerance), so rebuilding its input costs many "
            "passes in every backward; pass allow_iterative_inverse=True to accept that"
        )


def _is_container(flow: Flow) -> bool:
    """Flows whose parts are made memory-saving one by one rather than re-run as one step."""
    return type(flow) is Sequential or isinstance(flow, (InvertibleSequential, Split))


@dataclass(frozen=True)
class _Options:
    allow_iterative_inverse: bool = False
    preserve_rng_state: bool = True
    monitor: DriftMonitor | None = None
    max_run_length: int | None = 32


def invertible_backprop(
    flow: Flow | FlowDistribution,
    *,
    allow_iterative_inverse: bool = False,
    preserve_rng_state: bool = True,
    monitor: DriftMonitor | None = None,
    max_run_length: int | None = 32,
) -> Flow | FlowDistribution:
    """Makes ``flow`` train without storing its steps' activations; returns the flow to use.

    Every ``flows.Sequential`` in the tree becomes an :class:`InvertibleSequential` over
    the same layers, so maximal runs of steps keep only their output and rebuild the rest
    in the backward pass; ``Split``'s own prior runs ordinarily and its inner flow is
    rewritten in turn, so a multi-scale model's memory is flat in its depth. The layers and
    their parameters are shared, not copied, and ``state_dict`` keys do not change (but
    for a bare layer, which is wrapped as ``InvertibleSequential(flow)``: keys gain
    ``flows.0.``), so checkpoints load with and without it. A ``FlowDistribution`` (any
    ready model) has its ``transform`` rewritten in place and is returned.

    Every step is checked here: a layer without a closed-form inverse is refused, and one
    with an iterative inverse unless ``allow_iterative_inverse``. ``Inverse(...)`` of a
    stack runs as one step.

    Args:
        flow: a flow or a ``FlowDistribution``.
        allow_iterative_inverse: accept steps whose inverse takes many passes.
        preserve_rng_state: replay each step's random numbers (dropout) in its re-run,
            as ``torch.utils.checkpoint`` does; only steps that draw any pay for it.
        monitor: a :class:`DriftMonitor` to record the reconstruction error.
        max_run_length: rebuild at most this many steps from one stored output (``None``:
            any number). Each run stores its output, so shorter runs cost a little memory
            (for Glow at 32: 3/32 of one activation per step of flow) and bound the drift
            that round-off accumulates through the inverses (benchmarks/invertible_drift.py,
            Glow with K = 64: runs of ~190 steps drift by 8e-4 in float32 and 30 in bf16,
            whose gradients are then off by 54%; runs of 32: 8e-6 and 0.2, off by 1.5%).

    Example:
        >>> import torch, flows
        >>> from flows.reversible import invertible_backprop
        >>> flow = flows.Sequential(flows.ActNorm(4), flows.AffineCoupling(4, flows.nets.MLP))
        >>> flow = invertible_backprop(flow)
        >>> type(flow).__name__
        'InvertibleSequential'
    """
    if max_run_length is not None and max_run_length < 1:
        raise ValueError(f"invertible_backprop expects max_run_length >= 1 or None, got {max_run_length}")
    options = _Options(allow_iterative_inverse, preserve_rng_state, monitor, max_run_length)
    if isinstance(flow, FlowDistribution):
        flow.transform = _saving(flow.transform, "transform", options)
        return flow
    if not isinstance(flow, Flow):
        raise TypeError(f"invertible_backprop expects a flows.Flow or FlowDistribution, got {type(flow).__name__}")
    return _saving(flow, type(flow).__name__, options)


def _saving(flow: Flow, path: str, options: _Options) -> Flow:
    """Checks every step of ``flow`` (before changing anything), then rewrites it."""
    for where, step in _steps(flow, path):
        _check_step(step, where, options.allow_iterative_inverse)
    return _rewrite(flow, options) if _is_container(flow) else InvertibleSequential(flow, **vars(options))


def _steps(flow: Flow, path: str) -> Iterator[tuple[str, Flow]]:
    """The steps the rewritten ``flow`` rebuilds, with their module paths."""
    if type(flow) is Sequential or isinstance(flow, InvertibleSequential):
        for i, child in enumerate(flow):
            where = f"{path}.flows.{i}"
            yield from _steps(child, where) if _is_container(child) else [(where, child)]
    elif isinstance(flow, Split):
        if _is_container(flow.flow):
            yield from _steps(flow.flow, f"{path}.flow")
    else:
        yield path, flow


def _rewrite(flow: Flow, options: _Options) -> Flow:
    """A container with memory-saving parts: a new ``InvertibleSequential`` for a
    ``Sequential``, the same ``Split`` (its inner flow replaced) for a ``Split``."""
    if isinstance(flow, InvertibleSequential):
        return flow
    if isinstance(flow, Split):
        if _is_container(flow.flow):
            flow.flow = _rewrite(flow.flow, options)
        return flow
    rewritten = InvertibleSequential(*flow, **vars(options))
    rewritten.training = flow.training  # the children keep their own modes
    return rewritten


class InvertibleSequential(Sequential):
    """A ``Sequential`` that trains without storing its steps' activations.

    Same map, logdet and ``state_dict`` as ``flows.Sequential(*flows)``. When gradients
    are wanted, each maximal run of steps is one autograd node that keeps only the run's
    output; its backward rebuilds each step's input through the step's ``inverse``, runs
    the step again with gradients (in the autocast state and, with
    ``preserve_rng_state``, the random-number state of the forward pass) and
    backpropagates through it. Gradients with respect to the input, the context and every
    parameter are those of ordinary backpropagation, evaluated at the rebuilt inputs
    (float64: equal to ~1e-12 relative; float32 and bf16: see benchmarks/invertible_drift.py;
    the error grows where the inverses amplify round-off, which a :class:`DriftMonitor`
    shows and ``max_run_length`` bounds). Under ``torch.no_grad``, or when nothing requires gradients, it is a plain
    ``Sequential``; so is a run whose ActNorm awaits its data-dependent initialization
    (that first call stores activations as usual). ``inverse`` saves memory the same way
    when every step's ``forward`` is its closed-form inverse.

    ``Sequential`` and ``Split`` children are rewritten with :func:`invertible_backprop`
    (in place for ``Split``: its inner flow is replaced); any other child is a step and
    must have a closed-form inverse (see :func:`inverse_kind`).

    Not supported: higher-order gradients (``create_graph=True``) through it raise; a
    step that draws random numbers must draw the same ones in ``inverse`` as in
    ``forward`` (true of couplings with dropout in the conditioner, which runs once on the
    same half either way). Under ``torch.compile`` the runs are left to run eagerly
    (a graph break each); the rest of the model compiles.

    Args:
        *flows: the flows, applied in order by ``forward``.
        allow_iterative_inverse, preserve_rng_state, monitor, max_run_length: see
            :func:`invertible_backprop`.

    Example:
        >>> import torch, flows
        >>> from flows.reversible import InvertibleSequential
        >>> f = InvertibleSequential(flows.ActNorm(3), flows.AffineCoupling(3, flows.nets.MLP))
        >>> x = torch.randn(8, 3, requires_grad=True)
        >>> z, logdet = f(x)
        >>> (0.5 * z.square().sum() - logdet.sum()).backward()
        >>> x.grad.shape
        torch.Size([8, 3])
    """

    def __init__(
        self,
        *flows: Flow,
        allow_iterative_inverse: bool = False,
        preserve_rng_state: bool = True,
        monitor: DriftMonitor | None = None,
        max_run_length: int | None = 32,
    ) -> None:
        if max_run_length is not None and max_run_length < 1:
            raise ValueError(f"InvertibleSequential expects max_run_length >= 1 or None, got {max_run_length}")
        options = _Options(allow_iterative_inverse, preserve_rng_state, monitor, max_run_length)
        flows = tuple(_rewrite(f, options) if isinstance(f, Flow) and _is_container(f) else f for f in flows)
        super().__init__(*flows)
        self.allow_iterative_inverse = allow_iterative_inverse
        self.preserve_rng_state = preserve_rng_state
        self.monitor = monitor
        self.max_run_length = max_run_length
        self._plan: list[int | tuple[int, ...]] = []  # a container's index, or a run of step indices
        run: list[int] = []
        for i, flow in enumerate(flows):
            if _is_container(flow):
                self._plan += [tuple(run), i] if run else [i]
                run = []
            else:
                _check_step(flow, f"flows.{i}", allow_iterative_inverse)
                if len(run) == max_run_length:
                    self._plan.append(tuple(run))
                    run = []
                run.append(i)
        self._plan += [tuple(run)] if run else []
        accepted = ("exact", "iterative") if allow_iterative_inverse else ("exact",)
        steps = [i for item in self._plan if isinstance(item, tuple) for i in item]
        self._inverse_saves = all(_forward_kind(self.flows[i]) in accepted for i in steps)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._run(x, context, inverted=False)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._run(y, context, inverted=True)

    def _run(self, x: Tensor, context: Tensor | None, inverted: bool) -> tuple[Tensor, Tensor]:
        total = zero_logdet(x)
        for item in reversed(self._plan) if inverted else self._plan:
            if isinstance(item, int):
                flow = self.flows[item]
                x, logdet = flow.inverse(x, context) if inverted else flow(x, context)
            else:
                steps = [self.flows[i] for i in (reversed(item) if inverted else item)]
                x, logdet = self._run_steps(steps, x, context, inverted)
            total = accumulate(total, logdet)
        return x, total

    # torch.compile cannot trace the backward of a run (it calls autograd itself), so
    # dynamo leaves each run to run eagerly: one graph break per run.
    @torch.compiler.disable
    def _run_steps(
        self, steps: list[Flow], x: Tensor, context: Tensor | None, inverted: bool
    ) -> tuple[Tensor, Tensor]:
        # torch.func transforms (flows.derivatives, the oracle) differentiate functionally:
        # the ordinary composition serves them.
        if torch.is_grad_enabled() and not inside_function_transform() and not (inverted and not self._inverse_saves):
            chain = Chain.build(steps, inverted, self.preserve_rng_state, self.monitor)
            needs_grad = x.requires_grad or (context is not None and context.requires_grad) or chain.params
            if needs_grad and not chain.awaits_initialization:
                return RebuildFunction.apply(chain, x, context, *chain.params)
        return compose(steps, x, context, inverted)

    def extra_repr(self) -> str:
        return (
            f"allow_iterative_inverse={self.allow_iterative_inverse}, preserve_rng_state={self.preserve_rng_state}, "
            f"monitor={self.monitor is not None}, max_run_length={self.max_run_length}"
        )


