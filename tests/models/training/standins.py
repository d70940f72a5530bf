"""Tiny stand-in models built from flows layers, a helper that runs fit on them, and a stand-in for
another run holding a run folder's lock."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from functools import partial
from pathlib import Path
from itertools import chain

import torch

import flows
from flows.nets import MLP, GlowConvNet
from models import training
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
          context=None, monitors=(), penalty=None, **settings):
    """Builds the state and runs fit; with ``start_from`` a checkpoint path, resumes from it."""
    state = TrainState(
        model, training.build_optimizer(model, 1e-2), None, training.make_scaler("none", torch.device("cpu")), {},
        monitors=list(monitors),
    )
    state.scheduler = training.build_scheduler(state.optimizer, warmup=3, total=steps)
    if start_from is not None:
        training.restore(state, training.load_checkpoint(start_from), procs)
    loader = training.make_train_loader(data, 16, seed=0, procs=procs, context=context)
    batches = training.train_batches(loader, state.step, torch.device("cpu"), torch.get_default_dtype(), num_levels)
    first = next(batches)
    net = training.prepare_model(model, first, procs, torch.device("cpu"))
    options = dict(log_every=2, ckpt_every=4, progress=False) | settings
    outcome = training.fit(state, net, chain([first], batches), LoopSettings(steps, **options), procs, RunDir(run_dir),
                           evaluator, penalty)
    return state, outcome


def params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.state_dict().values()]


def hold_lock(path: Path) -> subprocess.Popen:
    """Another process holding ``path``'s flock (as a running train.py would); returns once it holds it."""
    code = textwrap.dedent(f"""
        import fcntl, os, sys
        fd = os.open({str(path)!r}, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0); os.write(fd, b"%d\\n" % os.getpid())
        print("holding", flush=True)
        sys.stdin.read()
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "holding"
    return holder
