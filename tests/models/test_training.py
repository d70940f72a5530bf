"""Tests of models/training.py on tiny stand-in models built from flows layers."""

from __future__ import annotations

import math
import os
import socket
from functools import partial
from itertools import chain
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import flows
from flows.nets import MLP, GlowConvNet
from models import checkpoints, metrics_log, plots, training
from models.metrics import nats_mean_and_stderr
from models.training import LoopSettings, Processes, RunDir, TrainState


class StandIn(flows.FlowDistribution):
    """A small density model with the DensityModel face (name, config, in_shape, num_levels)."""

    name = "standin"

    def __init__(self, in_shape: tuple[int, ...] = (4,), num_levels: int | None = None, hidden: int = 8,
                 context_features: int = 0) -> None:
        if len(in_shape) == 3:
            c = in_shape[0]
            net = partial(GlowConvNet, hidden_features=hidden)
            layers = [flows.ScalarAffine(1 / num_levels, -0.5), flows.ActNorm(c), flows.Squeeze(),
                      flows.AffineCoupling(4 * c, net, context_features=context_features), flows.Inverse(flows.Squeeze())]
        else:
            d, net = in_shape[0], partial(MLP, hidden_features=hidden)
            layers = [flows.ActNorm(d), flows.AffineCoupling(d, net, context_features=context_features), flows.Reverse(),
                      flows.AffineCoupling(d, net, context_features=context_features)]
        super().__init__(flows.Sequential(*layers), flows.StandardNormal(in_shape))
        self.in_shape, self.num_levels = tuple(in_shape), num_levels
        self.config = dict(in_shape=tuple(in_shape), num_levels=num_levels, hidden=hidden,
                           context_features=context_features)


class NaNAt(StandIn):
    """A stand-in whose log-density is NaN on the training forwards numbered in ``bad`` (0-based)."""

    def __init__(self, bad: set[int], **kwargs) -> None:
        super().__init__(**kwargs)
        self.bad, self.calls = bad, 0

    def log_prob_parts(self, x, context=None):
        log_p, logdet = super().log_prob_parts(x, context)
        if self.training and torch.is_grad_enabled():
            if self.calls in self.bad:
                log_p = log_p * math.nan
            self.calls += 1
        return log_p, logdet


def vector_data(n: int = 64) -> torch.Tensor:
    return torch.randn(n, 4) * torch.tensor([1.0, 2.0, 0.5, 1.0]) + 1


def start(model, data, steps, run_dir, procs=Processes(), num_levels=None, start_from=None, evaluator=None,
          context=None, **settings):
    """Builds the state and runs fit; with ``start_from`` a checkpoint path, resumes from it."""
    state = TrainState(
        model, training.build_optimizer(model, 1e-2), None, training.make_scaler("none", torch.device("cpu")), {}
    )
    state.scheduler = training.build_scheduler(state.optimizer, warmup=3, total=steps)
    if start_from is not None:
        checkpoints.restore(state, checkpoints.load_checkpoint(start_from), procs)
    loader = training.make_train_loader(data, 16, seed=0, procs=procs, context=context)
    batches = training.train_batches(loader, state.step, torch.device("cpu"), torch.get_default_dtype(), num_levels)
    first = next(batches)
    net = training.prepare_model(model, first, procs, torch.device("cpu"))
    options = dict(log_every=2, ckpt_every=4, progress=False) | settings
    outcome = training.fit(state, net, chain([first], batches), LoopSettings(steps, **options), procs, RunDir(run_dir),
                           evaluator)
    return state, outcome


def params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.state_dict().values()]


def test_fit_writes_metrics_and_checkpoint(tmp_path: Path) -> None:
    data = torch.randint(0, 17, (64, 1, 4, 4)).double()
    model = StandIn((1, 4, 4), num_levels=17)
    evaluator = partial(training.evaluate, model, data[:20], 17, batch_size=8)
    state, outcome = start(model, data, 6, tmp_path, num_levels=17, evaluator=evaluator, eval_every=3)
    records = metrics_log.read_metrics(tmp_path / "metrics.jsonl")
    assert outcome == "done" and state.step == 6
    assert [r["step"] for r in records if r["split"] == "train"] == [2, 4, 6]
    assert [r["step"] for r in records if r["split"] == "test"] == [3]
    assert all(math.isfinite(r["bits_per_dim"]) for r in records)
    payload = checkpoints.load_checkpoint(tmp_path / "checkpoint.pt")
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
        rows = metrics_log.read_metrics(tmp_path / run / "metrics.jsonl")
        return [(r["step"], r["loss"], r["log_p"], r["logdet"], r["lr"]) for r in rows]

    assert losses("a") == losses("b")


