"""What a run watches besides the loss, logged in each training record of ``metrics.jsonl``:
the ODE solver's function evaluations and RNODE's penalty (continuous flows), and the
reconstruction drift of memory-saving backpropagation.

A :class:`Monitor` takes in every step without a host sync (Python ints, or tensors kept
on the device) and is read at the logging interval, averaged over the interval and the
processes; its sums since the last record travel in the checkpoint, so a resumed run logs
what an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from flows.continuous import ContinuousFlow, function_evaluations, regularization
from flows.reversible import DriftMonitor

from .processes import Processes, all_reduce
from .step import StepOutput

__all__ = [
    "Monitor", "FunctionEvaluations", "Penalty", "Drift", "monitors_for", "configure_continuous", "rnode_penalty",
]


class Monitor:
    """Takes in each step (:meth:`after_step`, no host sync) and gives a record at the logging interval."""

    name = ""

    def after_step(self, out: StepOutput) -> None:
        raise NotImplementedError

    def record(self, procs: Processes) -> dict[str, float]:
        """The values since the last record (a host sync), then starts a new interval."""
        raise NotImplementedError

    def postfix(self, record: dict[str, float]) -> dict[str, str]:
        """The progress bar's text for ``record``."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class FunctionEvaluations(Monitor):
    """Evaluations of the ODE dynamics per step: ``nfe_forward`` (the solve of the loss) and
    ``nfe_backward`` (the adjoint solve of the backward pass; 0 when backpropagating through
    the solver, whose backward retraces the forward's evaluations), summed over the blocks."""

    name = "function_evaluations"

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.sums = [0, 0]  # forward, backward
        self.count = 0

    def after_step(self, out: StepOutput) -> None:
        counts = function_evaluations(self.model)  # Python ints: no host sync
        self.sums = [self.sums[0] + counts["forward"], self.sums[1] + counts["backward"]]
        self.count += 1

    def record(self, procs: Processes) -> dict[str, float]:
        device = next(self.model.parameters()).device
        sums = torch.tensor([*self.sums, self.count], dtype=torch.float64, device=device)
        forward, backward, count = all_reduce(sums, procs).tolist()
        self.sums, self.count = [0, 0], 0
        return {"nfe_forward": forward / max(count, 1), "nfe_backward": backward / max(count, 1)}

    def postfix(self, record: dict[str, float]) -> dict[str, str]:
        return {"nfe": f"{record['nfe_forward']:.0f}+{record['nfe_backward']:.0f}"}

    def state_dict(self) -> dict[str, Any]:
        return {"sums": list(self.sums), "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums, self.count = list(state["sums"]), state["count"]


class Penalty(Monitor):
    """The mean of a penalty added to the loss (RNODE's), as ``regularization``."""

    name = "regularization"

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(2, dtype=torch.float64, device=device)  # sum, count

    def after_step(self, out: StepOutput) -> None:
        if out.penalty is not None:
            self.sums += torch.stack([out.penalty.to(self.sums.dtype), torch.ones_like(self.sums[0])])

    def record(self, procs: Processes) -> dict[str, float]:
        total, count = all_reduce(self.sums.clone(), procs).tolist()
        self.sums.zero_()
        return {"regularization": total / max(count, 1)}

    def postfix(self, record: dict[str, float]) -> dict[str, str]:
        return {"reg": f"{record['regularization']:.3g}"}

    def state_dict(self) -> dict[str, Any]:
        return {"sums": self.sums.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums = state["sums"].to(self.sums.device)


class Drift(Monitor):
    """The largest reconstruction error of memory-saving backpropagation since the last record,
    ``max |x_rebuilt - x|`` over every run of steps (:class:`flows.reversible.DriftMonitor`)."""

    name = "reconstruction_error"

    def __init__(self, monitor: DriftMonitor, device: torch.device) -> None:
        self.monitor, self.device = monitor, device

    def after_step(self, out: StepOutput) -> None:
        pass  # the runs' backward passes update the DriftMonitor themselves

    def record(self, procs: Processes) -> dict[str, float]:
        error = self.monitor.max_error
        error = torch.zeros((), device=self.device) if error is None else error.clone()
        self.monitor.reset()
        return {"reconstruction_error": all_reduce(error, procs, dist.ReduceOp.MAX).item()}

    def postfix(self, record: dict[str, float]) -> dict[str, str]:
        return {"drift": f"{record['reconstruction_error']:.1e}"}

    def state_dict(self) -> dict[str, Any]:
        error = self.monitor.max_error
        return {"max_error": None if error is None else error.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.monitor.reset()
        if state["max_error"] is not None:
            self.monitor.update(state["max_error"].to(self.device))


def monitors_for(model: nn.Module, drift: DriftMonitor | None = None) -> list[Monitor]:
    """The monitors of a run of ``model``: function evaluations for continuous flows, their RNODE
    penalty when it is on, and the reconstruction drift of memory-saving backpropagation (``drift``)."""
    device = next(model.parameters()).device
    layers = [m for m in model.modules() if isinstance(m, ContinuousFlow)]
    found: list[Monitor] = [FunctionEvaluations(model)] if layers else []
    if any(m.kinetic_energy > 0 or m.jacobian_norm > 0 for m in layers):
        found.append(Penalty(device))
    return found + ([Drift(drift, device)] if drift is not None else [])


def configure_continuous(model: nn.Module, name: str, kinetic_energy: float = 0.0, jacobian_norm: float = 0.0,
                         adjoint: bool = False) -> bool:
    """Sets RNODE's weights and the adjoint method on every continuous flow of ``model`` (training
    settings, not the model's sizes: its config and checkpoint keys do not change).

    Returns whether ``model`` has continuous flows; raises ``ValueError`` when one of these
    options is given for a model without any.
    """
    layers = [m for m in model.modules() if isinstance(m, ContinuousFlow)]
    given = [flag for flag, on in (("--kinetic-energy", kinetic_energy), ("--jacobian-norm", jacobian_norm),
                                   ("--adjoint", adjoint)) if on]
    if given and not layers:
        raise ValueError(f"{', '.join(given)} expected a continuous-flow model (ffjord), got {name}")
    for layer in layers:
        layer.kinetic_energy = kinetic_energy or layer.kinetic_energy
        layer.jacobian_norm = jacobian_norm or layer.jacobian_norm
        layer.adjoint = adjoint or layer.adjoint
    return bool(layers)


def rnode_penalty(model: nn.Module) -> Callable[[], Tensor | None] | None:
    """The RNODE term of the last forward pass, averaged over the batch, to add to the loss
    (RNODE's code adds it to bits/dim the same way); ``None`` when no block is regularized."""
    layers = [m for m in model.modules() if isinstance(m, ContinuousFlow)]
    if not any(m.kinetic_energy > 0 or m.jacobian_norm > 0 for m in layers):
        return None

    def penalty() -> Tensor | None:
        term = regularization(model)
        return None if term is None else term.mean()

    return penalty
