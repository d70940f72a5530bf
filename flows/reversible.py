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

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from flows.autoregressive import Autoregressive
from flows.base import Flow, InverseFlow, Sequential, accumulate, sum_per_sample, zero_logdet
from flows.coupling import Coupling
from flows.distributions import FlowDistribution
from flows.freeform import FreeFormFlow
from flows.normalization import ActNorm
from flows.reshape import Split

__all__ = ["invertible_backprop", "InvertibleSequential", "DriftMonitor", "inverse_kind"]

_KINDS = ("exact", "iterative", "none")  # from best to worst


class DriftMonitor:
    """The largest reconstruction error seen, kept on the device until read (no host sync).

    Each memory-saving run of steps keeps a reference to its input while a monitor is
    attached (one tensor per run, however deep) and, at the end of its backward pass,
    compares it with the input rebuilt through all the run's inverses: ``max |x_rebuilt -
    x|``, the drift that round-off accumulates over the run. :meth:`read` it at the
    logging interval.

    Example:
        >>> import torch, flows
        >>> from flows.reversible import DriftMonitor, invertible_backprop
        >>> monitor = DriftMonitor()
        >>> flow = invertible_backprop(flows.Sequential(flows.ActNorm(3), flows.Reverse()), monitor=monitor)
        >>> x = torch.randn(4, 3, requires_grad=True)
        >>> flow(x)[0].sum().backward()
        >>> monitor.read() < 1e-6
        True
    """

    def __init__(self) -> None:
        self._max: Tensor | None = None

    def update(self, error: Tensor) -> None:
        """Takes in one reconstruction error (a 0-dim tensor on any device)."""
        error = error.detach().float()
        self._max = error if self._max is None else torch.maximum(self._max, error.to(self._max.device))

    @property
    def max_error(self) -> Tensor | None:
        """The largest error so far as a 0-dim float32 tensor on the device, ``None`` before any."""
        return self._max

    def read(self, reset: bool = False) -> float:
        """The largest error so far as a float (a host sync; 0.0 before any), optionally resetting it."""
        value = 0.0 if self._max is None else float(self._max)
        if reset:
            self.reset()
        return value

    def reset(self) -> None:
        self._max = None


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
            that round-off accumulates through the inverses (benchmarks/invertible_drift.py:
            in a Glow with unbounded runs of ~100 steps the rebuilt inputs drift by 1e-2 in
            float32, and to NaN in bf16).

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
        functional = torch._C._functorch.peek_interpreter_stack() is not None
        if torch.is_grad_enabled() and not functional and not (inverted and not self._inverse_saves):
            chain = _Chain.build(steps, inverted, self.preserve_rng_state, self.monitor)
            needs_grad = x.requires_grad or (context is not None and context.requires_grad) or chain.params
            if needs_grad and not chain.awaits_initialization:
                return _RebuildFunction.apply(chain, x, context, *chain.params)
        return _apply_steps(steps, x, context, inverted)

    def extra_repr(self) -> str:
        return (
            f"allow_iterative_inverse={self.allow_iterative_inverse}, preserve_rng_state={self.preserve_rng_state}, "
            f"monitor={self.monitor is not None}, max_run_length={self.max_run_length}"
        )


def _apply_steps(steps: list[Flow], x: Tensor, context: Tensor | None, inverted: bool) -> tuple[Tensor, Tensor]:
    """The ordinary composition (activations stored as usual)."""
    total = zero_logdet(x)
    for step in steps:
        x, logdet = step.inverse(x, context) if inverted else step(x, context)
        total = accumulate(total, logdet)
    return x, total


# The autograd node of a run of steps


@dataclass
class _StepRecord:
    """What a step's re-run needs from its forward pass: its input dtype and, if it drew
    random numbers, the generator states before it."""

    dtype: torch.dtype
    device: torch.device
    rng: tuple[Tensor, Tensor | None] | None = None


def _rng_states(device: torch.device) -> tuple[Tensor, Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _same_states(a: tuple[Tensor, Tensor | None], b: tuple[Tensor, Tensor | None]) -> bool:
    return torch.equal(a[0], b[0]) and (a[1] is None or torch.equal(a[1], b[1]))


@contextlib.contextmanager
def _rng_replay(record: _StepRecord) -> Iterator:
    """Yields a function that sets the generators to the step's forward-pass states; the
    global states are restored afterwards (as ``torch.utils.checkpoint`` does)."""
    if record.rng is None:
        yield lambda: None
        return
    cpu, cuda = record.rng
    devices = [record.device] if cuda is not None else []

    def restore() -> None:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, record.device)

    with torch.random.fork_rng(devices=devices):
        yield restore


