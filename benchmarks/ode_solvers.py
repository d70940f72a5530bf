"""torchdiffeq against torchode on the same continuous flow: seconds per training step and NFE.

The model is the toy2d FFJORD (one ``flows.ContinuousFlow``, ConcatSquashNet
2->64->64->64->2, tanh, exact trace, T = 0.5 learned), batch 512 of the checkerboard,
Adam 1e-3, dopri5 at atol = rtol = 1e-5 for both libraries, gradients by
backpropagation through the solver (torchdiffeq ``odeint``; torchode ``AutoDiffAdjoint``
without backpropagation through its step-size control: with it, torchode's default, every
parameter's gradient is non-finite from the first step on this model), or with
``--adjoint`` by each library's adjoint method (``odeint_adjoint``, ``BacksolveAdjoint``).
Both integrate the layer's own augmented dynamics (``_derivative``), so they solve the
same ODE with the same error norm (RMS over z) and differ only in the solver. At each
stage (the model trained that many steps with torchdiffeq; at 0 its dynamics are the
identity), each round copies the snapshot for each library in turn (alternating which
goes first), runs ``STEPS`` training steps and records the median seconds per step and
the evaluations per step; the figures are medians over ``ROUNDS`` rounds.

    pip install torchode torchdiffeq   # torchode is needed by this script alone
    python benchmarks/ode_solvers.py [--stages 0 300 1000]
    python benchmarks/ode_solvers.py --adjoint --stages 0 300   # the two adjoint methods

The outcome is written into flows/continuous.py's docstring (the choice of solver).
"""

from __future__ import annotations

import argparse
import copy
import pathlib
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import torchode  # noqa: E402

from benchmarks.timing import machine  # noqa: E402
from flows.base import logdet_dtype  # noqa: E402
from models.continuous import FFJORD  # noqa: E402
from models.data import load_dataset  # noqa: E402

ROUNDS, STEPS, BATCH, TOL = 7, 3, 512, 1e-5


def torchode_log_prob(model: FFJORD, x: torch.Tensor) -> torch.Tensor:
    """``log p(x)`` with the flow's ODE solved by torchode (dopri5, integral controller)."""
    flow = model.transform[-1]
    dtype = logdet_dtype(x.dtype)
    state = torch.cat([x.to(dtype), x.new_zeros(x.shape[0], 1)], dim=1)
    term = torchode.ODETerm(flow._derivative(None, None, False, x.dtype))
    step = torchode.Dopri5(term=term)
    # The layer's error norm (RMS over z alone), per sample as torchode controls each one.
    norm = lambda ratios: ratios[:, :2].square().mean(1).sqrt()  # noqa: E731
    controller = torchode.IntegralController(atol=TOL, rtol=TOL, term=term, norm=norm)
    # torchode's default (backpropagating through its step-size control) gives non-finite
    # gradients to every parameter from the first step on this model; without it, it trains.
    solver = torchode.AutoDiffAdjoint(step, controller, backprop_through_step_size_control=False)
    ones = torch.ones(x.shape[0], dtype=dtype)
    flow.nfe_forward, flow._solving = 0, True
    try:
        solution = solver.solve(torchode.InitialValueProblem(y0=state, t_start=0 * ones, t_end=ones))
    finally:
        flow._solving = False
    if bool((solution.status != 0).any()):
        raise RuntimeError(f"torchode failed: status {solution.status.unique().tolist()}")
    end = solution.ys[:, -1]
    z, logdet = end[:, :2], end[:, 2]
    return model.base.log_prob(z) + logdet


class _PerSample(nn.Module):
    """The layer's augmented dynamics as a module, callable on a batch or (torchode's
    backsolve adjoint, which vmaps over samples) on one sample."""

    def __init__(self, flow) -> None:
        super().__init__()
        self.flow = flow

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        derivative = self.flow._derivative(None, None, False, y.dtype)
        return derivative(t, y) if y.dim() == 2 else derivative(t.reshape(1), y[None])[0]


