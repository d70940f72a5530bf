"""Tests of models/training/monitors.py: function evaluations, RNODE's penalty and the reconstruction
drift, taken in per step without a host sync and read at the logging interval."""

from __future__ import annotations

import pytest
import torch

from flows.continuous import ContinuousFlow
from flows.reversible import DriftMonitor
from models import build_model
from models.training import (
    Drift, FunctionEvaluations, Penalty, Processes, StepOutput, configure_continuous, monitors_for, rnode_penalty,
)

PROCS = Processes()


def ffjord(**kwargs):
    return build_model("ffjord", "toy2d", (2,), hidden_features=4, num_blocks=0, **kwargs)


def output(penalty: float | None = None) -> StepOutput:
    zero = torch.zeros(())
    return StepOutput(zero, zero, zero, zero, None if penalty is None else torch.tensor(penalty))


def test_function_evaluations_average_over_the_interval_then_restart() -> None:
    model = ffjord(num_steps=2)
    monitor = FunctionEvaluations(model)
    counts = []
    for _ in range(3):
        model.log_prob(torch.randn(8, 2)).mean().backward()
        counts.append(sum(m.nfe_forward for m in model.modules() if isinstance(m, ContinuousFlow)))
        monitor.after_step(output())
    record = monitor.record(PROCS)
    assert record == {"nfe_forward": sum(counts) / 3, "nfe_backward": 0.0} and min(counts) >= 2 * 6
    assert monitor.postfix(record) == {"nfe": f"{sum(counts) / 3:.0f}+0"}
    saved = monitor.state_dict()
    monitor.after_step(output())
    fresh = FunctionEvaluations(model)
    fresh.load_state_dict(monitor.state_dict())
    assert fresh.record(PROCS) == monitor.record(PROCS) and saved == {"sums": [0, 0], "count": 0}


def test_the_adjoint_method_counts_backward_evaluations() -> None:
    model = ffjord()
    configure_continuous(model, "ffjord", adjoint=True)
    monitor = FunctionEvaluations(model)
    model.log_prob(torch.randn(8, 2)).mean().backward()
    monitor.after_step(output())
    assert monitor.record(PROCS)["nfe_backward"] > 0


def test_rnode_penalty_is_the_batch_mean_of_the_weighted_integrals_and_is_monitored() -> None:
    model = ffjord()
    assert rnode_penalty(model) is None and [type(m) for m in monitors_for(model)] == [FunctionEvaluations]
    assert configure_continuous(model, "ffjord", kinetic_energy=0.5, jacobian_norm=0.25)
    penalty = rnode_penalty(model)
    model.log_prob(torch.randn(8, 2))
    (layer,) = [m for m in model.modules() if isinstance(m, ContinuousFlow)]
    assert layer.kinetic_energy == 0.5 and layer.jacobian_norm == 0.25
    torch.testing.assert_close(penalty(), layer.regularization.mean())
    monitor = Penalty(torch.device("cpu"))
    for value in (1.0, 2.0, None):
        monitor.after_step(output(value))
    assert monitor.record(PROCS) == {"regularization": 1.5} and monitor.record(PROCS) == {"regularization": 0.0}
    assert [type(m) for m in monitors_for(model)] == [FunctionEvaluations, Penalty]


def test_continuous_options_on_another_model_are_refused() -> None:
    realnvp = build_model("realnvp", "toy2d", (2,))
    assert not configure_continuous(realnvp, "realnvp")
    with pytest.raises(ValueError, match=r"--kinetic-energy, --adjoint expected a continuous-flow model \(ffjord\), "
                                         r"got realnvp"):
        configure_continuous(realnvp, "realnvp", kinetic_energy=0.1, adjoint=True)


def test_drift_reports_the_largest_error_since_the_last_record() -> None:
    drift = DriftMonitor()
    monitor = Drift(drift, torch.device("cpu"))
    assert monitor.record(PROCS) == {"reconstruction_error": 0.0}
    drift.update(torch.tensor(3e-7))
    drift.update(torch.tensor(1e-7))
    saved = monitor.state_dict()
    record = monitor.record(PROCS)
    assert record == {"reconstruction_error": pytest.approx(3e-7)} and monitor.postfix(record) == {"drift": "3.0e-07"}
    assert drift.max_error is None  # a new interval
    monitor.load_state_dict(saved)
    assert monitor.record(PROCS) == record