@dataclass
class _Chain:
    """A run of steps in the direction it is trained, its trainable parameters, and the
    records its forward pass leaves for the backward pass."""

    steps: list[Flow]
    params: list[Tensor]
    step_params: list[list[int]]  # per step, indices into ``params``
    awaits_initialization: bool
    inverted: bool
    preserve_rng_state: bool
    monitor: DriftMonitor | None
    records: list[_StepRecord] | None = None
    autocast: tuple[str, bool, torch.dtype] | None = None

    @staticmethod
    def build(
        steps: list[Flow], inverted: bool, preserve_rng_state: bool, monitor: DriftMonitor | None
    ) -> _Chain:
        index: dict[int, int] = {}
        params: list[Tensor] = []
        step_params: list[list[int]] = []
        waiting = False
        for step in steps:
            mine = []
            for module in step.modules():  # one walk for both: it runs on every call
                waiting = waiting or (isinstance(module, ActNorm) and module.training and not module.is_initialized)
                for p in module.parameters(recurse=False):
                    if p.requires_grad:
                        if id(p) not in index:
                            index[id(p)] = len(params)
                            params.append(p)
                        mine.append(index[id(p)])
            step_params.append(mine)
        return _Chain(steps, params, step_params, waiting, inverted, preserve_rng_state, monitor)

    def run_forward(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        """The steps without recording for autograd, noting what the re-runs need."""
        device_type = x.device.type
        self.autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        self.records = []
        total = zero_logdet(x)
        for step in self.steps:
            record = _StepRecord(x.dtype, x.device)
            before = _rng_states(x.device) if self.preserve_rng_state else None
            x, logdet = step.inverse(x, context) if self.inverted else step(x, context)
            if before is not None and not _same_states(before, _rng_states(record.device)):
                record.rng = before
            self.records.append(record)
            total = accumulate(total, logdet)
        return x, total

    def run_backward(
        self, y: Tensor, context: Tensor | None, grad_y: Tensor, grad_logdet: Tensor, needs_input_grad: tuple[bool, ...]
    ) -> tuple[Tensor, Tensor | None, Tensor | None, list[Tensor | None]]:
        """Walks the steps from the end: rebuilds each input, re-runs the step, backpropagates.

        Returns the rebuilt input of the run and the gradients of the input, the context
        and the parameters.
        """
        need_x, need_context = needs_input_grad[1], needs_input_grad[2] and context is not None
        if need_context:
            context = context.detach().requires_grad_(True)
        grad_params: list[Tensor | None] = [None] * len(self.params)
        grad_context = None
        device_type, enabled, dtype = self.autocast
        for index in reversed(range(len(self.steps))):
            step, record = self.steps[index], self.records[index]
            want_input = index > 0 or need_x
            with _rng_replay(record) as restore, torch.autocast(device_type, dtype, enabled):
                x, leaves, outputs, combine = _rerun(step, y, context, record.dtype, want_input, self.inverted, restore)
            leaves = leaves if want_input else []
            inputs = leaves + [self.params[i] for i in self.step_params[index]] + ([context] if need_context else [])
            pairs = [(out, grad.to(out.dtype)) for out, grad in zip(outputs, (grad_y, grad_logdet)) if out.requires_grad]
            grads: tuple[Tensor | None, ...] = (None,) * len(inputs)
            if pairs and inputs:
                grads = torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True)
            if want_input:
                grad_y = combine([torch.zeros_like(v) if g is None else g for v, g in zip(leaves, grads)])
                grads = grads[len(leaves) :]
            for i, grad in zip(self.step_params[index], grads):
                if grad is not None:
                    grad_params[i] = grad if grad_params[i] is None else grad_params[i] + grad
            if need_context and grads[-1] is not None:
                grad_context = grads[-1] if grad_context is None else grad_context + grads[-1]
            y = x
        return y, (grad_y if need_x else None), grad_context, grad_params


# The rebuilt input, the leaves the re-run starts from, its (y, logdet), and how the
# leaves' gradients make the input's.
_Rerun = tuple[Tensor, list[Tensor], tuple[Tensor, Tensor], Callable[[list[Tensor]], Tensor]]