def torchode_adjoint_log_prob(model: FFJORD, x: torch.Tensor) -> torch.Tensor:
    """``log p(x)`` by torchode's ``BacksolveAdjoint`` (its adjoint method)."""
    flow = model.transform[-1]
    state = torch.cat([x, x.new_zeros(x.shape[0], 1)], dim=1)
    term = torchode.ODETerm(_PerSample(flow))
    norm = lambda ratios: ratios[:, :2].square().mean(1).sqrt()  # noqa: E731
    controller = torchode.IntegralController(atol=TOL, rtol=TOL, term=term, norm=norm)
    solver = torchode.BacksolveAdjoint(term, torchode.Dopri5(term=term), controller)
    ones = torch.ones(x.shape[0])
    flow.nfe_forward, flow._solving = 0, True
    try:
        solution = solver.solve(torchode.InitialValueProblem(y0=state, t_start=0 * ones, t_end=ones))
    finally:
        flow._solving = False
    end = solution.ys[:, -1]
    return model.base.log_prob(end[:, :2]) + end[:, 2]


LOG_PROB = {
    "torchdiffeq": lambda model, x: model.log_prob(x),
    "torchode": torchode_log_prob,
    "torchdiffeq-adjoint": lambda model, x: model.log_prob(x),
    "torchode-adjoint": torchode_adjoint_log_prob,
}


def train_steps(model: FFJORD, optimizer, data: torch.Tensor, library: str, steps: int) -> tuple[float, float]:
    """Median seconds per step and mean NFE per step (forward + adjoint backward) over ``steps`` steps."""
    seconds, nfe = [float("nan")], [float("nan")]
    generator = torch.Generator().manual_seed(1)
    flow = model.transform[-1]
    for _ in range(steps):
        x = data[torch.randint(len(data), (BATCH,), generator=generator)]
        start = time.perf_counter()
        log_p = LOG_PROB[library](model, x)
        loss = -log_p.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if not all(bool(torch.isfinite(p.grad).all()) for p in model.parameters()):
            raise RuntimeError(f"{library}: non-finite gradients")
        optimizer.step()
        seconds.append(time.perf_counter() - start)
        nfe.append(flow.nfe_forward + flow.nfe_backward)
    return statistics.median(seconds[1:] or seconds), statistics.mean(nfe[1:] or nfe)


def compare(model: FFJORD, optimizer, data: torch.Tensor, libraries: list[str]) -> dict[str, tuple[float, float]]:
    """Median (s/step, NFE/step) per library over ``ROUNDS`` interleaved rounds from one snapshot."""
    snapshot = (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()))
    results: dict[str, list[tuple[float, float]]] = {library: [] for library in libraries}
    for round_ in range(ROUNDS):
        for library in libraries if round_ % 2 == 0 else libraries[::-1]:
            model.transform[-1].adjoint = library == "torchdiffeq-adjoint"
            # Copies: the optimizer keeps the loaded moment tensors and updates them in place.
            model.load_state_dict(copy.deepcopy(snapshot[0]))
            optimizer.load_state_dict(copy.deepcopy(snapshot[1]))
            results[library].append(train_steps(model, optimizer, data, library, STEPS))
    model.load_state_dict(snapshot[0])
    optimizer.load_state_dict(snapshot[1])
    model.transform[-1].adjoint = False
    return {lib: (statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows)) for lib, rows in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 300], help="training steps done when measuring")
    parser.add_argument("--adjoint", action="store_true", help="compare the adjoint methods instead")
    args = parser.parse_args()
    libraries = ["torchdiffeq-adjoint", "torchode-adjoint"] if args.adjoint else ["torchdiffeq", "torchode"]
    torch.manual_seed(0)
    data = load_dataset("checkerboard", split="train").data
    model = FFJORD((2,), **{**FFJORD.PRESETS["toy2d"], "atol": TOL, "rtol": TOL})
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    print(f"machine: {machine()}; {ROUNDS} interleaved rounds of {STEPS} steps per stage, medians", flush=True)
    done = 0
    for stage in args.stages:
        train_steps(model, optimizer, data, "torchdiffeq", stage - done)
        done = stage
        figures = compare(model, optimizer, data, libraries)
        line = ";  ".join(f"{lib} {sec:.3f} s/step, {nfe:.0f} NFE" for lib, (sec, nfe) in figures.items())
        ratio = figures[libraries[1]][0] / figures[libraries[0]][0]
        print(f"after {stage} steps: {line};  time ratio torchode/torchdiffeq {ratio:.2f}", flush=True)


if __name__ == "__main__":
    main()
