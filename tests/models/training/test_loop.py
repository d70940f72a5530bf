"""Tests of models/training/loop.py: fit on tiny stand-in models, resuming, non-finite values, DDP."""

from __future__ import annotations

import math
import os
import signal
import socket
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from models import training
from models.training import loop

from .standins import NaNAt, StandIn, params, start, vector_data


def test_fit_writes_metrics_and_checkpoint(tmp_path: Path) -> None:
    data = torch.randint(0, 17, (64, 1, 4, 4)).double()
    model = StandIn((1, 4, 4), num_levels=17)
    evaluator = partial(training.evaluate, model, data[:20], num_levels=17, batch_size=8)
    state, outcome = start(model, data, 6, tmp_path, num_levels=17, evaluator=evaluator, eval_every=3)
    records = training.read_metrics(tmp_path / "metrics.jsonl")
    assert outcome == "done" and state.step == 6
    assert [r["step"] for r in records if r["split"] == "train"] == [2, 4, 6]
    assert [r["step"] for r in records if r["split"] == "test"] == [3]
    assert all(math.isfinite(r["bits_per_dim"]) for r in records)
    payload = training.load_checkpoint(tmp_path / "checkpoint.pt")
    assert payload["step"] == 6 and payload["model_name"] == "standin"
    assert set(payload) >= {"model", "optimizer", "scheduler", "scaler", "config", "model_config", "rng"}


def test_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path: Path) -> None:
    data = torch.randint(0, 17, (64, 1, 4, 4)).double()
    torch.manual_seed(1)
    straight, _ = start(StandIn((1, 4, 4), 17), data, 8, tmp_path / "a", num_levels=17)
    torch.manual_seed(1)
    start(StandIn((1, 4, 4), 17), data, 4, tmp_path / "b", num_levels=17)
    torch.manual_seed(2)  # the checkpoint's RNG states must win over the current ones
    resumed, _ = start(StandIn((1, 4, 4), 17), data, 8, tmp_path / "b", num_levels=17,
                       start_from=tmp_path / "b" / "checkpoint.pt")
    for a, b in zip(params(straight.model), params(resumed.model), strict=True):
        assert torch.equal(a, b)

    def losses(run: str) -> list[tuple]:
        rows = training.read_metrics(tmp_path / run / "metrics.jsonl")
        return [(r["step"], r["loss"], r["log_p"], r["logdet"], r["lr"]) for r in rows]

    assert losses("a") == losses("b")


def test_nan_loss_stops_naming_the_step_and_the_last_good_checkpoint(tmp_path: Path) -> None:
    model = NaNAt({5})
    message = r"NaN or inf at step 5\. Last good checkpoint: .*checkpoint\.pt \(step 4\)"
    with pytest.raises(FloatingPointError, match=message):
        start(model, vector_data(), 8, tmp_path)
    payload = training.load_checkpoint(tmp_path / "checkpoint.pt")
    assert payload["step"] == 4
    assert all(torch.isfinite(t).all() for t in payload["model"].values())


def test_nan_loss_before_any_checkpoint_says_so(tmp_path: Path) -> None:
    with pytest.raises(FloatingPointError, match="at step 1. No checkpoint was written yet"):
        start(NaNAt({1}), vector_data(), 8, tmp_path)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_skip_mode_skips_and_counts_non_finite_batches(tmp_path: Path) -> None:
    state, outcome = start(NaNAt({1, 4}), vector_data(), 8, tmp_path, nonfinite="skip")
    assert outcome == "done" and state.skipped == 2
    assert all(torch.isfinite(p).all() for p in state.model.parameters())
    assert training.read_metrics(tmp_path / "metrics.jsonl")[-1]["skipped"] == 2


