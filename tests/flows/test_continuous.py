"""Tests of flows/continuous.py: the continuous flow against the oracle and closed forms, the
Hutchinson estimate's unbiasedness, RNODE's terms, NFE counts, the optional extra and errors.

Solver tolerances: the oracle checks run the solver at atol = rtol = 1e-8 and compare at
1e-6. The log-det and the round trip are exact only up to the solver's global error, a
small multiple of its per-step tolerance (measured by check_flow on perturbed 3-D flows:
log-det 9e-8, round trip 4e-7, inverse log-det 5e-7, cross-sample derivatives 3e-9 through
the batch-wide step size); 1e-6 leaves that margin and still fails for any real mistake
(a sign, a missing factor T, a wrong trace: O(0.01-1)).
"""

from __future__ import annotations

import math
import subprocess
import sys
from functools import partial

import pytest
import torch
from torch import nn

import flows.continuous as continuous
from flows.base import Sequential
from flows.continuous import ConcatSquashNet, ContinuousFlow, SolverError, function_evaluations, regularization
from flows.freeform import logdet_mode
from flows.jacobian import check_flow, exact_logdet
from flows.statistical import check_estimator
from tests.conftest import ROOT
from tests.registry import perturb

TIGHT = dict(atol=1e-8, rtol=1e-8)
FALSE_ALARM = 1e-6  # of each z-test, over all its samples together (Bonferroni)


def small_flow(features: int = 2, context: int = 0, std: float = 0.3, **kwargs) -> ContinuousFlow:
    """A float64 flow with a tiny perturbed dynamics net (not the identity it starts as)."""
    torch.manual_seed(1)
    net = partial(ConcatSquashNet, hidden_features=8, num_blocks=1)
    flow = ContinuousFlow(features, net, context, **{**TIGHT, **kwargs}).double()
    perturb(flow, std)
    return flow


