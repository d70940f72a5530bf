"""Continuous flows (FFJORD): an ODE ``dz/dt = f(z, t, context)`` and the integral of its trace.

``forward`` integrates data ``x = z(0)`` to the latent ``z(T)`` and returns
``log|det dz(T)/dx| = ∫_0^T tr(∂f/∂z) dt`` (Chen et al. 2018, instantaneous change of
variables), so ``log p(x) = log p(z(T)) + ∫_0^T tr(∂f/∂z) dt``; ``inverse`` integrates
back from ``T`` to 0 and returns minus that integral. The trace is exact (``D``
vector-Jacobian products, batched by ``torch.func.vmap``) or a Hutchinson estimate (one
vector-Jacobian product with a probe drawn once per solve), by the layer's ``logdet_mode``.

The ODE solver is torchdiffeq, an optional extra (``pip install 'jacflow[ode]'``): it is
imported when a layer is built, so ``flows`` itself needs torch alone.

Why torchdiffeq and not torchode, measured by ``benchmarks/ode_solvers.py`` on the toy2d
FFJORD (ConcatSquashNet 2-64-64-64-2, exact trace, dopri5 at 1e-5, batch 512, Adam 1e-3;
7 interleaved rounds, medians; 1 thread of the 2 shared cores, load average ~9):
- backpropagation through the solver, s/step (NFE): after 0 training steps torchdiffeq
  0.199 (24), torchode 0.175 (24); after 300 steps torchdiffeq 0.378 (26), torchode
  0.528 (38); after 1000 steps torchdiffeq 1.161 (50), torchode 1.573 (56). torchode only
  trains with ``backprop_through_step_size_control=False``: its default gives every
  parameter a non-finite gradient from the first step.
- the adjoint method (``--adjoint``, after 0 steps): torchdiffeq 0.620 s/step (40 NFE
  forward and backward), torchode's ``BacksolveAdjoint`` 5.218 (96): it vmaps the dynamics
  per sample and integrates a per-sample copy of every parameter's adjoint, a state of
  batch x parameters.
torchdiffeq: 12% slower at the start, 1.4x faster with 10-30% fewer NFE once the flow has
learned something, 8x faster adjoints whose state does not grow with the batch, and
training that works with its defaults.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from flows.base import logdet_dtype
from flows.freeform import FreeFormFlow, probe
from flows.validation import check_context, check_input

__all__ = [
    "ContinuousFlow", "ConcatSquashNet", "SolverError", "function_evaluations", "regularization",
    "ADAPTIVE_METHODS", "FIXED_STEP_METHODS",
]

ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "adaptive_heun", "fehlberg2")
FIXED_STEP_METHODS = ("rk4", "midpoint", "euler")
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"tanh": nn.Tanh, "softplus": nn.Softplus}
DynamicsFactory = Callable[[int, int], nn.Module]


class SolverError(RuntimeError):
    """Raised when the ODE solver of a continuous flow fails (step-size underflow, too many steps)."""


def _torchdiffeq(adjoint: bool) -> Callable[..., Tensor]:
    """torchdiffeq's ``odeint`` (or ``odeint_adjoint``), imported on first use."""
    try:
        import torchdiffeq
    except ImportError as error:
        raise ImportError(
            "ContinuousFlow needs the ODE solver torchdiffeq, an optional extra of jacflow: "
            "pip install 'jacflow[ode]' (or pip install torchdiffeq)"
        ) from error
    return torchdiffeq.odeint_adjoint if adjoint else torchdiffeq.odeint