def test_a_batch_with_nan_raises(tmp_path: Path) -> None:
    data = vector_data()
    data[3, 1] = math.inf
    with pytest.raises(ValueError, match=r"expected finite values, got NaN or inf in rows \[3\]"):
        training.check_finite(data, "digits training data")
    message = r"training batch expected finite values, got NaN or inf in the batch of step \d"
    with pytest.raises(ValueError, match=message):
        start(StandIn(), data, 8, tmp_path, log_every=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, tmp: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    procs, device = training.setup_processes("cpu")
    try:
        _ddp_train(rank, tmp, procs)  # its training state is gone before the group is
    finally:
        training.teardown_processes()


def _ddp_train(rank: int, tmp: str, procs: training.Processes) -> None:
    torch.manual_seed(rank)  # different on purpose: DDP must make them equal
    data = torch.randn(64, 4, generator=torch.Generator().manual_seed(0)) * 3 + 1
    state, _ = start(StandIn(), data, 4, Path(tmp) / f"run{rank}", procs=procs)
    torch.save(params(state.model), Path(tmp) / f"params{rank}.pt")


def test_ddp_two_processes_agree_and_only_rank_0_writes(tmp_path: Path) -> None:
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    p0, p1 = torch.load(tmp_path / "params0.pt"), torch.load(tmp_path / "params1.pt")
    for a, b in zip(p0, p1, strict=True):
        assert torch.equal(a, b)
    assert (tmp_path / "run0" / "checkpoint.pt").exists() and not (tmp_path / "run1").exists()
    assert [r["step"] for r in training.read_metrics(tmp_path / "run0" / "metrics.jsonl")] == [2, 4]


@pytest.mark.parametrize("kind", ["estimate", "gradient"])
def test_records_say_what_the_loss_is(tmp_path: Path, kind: str) -> None:
    start(StandIn(), vector_data(), 4, tmp_path, loss_kind=kind)
    records = [r for r in training.read_metrics(tmp_path / "metrics.jsonl") if r["split"] == "train"]
    assert len(records) == 2 and all(r["logdet_mode"] == kind for r in records)
    if kind == "gradient":  # a surrogate: never bits/dim, never a log-p / log-det split
        assert all("surrogate_loss" in r and not {"loss", "bits_per_dim", "log_p", "logdet"} & set(r) for r in records)
        assert list(loop._loss_text(records[0])) == ["surrogate"]
    else:
        assert all(r["bits_per_dim"] == pytest.approx(r["loss"] / math.log(2)) for r in records)
        assert list(loop._loss_text(records[0])) == ["loss~", "bpd~", "log_p", "logdet~"]


def test_an_unknown_loss_kind_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"loss_kind expected one of exact, estimate, gradient, got 'surrogate'"):
        start(StandIn(), vector_data(), 2, tmp_path, loss_kind="surrogate")


class Steps(training.Monitor):
    """Counts steps and the penalties it saw, by interval."""

    name = "steps"

    def __init__(self) -> None:
        self.count, self.penalties = 0, 0.0

    def after_step(self, out) -> None:
        self.count += 1
        self.penalties += float(out.penalty)

    def record(self, procs) -> dict[str, float]:
        values = {"steps_seen": self.count, "penalties": self.penalties}
        self.count, self.penalties = 0, 0.0
        return values

    def state_dict(self) -> dict:
        return {"count": self.count, "penalties": self.penalties}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.penalties = state["count"], state["penalties"]


def test_monitors_are_recorded_and_resume_mid_interval(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data, options = vector_data(), dict(log_every=3, ckpt_every=0, penalty=lambda: torch.tensor(0.5))

    def records(run: str) -> list[tuple]:
        rows = training.read_metrics(tmp_path / run / "metrics.jsonl")
        return [(r["step"], r["steps_seen"], r["penalties"]) for r in rows if r["split"] == "train"]

    torch.manual_seed(1)
    start(StandIn(), data, 8, tmp_path / "a", monitors=[Steps()], **options)
    assert records("a") == [(3, 3, 1.5), (6, 3, 1.5), (8, 2, 1.0)]
    step, calls = loop.train_step, []

    def interrupted_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            os.kill(os.getpid(), signal.SIGINT)  # the loop checkpoints after step 4, one step into an interval
        return step(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", interrupted_step)
    torch.manual_seed(1)
    _, outcome = start(StandIn(), data, 8, tmp_path / "b", monitors=[Steps()], **options)
    monkeypatch.setattr(loop, "train_step", step)
    start(StandIn(), data, 8, tmp_path / "b", monitors=[Steps()], start_from=tmp_path / "b" / "checkpoint.pt",
          **options)
    assert outcome == "interrupted" and records("b") == records("a")
