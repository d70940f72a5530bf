"""The autograd machinery of memory-saving backpropagation (used by flows/reversible.py).

A run of steps is one autograd node (:class:`RebuildFunction`): its forward keeps only
the run's output; its backward rebuilds each step's input through ``inverse``, re-runs the
step with gradients (replaying its random numbers) and backpropagates through it.
:class:`DriftMonitor` records how far rebuilt inputs drift from the originals.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from flows.base import Flow, accumulate, sum_per_sample, zero_logdet
from flows.coupling import Coupling
from flows.normalization import ActNorm

__all__ = ["Chain", "DriftMonitor", "RebuildFunction"]  # the last two serve flows/reversible.py


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
class Chain:
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
    ) -> Chain:
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
        return Chain(steps, params, step_params, waiting, inverted, preserve_rng_state, monitor)

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


class RebuildFunction(torch.autograd.Function):
    """One run of steps as one autograd node: saves the output, rebuilds the rest."""

    @staticmethod
    def forward(ctx, chain: Chain, x: Tensor, context: Tensor | None, *params: Tensor) -> tuple[Tensor, Tensor]:
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
        chain: Chain = ctx.chain
        rebuilt, grad_x, grad_context, grad_params = chain.run_backward(
            y, context, grad_y, grad_logdet, ctx.needs_input_grad
        )
        if x is not None:
            chain.monitor.update((rebuilt.detach().to(x.dtype) - x).abs().amax())
        return (None, grad_x, grad_context, *grad_params)