def test_nan_loss_stops_naming_the_step_and_the_last_good_checkpoint(tmp_path: Path) -> None:
    model = NaNAt({5})
    message = r"NaN or inf at step 5\. Last good checkpoint: .*checkpoint\.pt \(step 4\)"
    with pytest.raises(FloatingPointError, match=message):
        start(model, vector_data(), 8, tmp_path)
    payload = checkpoints.load_checkpoint(tmp_path / "checkpoint.pt")
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
    assert metrics_log.read_metrics(tmp_path / "metrics.jsonl")[-1]["skipped"] == 2


def test_a_batch_with_nan_raises(tmp_path: Path) -> None:
    data = vector_data()
    data[3, 1] = math.inf
    with pytest.raises(ValueError, match=r"expected finite values, got NaN or inf in rows \[3\]"):
        training.check_finite(data, "digits training data")
    message = r"training batch expected finite values, got NaN or inf in the batch of step \d"
    with pytest.raises(ValueError, match=message):
        start(StandIn(), data, 8, tmp_path, log_every=1)


def test_check_compatible_rejects_another_model(tmp_path: Path) -> None:
    state, _ = start(StandIn(hidden=8), vector_data(), 2, tmp_path)
    payload = checkpoints.load_checkpoint(tmp_path / "checkpoint.pt")
    checkpoints.check_compatible(payload, StandIn(hidden=8), "c.pt")
    message = (r"resume expected a checkpoint of the model being built \(standin with \{'hidden': 16\}\), "
               r"got standin with \{'hidden': 8\}")
    with pytest.raises(ValueError, match=message):
        checkpoints.check_compatible(payload, StandIn(hidden=16), "c.pt")


def test_lr_schedule_warms_up_linearly_then_holds_or_decays() -> None:
    factor = partial(training.lr_factor, warmup=4, total=12)
    assert [factor(s, schedule="constant") for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert factor(4, schedule="cosine") == 1.0 and factor(8, schedule="cosine") == pytest.approx(0.5)
    assert factor(12, schedule="cosine") == pytest.approx(0.0)
    with pytest.raises(ValueError, match="schedule expected 'constant' or 'cosine', got 'linear'"):
        training.build_scheduler(torch.optim.Adam([torch.zeros(1, requires_grad=True)]), 1, 2, "linear")


def test_evaluate_reports_mean_and_standard_error() -> None:
    model, data = StandIn().eval(), vector_data(50)
    result = training.evaluate(model, data, None, batch_size=16)
    mean, stderr = nats_mean_and_stderr(-model.log_prob(data).detach())
    assert result.count == 50
    assert result.nats_per_dim == pytest.approx(mean / 4, rel=1e-12)
    assert result.bits_per_dim == pytest.approx(mean / 4 / math.log(2), rel=1e-12)
    assert result.bits_per_dim_stderr == pytest.approx(stderr / 4 / math.log(2), rel=1e-9)


def test_batches_carry_the_context_rows_of_their_samples() -> None:
    data = vector_data(64)
    context = torch.nn.functional.one_hot(torch.arange(64) % 3, 3).double() * data[:, :1]  # row-specific
    loader = training.make_train_loader(data, 16, seed=0, procs=Processes(), context=context)
    batches = training.train_batches(loader, 0, torch.device("cpu"), torch.float64, None)
    seen = 0
    for _ in range(6):  # past the end of the first epoch
        x, ctx = next(batches)
        rows = [int(torch.nonzero((data == row).all(1))[0]) for row in x]
        assert torch.equal(ctx, context[rows])
        seen += len(x)
    assert seen == 96
    assert next(training.train_batches(training.make_train_loader(data, 16, 0, Processes()), 0,
                                       torch.device("cpu"), torch.float64, None))[1] is None
    with pytest.raises(ValueError, match=r"context expected one row per sample \(64\), got 10 rows"):
        training.make_train_loader(data, 16, 0, Processes(), context=context[:10])


def test_a_conditional_model_trains_and_evaluates_given_its_context(tmp_path: Path) -> None:
    labels = torch.arange(64) % 2
    data = vector_data(64) + 4.0 * labels[:, None]  # the class shifts the data
    context = torch.nn.functional.one_hot(labels, 2).double()
    model = StandIn(context_features=2)
    state, outcome = start(model, data, 6, tmp_path, context=context)
    assert outcome == "done" and state.step == 6
    model.eval()
    result = training.evaluate(model, data, None, batch_size=16, context=context)
    mean, _ = nats_mean_and_stderr(-model.log_prob(data, context).detach())
    assert result.nats_per_dim == pytest.approx(mean / 4, rel=1e-12)
    swapped = training.evaluate(model, data, None, batch_size=16, context=context.flip(1))
    assert swapped.nats_per_dim != result.nats_per_dim  # the context is used, not ignored
    with pytest.raises(ValueError, match=r"AffineCoupling was built with context_features=2 but got context=None"):
        training.evaluate(model, data, None, batch_size=16)


def test_amp_bf16_step_keeps_a_float32_loss() -> None:
    model = StandIn().float()
    x = vector_data(16).float()
    optimizer = training.build_optimizer(model, 1e-3)
    scaler = training.make_scaler("bf16", x.device)
    out = training.train_step(training.LogProbParts(model), x, optimizer, scaler, "bf16", 1.0)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="amp expected one of"):
        training.autocast("fp8", x.device)