class ConcatSquash(nn.Module):
    """``y = (W h + b) * sigmoid(A c + a) + B c`` with ``c = [t, context]`` (FFJORD's concatsquash layer)."""

    def __init__(self, in_features: int, out_features: int, condition_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.gate = nn.Linear(condition_features, out_features)
        self.shift = nn.Linear(condition_features, out_features, bias=False)

    def forward(self, h: Tensor, condition: Tensor) -> Tensor:
        return self.linear(h) * torch.sigmoid(self.gate(condition)) + self.shift(condition)


class ConcatSquashNet(nn.Module):
    """The default dynamics ``f(z, t, context)``: concatsquash layers ``(B, D) -> (B, D)``.

    An input layer to ``hidden_features``, ``num_blocks`` hidden layers, then the output
    layer, each gated and shifted by ``[t, context]``; ``num_blocks + 1`` hidden layers (as
    :class:`flows.nets.MLP`), so FFJORD's ``64-64-64`` is ``num_blocks=2``.

    Args:
        features: ``D``.
        context_features: ``K`` of a ``(B, K)`` context; 0 for none.
        hidden_features: width of the hidden layers.
        num_blocks: hidden layers after the first.
        activation: ``"tanh"`` or ``"softplus"`` (smooth, as an ODE solver wants).
        zero_init: zero the output layer, so a new flow is the identity.

    Example:
        >>> import torch
        >>> ConcatSquashNet(2, hidden_features=8)(torch.randn(3, 2), torch.tensor(0.5)).shape
        torch.Size([3, 2])
    """

    def __init__(
        self, features: int, context_features: int = 0, hidden_features: int = 64, num_blocks: int = 2,
        activation: str = "tanh", zero_init: bool = True,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"ConcatSquashNet activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if not isinstance(num_blocks, int) or num_blocks < 0:
            raise ValueError(f"ConcatSquashNet num_blocks must be an integer >= 0, got {num_blocks!r}")
        sizes = [features] + [hidden_features] * (num_blocks + 1) + [features]
        condition = 1 + context_features
        self.layers = nn.ModuleList(ConcatSquash(a, b, condition) for a, b in zip(sizes[:-1], sizes[1:]))
        self.activation = ACTIVATIONS[activation]()
        if zero_init:
            for p in self.layers[-1].parameters():
                nn.init.zeros_(p)

    def forward(self, z: Tensor, t: Tensor, context: Tensor | None = None) -> Tensor:
        # t is 0-d (one time for the batch) or (B,) (a solver with per-sample times).
        condition = t.to(z.dtype).reshape(-1, 1).expand(z.shape[0], 1)  # (B, 1)
        if context is not None:
            condition = torch.cat([condition, context.to(z.dtype)], dim=1)  # (B, 1 + K)
        h = z
        for layer in self.layers[:-1]:
            h = self.activation(layer(h, condition))
        return self.layers[-1](h, condition)


class ContinuousFlow(FreeFormFlow):
    """A continuous normalizing flow: ``z = x + ∫_0^T f(z(t), t, context) dt`` by an ODE solver.

    ``logdet = log|det dz/dx| = ∫_0^T tr(∂f/∂z(t)) dt``, integrated with the state. Vectors
    ``(B, D)`` only (flatten images first, as :class:`models.FFJORD` does). Modes:
    ``"exact"`` (``D`` vector-Jacobian products per evaluation, batched by ``torch.func``)
    and ``"estimate"`` (Hutchinson: ``v^T (∂f/∂z) v`` with one probe ``v`` per solve, an
    unbiased estimate of the log-det up to the solver's error; its cost does not grow
    with ``D``). ``inverse`` integrates from ``T`` to 0 and returns minus the integral,
    computed in the same mode; both directions are exact to the solver's tolerance only.

    Time is rescaled to ``s = t / T`` in ``[0, 1]``, so a learned ``T`` (``learn_time``) is
    an ordinary parameter. The state (``z`` and the log-det) is integrated in float32 or
    wider whatever the input's dtype; the dynamics run in the input's dtype (or autocast's).

    Counts: ``nfe_forward`` is the number of (batched) evaluations of ``f`` in the last
    solve, ``nfe_backward`` in the adjoint solve of its backward pass (0 without
    ``adjoint``: backpropagation through the solver's steps evaluates nothing new). They
    are Python ints (no host sync of their own; the adaptive solver syncs to pick steps).

    RNODE regularization (off by default): with ``kinetic_energy=λ_K`` or
    ``jacobian_norm=λ_J`` > 0, ``forward`` also integrates ``∫ |f|^2 dt`` and
    ``∫ |∂f/∂z|_F^2 dt`` (exact in ``"exact"`` mode, the probe's ``|v^T ∂f/∂z|^2``
    otherwise) and leaves ``self.regularization = λ_K ∫|f|^2 + λ_J ∫|∂f/∂z|_F^2``, a
    ``(B,)`` tensor to add to the loss (see :func:`regularization`); ``None`` when off.

    Args:
        features: ``D``.
        dynamics: factory ``(features, context_features) -> module`` whose
            ``forward(z (B, D), t (0-d or (B,)), context (B, K) | None) -> (B, D)`` is ``f``;
            default :class:`ConcatSquashNet`.
        context_features: ``K`` of a ``(B, K)`` context passed to ``f``; 0 for none.
        time: the integration time ``T`` (its initial value when learned).
        learn_time: make ``T`` a parameter (as FFJORD's ``train_T``).
        logdet_mode: ``"exact"`` or ``"estimate"``.
        probe: Hutchinson probes, ``"rademacher"`` or ``"gaussian"``.
        atol, rtol: the solver's tolerances (adaptive methods).
        method: an adaptive method (``ADAPTIVE_METHODS``) or a fixed-step one
            (``FIXED_STEP_METHODS``, which needs ``step_size``, in units of ``s = t / T``).
        step_size: the step of a fixed-step method.
        max_num_steps: an adaptive solve taking more steps raises :class:`SolverError`.
        adjoint: gradients by the adjoint method (memory constant in the number of steps,
            one more solve backward) instead of backpropagation through the solver.
        kinetic_energy, jacobian_norm: RNODE's weights ``λ_K``, ``λ_J``.

    Raises:
        ImportError: without torchdiffeq (``pip install 'jacflow[ode]'``).

    References:
        Chen, Rubanova, Bettencourt & Duvenaud, "Neural Ordinary Differential Equations",
        NeurIPS 2018, arXiv:1806.07366. Grathwohl, Chen, Bettencourt, Sutskever & Duvenaud,
        "FFJORD", ICLR 2019, arXiv:1810.01367. Finlay, Jacobsen, Nurbekyan & Oberman, "How to
        train your neural ODE" (RNODE), ICML 2020, arXiv:2002.02798.

    Example:
        >>> import torch
        >>> flow = ContinuousFlow(2, time=0.5)
        >>> z, logdet = flow(torch.randn(4, 2))
        >>> z.shape, logdet.shape, flow.nfe_forward > 0
        (torch.Size([4, 2]), torch.Size([4]), True)
    """

    iterative_inverse = True  # an ODE solve, exact only to the solver's tolerance

    supported_modes = ("exact", "estimate")

    def __init__(
        self,
        features: int,
        dynamics: DynamicsFactory | None = None,
        context_features: int = 0,
        *,
        time: float = 1.0,
        learn_time: bool = False,
        logdet_mode: str = "exact",
        probe: str = "rademacher",
        atol: float = 1e-5,
        rtol: float = 1e-5,
        method: str = "dopri5",
        step_size: float | None = None,
        max_num_steps: int = 10_000,
        adjoint: bool = False,
        kinetic_energy: float = 0.0,
        jacobian_norm: float = 0.0,
    ) -> None:
        super().__init__(logdet_mode)
        _torchdiffeq(adjoint)  # fail early, naming the extra, when the solver is missing
        _check_arguments(features, time, probe, atol, rtol, method, step_size, max_num_steps, kinetic_energy, jacobian_norm)
        self.features, self.context_features = features, context_features
        self.dynamics = (dynamics or ConcatSquashNet)(features, context_features)
        log_time = torch.tensor(math.log(time))
        if learn_time:
            self.log_time = nn.Parameter(log_time)
        else:
            self.register_buffer("log_time", log_time)
        self.probe, self.atol, self.rtol, self.method = probe, atol, rtol, method
        self.step_size, self.max_num_steps, self.adjoint = step_size, max_num_steps, adjoint
        self.kinetic_energy, self.jacobian_norm = kinetic_energy, jacobian_norm
        self.nfe_forward = self.nfe_backward = 0
        self.regularization: Tensor | None = None
        self._solving = False

    @property
    def time(self) -> Tensor:
        """The integration time ``T`` (0-d tensor)."""
        return self.log_time.exp()

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._solve(x, context, reverse=False)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._solve(z, context, reverse=True)

    def _solve(self, x: Tensor, context: Tensor | None, reverse: bool) -> tuple[Tensor, Tensor]:
        """Integrates ``[x, 0, (0, 0)]`` over ``s`` from 0 to 1 (1 to 0 when ``reverse``)."""
        name = type(self).__name__
        check_input(name, x, self.features, ranks=(2,))
        check_context(name, context, self.context_features, x.shape[0])
        regularize = not reverse and (self.kinetic_energy > 0 or self.jacobian_norm > 0)
        dtype = logdet_dtype(x.dtype)
        state = torch.cat([x.to(dtype), x.new_zeros(x.shape[0], 3 if regularize else 1, dtype=dtype)], dim=1)
        vector = None if self.logdet_mode == "exact" else probe(state[:, : self.features], self.probe)
        span = torch.tensor([1.0, 0.0] if reverse else [0.0, 1.0], dtype=dtype, device=x.device)
        derivative = self._derivative(context, vector, regularize, x.dtype)
        self.nfe_forward = self.nfe_backward = 0
        self._solving = True
        try:
            end = _torchdiffeq(self.adjoint)(derivative, state, span, **self._solver_options(context))[-1]
        except AssertionError as error:  # torchdiffeq reports a failed solve by assert
            raise SolverError(
                f"{name}: the ODE solver {self.method} (atol={self.atol:g}, rtol={self.rtol:g}) failed "
                f"integrating a batch of shape {tuple(x.shape)} {'back ' if reverse else ''}over t in [0, T]: "
                f"{error}. A non-finite input or dynamics, or stiff dynamics, cause this; check the input, "
                f"loosen the tolerances or regularize the dynamics (kinetic_energy, jacobian_norm)"
            ) from error
        finally:
            self._solving = False
        d = self.features
        if regularize:
            self.regularization = self.kinetic_energy * end[:, d + 1] + self.jacobian_norm * end[:, d + 2]
        return end[:, :d].to(x.dtype), end[:, d]

    def _solver_options(self, context: Tensor | None) -> dict:
        if self.method in FIXED_STEP_METHODS:
            options = {"step_size": self.step_size}
        else:
            options = {"max_num_steps": self.max_num_steps, "norm": self._error_norm}
        kwargs = dict(atol=self.atol, rtol=self.rtol, method=self.method, options=options)
        if self.adjoint:
            # The adjoint solve differentiates f with respect to these; a context that comes
            # from another network needs its gradient too.
            extra = (context,) if context is not None and context.requires_grad else ()
            kwargs["adjoint_params"] = tuple(self.parameters()) + extra
        return kwargs

    def _error_norm(self, ratios: Tensor) -> Tensor:
        """The solver's error norm: the RMS over ``z`` alone, never the log-det or RNODE integrals.

        Step sizes then follow the trajectory only, so (1) ``"estimate"`` and ``"exact"``
        modes compute the very same map ``z``, with the same steps and NFE; (2) the steps do
        not depend on the probe, so the estimate is exactly unbiased for the exact mode's
        discretized integral (the quadrature is linear in ``v^T (∂f/∂z) v`` at fixed nodes).
        The trace, a smooth function along that trajectory, is integrated at the same order:
        measured by ``check_flow`` on perturbed 3-D flows, the log-det errors stay at or below
        the round trip's (7e-5 at tolerance 1e-5, 1e-7 at 1e-8, 1e-10 at 1e-10), as with a norm
        over the whole state, which took 20-40% more evaluations at 1e-8 and 1e-10.
        """
        return ratios[..., : self.features].square().mean().sqrt()

    def _derivative(
        self, context: Tensor | None, vector: Tensor | None, regularize: bool, dtype: torch.dtype
    ) -> Callable[[Tensor, Tensor], Tensor]:
        """``d/ds [z, logdet, (∫|f|^2, ∫|∂f/∂z|_F^2)] = T [f, tr ∂f/∂z, (|f|^2, |∂f/∂z|_F^2)]``."""
        d = self.features

        def derivative(s: Tensor, state: Tensor) -> Tensor:
            if self._solving:
                self.nfe_forward += 1
            else:  # called by the adjoint solve of the backward pass
                self.nfe_backward += 1
            time = self.time.to(state.dtype)
            t = s * time
            field, vjp = torch.func.vjp(lambda z: self.dynamics(z.to(dtype), t, context), state[:, :d])
            if vector is None:
                # Row i of every sample's Jacobian at once: D cotangents e_i, one batched VJP.
                basis = torch.eye(d, dtype=field.dtype, device=field.device)[:, None, :].expand(d, *field.shape)
                (rows,) = torch.func.vmap(vjp)(basis)  # (D, B, D): rows[i, b, j] = ∂f_i/∂z_j of sample b
                trace = rows.diagonal(dim1=0, dim2=2).sum(-1)  # (B,)
                frobenius = rows.square().sum((0, 2)) if regularize else None
            else:
                (row,) = vjp(vector.to(field.dtype))  # (B, D): v^T ∂f/∂z
                trace = (row * vector).sum(1)
                frobenius = row.square().sum(1) if regularize else None
            parts = [field.to(state.dtype), trace.to(state.dtype)[:, None]]
            if regularize:
                parts += [field.square().sum(1, keepdim=True).to(state.dtype), frobenius.to(state.dtype)[:, None]]
            return time * torch.cat(parts, dim=1)

        return derivative

    def extra_repr(self) -> str:
        return (
            f"features={self.features}, context_features={self.context_features}, logdet_mode={self.logdet_mode!r}, "
            f"method={self.method!r}, atol={self.atol:g}, rtol={self.rtol:g}, adjoint={self.adjoint}"
        )


def _check_arguments(
    features, time, probe_kind, atol, rtol, method, step_size, max_num_steps, kinetic_energy, jacobian_norm
) -> None:
    """Raises ``ValueError`` naming the first bad constructor argument of :class:`ContinuousFlow`."""
    name = "ContinuousFlow"
    if not isinstance(features, int) or features < 1:
        raise ValueError(f"{name} features must be an integer >= 1, got {features!r}")
    if not time > 0 or not math.isfinite(time):
        raise ValueError(f"{name} time must be a finite number > 0, got {time!r}")
    if probe_kind not in ("rademacher", "gaussian"):
        raise ValueError(f"{name} probe must be 'rademacher' or 'gaussian', got {probe_kind!r}")
    if not (atol > 0 and rtol > 0):
        raise ValueError(f"{name} atol and rtol must be > 0, got atol={atol!r}, rtol={rtol!r}")
    if method not in ADAPTIVE_METHODS + FIXED_STEP_METHODS:
        raise ValueError(f"{name} method must be one of {ADAPTIVE_METHODS + FIXED_STEP_METHODS}, got {method!r}")
    if method in FIXED_STEP_METHODS and not (step_size is not None and 0 < step_size <= 1):
        raise ValueError(
            f"{name} method {method!r} takes fixed steps: expected step_size in (0, 1] (in units of t/T), got {step_size!r}"
        )
    if not isinstance(max_num_steps, int) or max_num_steps < 1:
        raise ValueError(f"{name} max_num_steps must be an integer >= 1, got {max_num_steps!r}")
    if kinetic_energy < 0 or jacobian_norm < 0:
        raise ValueError(
            f"{name} kinetic_energy and jacobian_norm must be >= 0, got {kinetic_energy!r} and {jacobian_norm!r}"
        )


def function_evaluations(module: nn.Module) -> dict[str, int]:
    """Evaluations of the dynamics in the last solves of every continuous flow in ``module``.

    For a training loop's metrics: ``{"forward": ..., "backward": ...}`` summed over the
    layers (``backward`` counts adjoint solves only). Python ints: no host sync.

    Example:
        >>> function_evaluations(torch.nn.Linear(2, 2))
        {'forward': 0, 'backward': 0}
    """
    layers = [m for m in module.modules() if isinstance(m, ContinuousFlow)]
    return {
        "forward": sum(m.nfe_forward for m in layers),
        "backward": sum(m.nfe_backward for m in layers),
    }


def regularization(module: nn.Module) -> Tensor | None:
    """The RNODE term of the last ``forward`` summed over the continuous flows in ``module``.

    A ``(B,)`` tensor, or ``None`` when no layer is regularized; add its mean to the loss.
    """
    terms = [m.regularization for m in module.modules() if isinstance(m, ContinuousFlow) and m.regularization is not None]
    return sum(terms[1:], terms[0]) if terms else None