class Field(nn.Module):
    """Dynamics of known solution: ``f(z) = z @ A.T + c`` (``A`` zero: constant; ``c`` zero: linear)."""

    def __init__(self, matrix: torch.Tensor, shift: torch.Tensor) -> None:
        super().__init__()
        self.matrix, self.shift = nn.Parameter(matrix), nn.Parameter(shift)

    def forward(self, z: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return z @ self.matrix.T + self.shift


def field_flow(matrix, shift, **kwargs) -> ContinuousFlow:
    return ContinuousFlow(matrix.shape[0], lambda features, context: Field(matrix, shift), **{**TIGHT, **kwargs})


def z_threshold(num_tests: int) -> float:
    """Two-sided |z| bound with a total false-alarm rate ``FALSE_ALARM`` over ``num_tests``."""
    return math.sqrt(2) * torch.special.erfinv(torch.tensor(1 - FALSE_ALARM / num_tests, dtype=torch.float64)).item()


def estimate_z_scores(flow: ContinuousFlow, x: torch.Tensor, draws: int) -> torch.Tensor:
    """z-scores of the mean of ``draws`` estimates per sample against the exact float64 log-det.

    Each row of ``x`` repeated ``draws`` times in one batch gets its own probe, so one
    solve gives all the draws.
    """
    exact = exact_logdet(flow, x)
    with logdet_mode(flow, "estimate"), torch.no_grad():
        estimates = flow(x.repeat(draws, 1))[1].reshape(draws, x.shape[0])
    stderr = estimates.std(0) / math.sqrt(draws)
    return (estimates.mean(0) - exact) / stderr


def test_exact_mode_passes_the_oracle() -> None:
    flow = small_flow(3, context=2, learn_time=True)
    report = check_flow(flow, torch.randn(3, 3), torch.randn(3, 2), atol=1e-6, rtol=1e-6)
    assert report["logdet"] < 1e-6 and report["round_trip"] < 1e-6


def test_declares_its_inverse_iterative() -> None:
    # An ODE solve inverts only to the solver's tolerance: memory-saving backpropagation
    # (which rebuilds inputs through inverse) and Sequential must see it.
    flow = small_flow()
    assert flow.iterative_inverse and Sequential(flow).iterative_inverse


def test_linear_dynamics_match_the_closed_form() -> None:
    """``f(z) = A z`` gives ``z(T) = expm(T A) x`` and ``log|det| = T tr(A)``, in both directions."""
    matrix = torch.tensor([[0.3, -0.5], [0.8, -0.1]])
    flow = field_flow(matrix, torch.zeros(2), time=0.7)
    x = torch.randn(4, 2)
    z, logdet = flow(x)
    torch.testing.assert_close(z, x @ torch.linalg.matrix_exp(0.7 * matrix).T, atol=1e-7, rtol=1e-7)
    torch.testing.assert_close(logdet, torch.full((4,), 0.7 * 0.2), atol=1e-8, rtol=1e-8)
    x_back, inverse_logdet = flow.inverse(z)
    torch.testing.assert_close(x_back, x, atol=1e-7, rtol=1e-7)
    torch.testing.assert_close(inverse_logdet, -logdet, atol=1e-8, rtol=1e-8)


class Sum(nn.Module):
    """``f = f_1 + f_2``."""

    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__()
        self.first, self.second = first, second

    def forward(self, z: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.first(z, t, context) + self.second(z, t, context)


def estimated_flow(**kwargs) -> ContinuousFlow:
    """A perturbed dynamics net plus a linear field of trace 1.9: a log-det large enough
    against the estimate's spread that a biased estimator shows in 1000 draws."""
    matrix = torch.tensor([[0.8, 0.2, -0.1], [0.1, 0.5, 0.3], [-0.2, 0.1, 0.6]])
    torch.manual_seed(1)
    net = ConcatSquashNet(3, hidden_features=8, num_blocks=1)
    perturb(net, 0.6)
    dynamics = lambda features, context: Sum(Field(matrix, torch.zeros(3)), net)  # noqa: E731
    # Solver at 1e-6: its error (~1e-6) is far below the standard error of 1000 draws (~1e-2).
    return ContinuousFlow(3, dynamics, atol=1e-6, rtol=1e-6, **kwargs)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_estimate_is_unbiased(kind: str) -> None:
    flow = estimated_flow(probe=kind)
    z = estimate_z_scores(flow, torch.randn(3, 3), draws=1000)
    assert bool((z.abs() < z_threshold(3)).all()), f"estimate biased: z-scores {z.tolist()}"


@pytest.mark.parametrize(
    "wrong", [lambda like, kind: 1.3 * torch.randn_like(like), lambda like, kind: 1 + torch.randn_like(like)],
    ids=["variance-1.69", "mean-1"],
)
def test_the_z_test_catches_wrong_probes(monkeypatch, wrong) -> None:
    """Probes of the wrong variance or mean give a biased trace: the same test must fail."""
    flow = estimated_flow()
    monkeypatch.setattr(continuous, "probe", wrong)
    z = estimate_z_scores(flow, torch.randn(3, 3), draws=1000)
    assert bool((z.abs() > z_threshold(3)).any()), f"a wrong estimator passed: z-scores {z.tolist()}"


def test_estimate_passes_the_statistical_checker() -> None:
    # 60 draws (each a solve) at the default tolerance keep it short; the solver's error
    # (~1e-5) is far below the standard error of 60 draws (~0.1).
    flow = small_flow(2, context=2, std=0.6, atol=1e-5, rtol=1e-5)
    with logdet_mode(flow, "estimate"):
        check_estimator(flow, torch.randn(2, 2), torch.randn(2, 2), num_draws=60)


def test_adjoint_gradients_match_backpropagation() -> None:
    x, context = torch.randn(3, 2), torch.randn(3, 2, requires_grad=True)
    grads = []
    for adjoint in (False, True):
        flow = small_flow(2, context=2, adjoint=adjoint, learn_time=True)
        z, logdet = flow(x, context)
        loss = (z.square().sum(1) - logdet).sum()
        grads.append(torch.autograd.grad(loss, [*flow.parameters(), context]))
    for backprop, adjoint in zip(*grads):
        torch.testing.assert_close(adjoint, backprop, atol=1e-6, rtol=1e-5)


def test_nfe_is_counted() -> None:
    flow = small_flow(2)
    z, logdet = flow(torch.randn(3, 2))
    assert flow.nfe_forward > 0 and flow.nfe_backward == 0
    logdet.sum().backward()
    assert flow.nfe_backward == 0  # backpropagation through the steps evaluates nothing new
    adjoint = small_flow(2, adjoint=True)
    stack = Sequential(adjoint, small_flow(2))
    stack(torch.randn(3, 2))[1].sum().backward()
    assert adjoint.nfe_backward > 0
    counts = function_evaluations(stack)
    assert counts == {"forward": adjoint.nfe_forward + stack[1].nfe_forward, "backward": adjoint.nfe_backward}


def test_rnode_terms_match_closed_forms() -> None:
    """Linear ``f = a z``: ``∫|f|^2 = a |x|^2 (e^{2aT} - 1) / 2`` and ``∫|∂f/∂z|_F^2 = T D a^2``
    (exactly, also with Rademacher probes, for which ``|v^T a I|^2 = a^2 D``)."""
    a, time, x = 0.4, 0.5, torch.randn(3, 2)
    kinetic = x.square().sum(1) * a * (math.exp(2 * a * time) - 1) / 2
    for mode in ("exact", "estimate"):
        flow = field_flow(a * torch.eye(2), torch.zeros(2), time=time, logdet_mode=mode, kinetic_energy=2.0)
        flow(x)
        # 1e-6: the integral carries the solver's global error (4e-7 measured at 1e-8 per step).
        torch.testing.assert_close(regularization(flow), 2.0 * kinetic, atol=1e-6, rtol=1e-6)
        flow = field_flow(a * torch.eye(2), torch.zeros(2), time=time, logdet_mode=mode, jacobian_norm=3.0)
        flow(x)
        torch.testing.assert_close(flow.regularization, torch.full((3,), 3.0 * time * 2 * a**2), atol=1e-6, rtol=1e-6)
    assert regularization(small_flow(2)) is None and small_flow(2).regularization is None


def test_rnode_term_has_gradients() -> None:
    flow = small_flow(2, kinetic_energy=0.1, jacobian_norm=0.1)
    flow(torch.randn(3, 2))
    grads = torch.autograd.grad(regularization(flow).sum(), list(flow.dynamics.parameters()))
    assert all(bool(g.abs().sum() > 0) for g in grads)


def test_fixed_step_method_agrees_with_dopri5() -> None:
    x = torch.randn(3, 2)
    reference = small_flow(2)(x)
    fixed = small_flow(2, method="rk4", step_size=0.05)(x)
    for got, expected in zip(fixed, reference):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_logdet_is_wide_under_autocast() -> None:
    # The solver's default tolerance: bf16 dynamics (~4e-3 relative noise) cannot meet 1e-8.
    flow = small_flow(2, atol=1e-5, rtol=1e-5).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, logdet = flow(torch.randn(3, 2, dtype=torch.float32))
    assert logdet.dtype == torch.float32 and z.dtype == torch.float32


def test_missing_extra_names_it(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torchdiffeq", None)  # `import torchdiffeq` now fails
    with pytest.raises(ImportError, match=r"pip install 'jacflow\[ode\]'"):
        ContinuousFlow(2)


def test_flows_imports_without_the_extra() -> None:
    code = (
        "import sys; sys.modules['torchdiffeq'] = None\n"
        "import flows, flows.continuous, models.continuous\n"
        "try:\n    flows.continuous.ContinuousFlow(2)\nexcept ImportError as e:\n    print('ImportError', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ImportError" in out.stdout and "jacflow[ode]" in out.stdout


@pytest.mark.parametrize(("make", "args", "match"), [
    (lambda: small_flow(2, context=2), (torch.randn(3, 2), torch.randn(3, 5)),
     r"ContinuousFlow expects context of shape \(3, 2\), got \(3, 5\)"),
    (lambda: small_flow(2), (torch.randn(3, 2), torch.randn(3, 2)), r"built without context \(context_features=0\)"),
    (lambda: small_flow(2, context=2), (torch.randn(3, 2),), r"context_features=2 but got context=None"),
    (lambda: small_flow(2), (torch.randn(3, 4),), r"ContinuousFlow expects 2 features on dim 1, got input of shape \(3, 4\)"),
    (lambda: small_flow(2), (torch.randn(3, 2, 2, 2),), r"expects input of rank 2 \(B, D\), got shape \(3, 2, 2, 2\)"),
])
def test_bad_input(make, args, match) -> None:
    with pytest.raises(ValueError, match=match):
        make()(*args)


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(method="rk45"), r"method must be one of .*, got 'rk45'"),
    (dict(method="rk4"), r"method 'rk4' takes fixed steps: expected step_size in \(0, 1\]"),
    (dict(atol=0.0), r"atol and rtol must be > 0, got atol=0.0"),
    (dict(time=-1.0), r"time must be a finite number > 0, got -1.0"),
    (dict(probe="uniform"), r"probe must be 'rademacher' or 'gaussian', got 'uniform'"),
    (dict(kinetic_energy=-1.0), r"kinetic_energy and jacobian_norm must be >= 0, got -1.0"),
    (dict(logdet_mode="gradient"), r"logdet_mode must be one of \('exact', 'estimate'\), got 'gradient'"),
    (dict(max_num_steps=0), r"max_num_steps must be an integer >= 1, got 0"),
])
def test_bad_arguments(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        ContinuousFlow(2, **kwargs)


def test_solver_failure_names_what_came() -> None:
    """``dz/dt = z^2`` from ``z = 10`` blows up at ``t = 0.1``, before ``T = 1``."""

    class Blowup(nn.Module):
        def forward(self, z, t, context=None):
            return z.square()

    flow = ContinuousFlow(1, lambda features, context: Blowup(), max_num_steps=200)
    with pytest.raises(SolverError, match=r"ODE solver dopri5 \(atol=1e-05, rtol=1e-05\) failed integrating a batch of shape \(2, 1\)"):
        flow(torch.full((2, 1), 10.0))
    with pytest.raises(SolverError, match=r"failed .*non-finite"):
        small_flow(2)(torch.tensor([[float("nan"), 0.0]]))
