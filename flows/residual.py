"""Residual flows: ``z = x + g(x)`` with ``Lip(g) < 1``, and ``log det(I + J_g)`` in three modes.

``Lip(g) < 1`` makes the map invertible (the inverse is the fixed point of
``x <- y - g(x)``) and gives the power series

    log det(I + J) = sum_{k >= 1} (-1)^(k+1) / k * tr(J^k),

whose traces are estimated with Hutchinson probes ``v`` (``E[v v^T] = I``) and
vector-Jacobian products ``v^T J^k``, one per term, never forming ``J``.

References:
    Behrmann et al., "Invertible Residual Networks", ICML 2019, arXiv:1811.00995.
    Chen et al., "Residual Flows for Invertible Generative Modeling", NeurIPS 2019,
    arXiv:1906.02735 (the unbiased estimator: section 3.1; the Neumann gradient: 3.2).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from flows.base import logdet_dtype, sum_per_sample, zero_logdet
from flows.freeform import FreeFormFlow, probe
from flows.lipschitz import LipschitzNet
from flows.spectral import refresh_spectral_norms
from flows.validation import check_context, check_input

__all__ = ["Residual", "ConvergenceError"]

# Relative change per fixed-point iteration below which the inverse has converged, by the
# dtype g computes in: float64 leaves round-off near 1e-15, so 1e-10 keeps the round trip
# within 1e-8 even at Lip(g) = 0.97 (error <= Lip / (1 - Lip) * change); float32 ~1e-7.
_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


class ConvergenceError(RuntimeError):
    """Raised by :meth:`Residual.inverse` when the fixed-point iteration misses its tolerance."""


class Residual(FreeFormFlow):
    """An invertible residual layer ``y = x + g(x)`` with ``Lip(g) < 1`` (i-ResNet, Residual Flows).

    ``logdet = log det(I + J_g(x))`` (positive determinant: ``I + J_g`` has no eigenvalue
    on ``(-inf, 0]`` when ``||J_g|| < 1``), computed by ``logdet_mode``:

    - ``"exact"``: ``J_g`` per sample (``net.value_and_jacobian``: ``torch.func`` ``vmap``
      over ``jacrev``, or the MLP's forward-mode product of its layers), then
      ``slogdet(I + J_g)``; cost grows with ``D``. For small ``D`` and tests.
    - ``"estimate"``: the Residual Flows estimator, unbiased for ``log det(I + J_g)``:
      ``sum_{k=1}^{n} (-1)^(k+1)/k * v^T J^k v / P(n >= k)`` with a probe ``v`` per sample
      and ``n = num_exact_terms + N``, ``N ~ Geometric(roulette_p)`` on ``{0, 1, ...}``
      (one ``N`` per call), so ``P(n >= k) = (1 - p)^(k - num_exact_terms)`` beyond the
      exact terms. Its variance is finite when the spectral radius ``rho`` of ``J_g(x)``
      has ``rho^2 < 1 - p``; ``Lip(g)^2 < 1 - p`` guarantees it. The defaults (3 exact
      terms, ``p = 0.5``) are rtqichen/residual-flows' (``n_exact_terms=2`` with a geometric
      count from 1); they guarantee finite variance only for ``Lip(g) < 0.71``, though a
      trained ``J_g`` is usually far below its bound: check yours with
      :func:`flows.statistical.check_estimator`. Gradients backpropagate through all
      ``n`` products.
    - ``"gradient"``: the memory-saving Neumann-series estimator. The returned "logdet" is
      the surrogate ``w^T J_g v`` with ``w^T = sum_{k=0}^{n} (-1)^k v^T J^k / P(n >= k)``
      held constant, whose gradient (in the parameters and in ``x``) is an unbiased
      estimate of the gradient of ``log det(I + J_g)``; only one product keeps a graph.
      **Its value is not the log-determinant and no likelihood**: train with it, evaluate
      in ``"exact"`` or ``"estimate"`` mode (``flows.logdet_mode``).

    ``inverse`` iterates ``x <- y - g(x)`` from ``x = y`` until the largest change per
    element, relative to ``1 + |x|``, is below ``tolerance`` (one host sync per
    iteration), and raises :class:`ConvergenceError`, saying how far it got, after
    ``max_iterations``. Gradients flow through the iterations (unrolled). Its logdet is
    minus the forward one at the recovered ``x``, in the same mode.

    Args:
        net: the residual branch ``g(x, context)``, a :class:`flows.lipschitz.LipschitzNet`
            (vectors ``(B, D)`` or images ``(B, C, H, W)``, with or without context).
        logdet_mode: ``"exact"``, ``"estimate"`` or ``"gradient"``.
        num_exact_terms: power-series terms always computed, ``>= 0``.
        roulette_p: the geometric distribution's success probability, in ``(0, 1)``.
        probe: ``"rademacher"`` or ``"gaussian"`` Hutchinson probes.
        tolerance: the inverse's tolerance; ``None``: by the dtype ``g`` computes in
            (1e-10 for float64, 1e-5 for float32, 1e-2 for bfloat16).
        max_iterations: the inverse's iteration cap.

    References:
        Behrmann et al. 2019, arXiv:1811.00995; Chen et al. 2019, arXiv:1906.02735.

    Example:
        >>> import torch
        >>> from flows.lipschitz import LipschitzMLP
        >>> layer = Residual(LipschitzMLP(2, 16), logdet_mode="estimate")
        >>> x = torch.randn(5, 2)
        >>> z, logdet = layer(x)
        >>> torch.allclose(layer.inverse(z)[0], x, atol=1e-4), logdet.shape
        (True, torch.Size([5]))
    """

    iterative_inverse = True

    def __init__(
        self,
        net: LipschitzNet,
        logdet_mode: str = "exact",
        *,
        num_exact_terms: int = 3,
        roulette_p: float = 0.5,
        probe: str = "rademacher",
        tolerance: float | None = None,
        max_iterations: int = 200,
    ) -> None:
        super().__init__(logdet_mode)
        if not isinstance(net, LipschitzNet):
            raise TypeError(
                f"Residual expects a flows.lipschitz.LipschitzNet (Lip(g) < 1), got {type(net).__name__}; "
                "build g from LipschitzMLP or LipschitzConvNet"
            )
        if not isinstance(num_exact_terms, int) or num_exact_terms < 0:
            raise ValueError(f"Residual num_exact_terms must be an integer >= 0, got {num_exact_terms!r}")
        if not 0 < roulette_p < 1:
            raise ValueError(f"Residual roulette_p must be in (0, 1), got {roulette_p!r}")
        if probe not in ("rademacher", "gaussian"):
            raise ValueError(f"Residual probe must be 'rademacher' or 'gaussian', got {probe!r}")
        if tolerance is not None and not tolerance > 0:
            raise ValueError(f"Residual tolerance must be > 0, got {tolerance!r}")
        if not isinstance(max_iterations, int) or max_iterations < 1:
            raise ValueError(f"Residual max_iterations must be an integer >= 1, got {max_iterations!r}")
        self.net = net
        self.num_exact_terms = num_exact_terms
        self.roulette_p = roulette_p
        self.probe = probe
        self.tolerance = tolerance
        self.max_iterations = max_iterations

    def extra_repr(self) -> str:
        return (
            f"logdet_mode={self.logdet_mode!r}, num_exact_terms={self.num_exact_terms}, "
            f"roulette_p={self.roulette_p}, probe={self.probe!r}"
        )

    def _check(self, x: Tensor, context: Tensor | None) -> None:
        name = type(self).__name__
        check_input(name, x, self.net.features, self.net.ranks)
        check_context(name, context, self.net.context_features, x.shape[0])
        refresh_spectral_norms(self.net)  # never inside the torch.func transforms or loops below

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(x, context)
        if self.logdet_mode == "exact":
            return self._exact(x, context)
        return self._series(x, context)

    def _exact(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        """``g(x)`` and ``slogdet(I + J_g)``, ``J_g`` per sample from the net (``torch.func`` by default)."""
        gx, jac = self.net.value_and_jacobian(x, context)  # (B, ...), (B, D, D)
        jac = jac.to(logdet_dtype(jac.dtype))  # slogdet in float32 or wider, never bf16
        eye = torch.eye(jac.shape[-1], dtype=jac.dtype, device=jac.device)
        return x + gx, torch.linalg.slogdet(eye + jac)[1]

    def _num_terms(self) -> int:
        """``num_exact_terms + N``, ``N ~ Geometric(p)`` on {0, 1, ...}, drawn on the CPU (no device sync)."""
        trials = torch.empty((), dtype=torch.float64).geometric_(self.roulette_p)  # on {1, 2, ...}
        return self.num_exact_terms + int(trials) - 1

    def _weight(self, k: int) -> float:
        """``1 / P(n >= k)``: 1 for the exact terms, ``(1 - p)^-(k - num_exact_terms)`` beyond."""
        return (1.0 - self.roulette_p) ** -max(k - self.num_exact_terms, 0)

    def _series(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        """``g(x)`` with the unbiased estimate or the Neumann surrogate, by the mode."""
        record = torch.is_grad_enabled()
        num_terms = self._num_terms()
        with torch.enable_grad():  # vector-Jacobian products need a graph, also in evaluation
            x_in = x if x.requires_grad else x.detach().requires_grad_(True)
            gx = self.net(x_in, context)
            v = probe(x_in, self.probe)
            if self.logdet_mode == "estimate":
                logdet = self._power_series(gx, x_in, v, num_terms, record)
            else:
                logdet = self._neumann_surrogate(gx, x_in, v, num_terms, record)
        y = x + gx
        return (y, logdet) if record else (y.detach(), logdet.detach())

    def _power_series(self, gx: Tensor, x: Tensor, v: Tensor, num_terms: int, record: bool) -> Tensor:
        """``sum_{k=1}^{n} (-1)^(k+1)/k * v^T J^k v / P(n >= k)`` (Chen et al. 2019, eq. 6)."""
        w, total = v, zero_logdet(x)
        for k in range(1, num_terms + 1):
            (w,) = torch.autograd.grad(gx, x, w.to(gx.dtype), create_graph=record, retain_graph=True)  # w = v^T J^k
            total = total + ((-1) ** (k + 1) / k * self._weight(k)) * sum_per_sample(w * v)
        return total

    def _neumann_surrogate(self, gx: Tensor, x: Tensor, v: Tensor, num_terms: int, record: bool) -> Tensor:
        """``w^T J v`` with ``w^T = sum_{k=0}^{n} (-1)^k v^T J^k / P(n >= k)`` held constant.

        ``d/dtheta log det(I + J) = tr((I + J)^-1 dJ/dtheta)`` and ``E[w^T] = v^T (I + J)^-1``
        (Chen et al. 2019, eq. 8), so the surrogate's gradient is unbiased; the series
        runs without a graph and only the last product keeps one.
        """
        w, series = v, v
        for k in range(1, num_terms + 1):
            (w,) = torch.autograd.grad(gx, x, w.to(gx.dtype), retain_graph=True)  # v^T J^k, no graph
            series = series + ((-1) ** k * self._weight(k)) * w
        (jvp,) = torch.autograd.grad(gx, x, series.detach().to(gx.dtype), create_graph=record, retain_graph=True)
        return sum_per_sample(jvp * v)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(y, context)
        x, history = y, []
        for _ in range(self.max_iterations):
            gx = self.net(x, context)
            x_next = y - gx
            # Largest change per sample, relative to 1 + |x| (absolute near 0, relative beyond).
            change = ((x_next - x).abs() / (1 + x_next.abs())).detach().reshape(y.shape[0], -1).amax(1)
            x = x_next
            tolerance = self.tolerance or _TOLERANCE.get(gx.dtype, 1e-5)
            history.append(change.max())
            if bool(history[-1] <= tolerance):  # the one host sync per iteration
                break
        else:
            raise self._not_converged(change, history, tolerance)
        _, logdet = self.forward(x, context)
        return x, -logdet

    def _not_converged(self, change: Tensor, history: list[Tensor], tolerance: float) -> ConvergenceError:
        bound = self.net.lipschitz_bound
        needed = math.log(tolerance) / math.log(bound) if 0 < bound < 1 else math.inf
        return ConvergenceError(
            f"Residual.inverse did not converge in {self.max_iterations} iterations: sample "
            f"{int(change.argmax())} still moved by {float(change.max()):.3e} (relative to 1 + |x|) in the "
            f"last one, from {float(history[0]):.3e} in the first; tolerance {tolerance:g}. x <- y - g(x) "
            f"contracts by Lip(g) <= {bound:.3g} per iteration (about {needed:.0f} iterations from a change "
            "of 1): raise max_iterations, lower the net's coefficient, or check that y came from this layer"
        )