def test_pictures(tmp_path: Path) -> None:
    model = StandIn((2,))
    data = vector_data(100)[:, :2]
    plots.save_samples(model, tmp_path / "s.png", n=50, data=data)
    plots.save_density(model, tmp_path / "d.png", data, lambda g: -0.5 * g.pow(2).sum(1), resolution=20)
    plots.save_samples(StandIn((1, 4, 4), 17), tmp_path / "i.png", n=10)
    conditional = StandIn((2,), context_features=3)
    labels = torch.arange(100) % 3
    plots.save_samples(conditional, tmp_path / "cs.png", data=data, num_classes=3, labels=labels, points=90)
    plots.save_class_densities(conditional, tmp_path / "cd.png", data, 3,
                               lambda g, k: -0.5 * (g - k[:, None]).pow(2).sum(1), resolution=20)
    plots.save_samples(StandIn((1, 4, 4), 17, context_features=10), tmp_path / "ci.png", n=25, num_classes=10)
    records = [{"split": "train", "step": 1, "bits_per_dim": 2.0}, {"split": "test", "step": 1, "bits_per_dim": 2.1}]
    plots.save_loss_curve(records, tmp_path / "l.png")
    assert all((tmp_path / f).stat().st_size > 1000 for f in ("s.png", "d.png", "i.png", "l.png", "cs.png", "cd.png",
                                                              "ci.png"))


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
    assert [r["step"] for r in metrics_log.read_metrics(tmp_path / "run0" / "metrics.jsonl")] == [2, 4]


def test_evaluate_reports_the_average_log_likelihood_per_sample() -> None:
    """An identity flow on N(0, I): the log-likelihood is the Gaussian's, exactly."""
    import flows

    model = flows.FlowDistribution(flows.ScalarAffine(1.0), flows.StandardNormal(3))
    model.dummy = torch.nn.Parameter(torch.zeros(()))  # evaluate reads the device from a parameter
    data = torch.randn(40, 3)
    result = training.evaluate(model, data, None, batch_size=16)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(data).sum(1)
    assert abs(result.log_likelihood - float(expected.mean())) < 1e-9
    assert abs(result.log_likelihood_stderr - float(expected.std() / 40**0.5)) < 1e-9
    assert abs(result.nats_per_dim * 3 + result.log_likelihood) < 1e-9