def _rerun(
    step: Flow, y: Tensor, context: Tensor | None, dtype: torch.dtype, want_input: bool, inverted: bool,
    restore: Callable[[], None],
) -> _Rerun:
    """Rebuilds the step's input (in ``dtype``, the forward pass's) from its output ``y`` and
    runs the step on it with gradients; ``restore`` resets the generators before each pass."""
    if _fused_coupling(step):
        return _rerun_coupling(step, y, context, dtype, want_input, inverted, restore)
    restore()
    with torch.no_grad():
        x, _ = step(y, context) if inverted else step.inverse(y, context)
    x = x.to(dtype)
    x_leaf = x.detach().requires_grad_(want_input)
    restore()
    with torch.enable_grad():
        outputs = step.inverse(x_leaf, context) if inverted else step(x_leaf, context)
    return x, [x_leaf], outputs, lambda grads: grads[0]


def _fused_coupling(step: Flow) -> bool:
    """A coupling whose forward and inverse are :class:`flows.Coupling`'s own."""
    kind = type(step)
    return isinstance(step, Coupling) and kind.forward is Coupling.forward and kind.inverse is Coupling.inverse


def _rerun_coupling(
    step: Coupling, y: Tensor, context: Tensor | None, dtype: torch.dtype, want_input: bool, inverted: bool,
    restore: Callable[[], None],
) -> _Rerun:
    """A coupling rebuilt and re-run with ONE conditioner pass (RevNet's Algorithm 1).

    The untouched part of ``y`` is the untouched part of the input, so the conditioner
    runs once with gradients on it; its output, detached, inverts the elementwise map,
    and, attached, maps the rebuilt part forward again. Generic rebuilding would run the
    conditioner twice. Mirrors ``Coupling._couple``.
    """
    step._validate(y, context)
    apply, rebuild = step.elementwise.forward, step.elementwise.inverse
    if inverted:
        apply, rebuild = rebuild, apply
    restore()
    with torch.enable_grad():
        if step.mask == "channel":
            first, second = y.split(step._channel_split, dim=1)
            y_cond, y_tr = (first, second) if step.parity == 0 else (second, first)
            x_cond = y_cond.detach().to(dtype).requires_grad_(want_input)
            params = step._params(x_cond, context)
            with torch.no_grad():
                x_tr = rebuild(y_tr, params)[0].to(dtype)
            x_tr.requires_grad_(want_input)
            y_tr, log_derivative = apply(x_tr, params)
            order = (0, 1) if step.parity == 0 else (1, 0)
            out = torch.cat([(x_cond, y_tr)[i] for i in order], dim=1)
            x = torch.cat([(x_cond, x_tr)[i].detach() for i in order], dim=1)
            leaves = [x_cond, x_tr]
            combine = lambda grads: torch.cat([grads[i] for i in order], dim=1)  # noqa: E731
        else:
            m = step._checkerboard_on(y)
            x_kept = y.detach().to(dtype).requires_grad_(want_input)  # its untouched entries are the input's
            params = step._params(x_kept * ~m, context)
            with torch.no_grad():
                x = torch.where(m, rebuild(y, params)[0], y).to(dtype)
            x_changed = x.clone().requires_grad_(want_input)  # its transformed entries are the input's
            y_all, log_derivative = apply(x_changed, params)
            out = torch.where(m, y_all, x_kept)
            log_derivative = None if log_derivative is None else torch.where(m, log_derivative, 0.0)
            leaves = [x_kept, x_changed]
            combine = sum  # the two leaves' gradients cover disjoint entries
        logdet = zero_logdet(x) if log_derivative is None else sum_per_sample(log_derivative)
    return x, leaves, (out, logdet), combine


class _RebuildFunction(torch.autograd.Function):
    """One run of steps as one autograd node: saves the output, rebuilds the rest."""

    @staticmethod
    def forward(ctx, chain: _Chain, x: Tensor, context: Tensor | None, *params: Tensor) -> tuple[Tensor, Tensor]:
        y, logdet = chain.run_forward(x, context)
        ctx.chain = chain
        # The input only for the drift monitor: one tensor per run, whatever its depth.
        ctx.save_for_backward(y, context, x if chain.monitor is not None else None)
        return y, logdet

    @staticmethod
    def backward(ctx, grad_y: Tensor, grad_logdet: Tensor):
        if torch.is_grad_enabled():  # backward(create_graph=True) runs in grad mode
            raise RuntimeError(
                "invertible_backprop expects first-order gradients, got backward with create_graph=True; "
                "its re-runs are not differentiable again: compute higher-order gradients without it"
            )
        y, context, x = ctx.saved_tensors
        chain: _Chain = ctx.chain
        rebuilt, grad_x, grad_context, grad_params = chain.run_backward(
            y, context, grad_y, grad_logdet, ctx.needs_input_grad
        )
        if x is not None:
            chain.monitor.update((rebuilt.detach().to(x.dtype) - x).abs().amax())
        return (None, grad_x, grad_context, *grad_params)
