"""The training loop behind ``train.py``: :func:`fit`, as small named functions.

:func:`fit` runs :func:`~models.training.step.train_step` over an endless stream of
batches, logs averages as JSON lines (:mod:`models.training.metrics_log`), evaluates,
and writes checkpoints (:mod:`models.training.checkpoints`: one dict with everything a
resumed run needs, written atomically, so that ``N`` steps and ``N/2 + resume + N/2``
give the same parameters). Non-finite values and stop signals are watched as
:mod:`models.training.stopping` describes (``nonfinite="skip"`` checks on the host
every step, since it has to decide whether to update).

Distributed: data are sharded by rank, gradients are averaged by
``DistributedDataParallel``, and only rank 0 writes files or shows a progress bar.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..metrics import bits_per_dim
from .batches import Batch
from .checkpoints import checkpoint_payload, save_checkpoint
from .evaluation import EvalResult
from .metrics_log import MetricsLog
from .processes import Processes, all_reduce
from .state import RunDir, TrainState
from .step import StepOutput, apply_update, train_step
from .stopping import NonFiniteWatch, StopSignals

__all__ = ["LOSS_KINDS", "LoopSettings", "fit"]

LOSS_KINDS = ("exact", "estimate", "gradient")


@dataclass
class LoopSettings:
    """The knobs of :func:`fit`."""

    steps: int  # stop after this many optimization steps in all
    log_every: int = 50  # steps between metric records (and non-finite checks)
    ckpt_every: int = 500  # steps between checkpoints (0: only at the end)
    eval_every: int = 0  # steps between test evaluations (0: none during training)
    clip: float = 0.0  # gradient-norm clip (0: none)
    amp: str = "none"  # autocast dtype: none, bf16, fp16
    nonfinite: str = "stop"  # on a non-finite loss: "stop" with an error, or "skip" the batch
    progress: bool = True  # show a tqdm bar (rank 0)
    loss_kind: str = "exact"  # the loss is the NLL ("exact"), an unbiased "estimate" of it, or a "gradient" surrogate


@dataclass
class _Loop:
    """What one call of :func:`fit` shares between its helpers."""

    state: TrainState
    settings: LoopSettings
    procs: Processes
    run: RunDir
    log: MetricsLog
    watch: NonFiniteWatch
    evaluator: Callable[[], EvalResult] | None
    bar: tqdm
    penalty: Callable[[], Tensor | None] | None = None  # a term added to the loss for its gradient (RNODE's)
    clock: float = field(default_factory=time.perf_counter)  # start of the current timing interval
    clock_step: int = 0  # the step at ``clock``
    batch_size: int = 0  # samples per step over all processes


def fit(
    state: TrainState,
    net: nn.Module,
    batches: Iterator[Batch],
    settings: LoopSettings,
    procs: Processes,
    run: RunDir,
    evaluator: Callable[[], EvalResult] | None = None,
    penalty: Callable[[], Tensor | None] | None = None,
) -> str:
    """Trains ``state`` up to ``settings.steps``; returns ``"done"``, or after a checkpoint ``"interrupted"``
    (SIGINT) or ``"terminated"`` (SIGTERM).

    Writes a metrics record every ``log_every`` steps, evaluates every ``eval_every``,
    and checkpoints every ``ckpt_every`` steps, at the end, and when SIGINT / SIGTERM
    arrives. A non-finite loss raises ``FloatingPointError`` naming the step and the last
    good checkpoint (left untouched), or with ``nonfinite="skip"`` skips the update.
    ``penalty`` (see :func:`~models.training.step.train_step`) is added to every step's
    loss; ``state.monitors`` add their values to each record.
    """
    if settings.loss_kind not in LOSS_KINDS:
        raise ValueError(f"loss_kind expected one of {', '.join(LOSS_KINDS)}, got {settings.loss_kind!r}")
    if settings.nonfinite not in ("stop", "skip"):
        raise ValueError(f"nonfinite expected 'stop' or 'skip', got {settings.nonfinite!r}")
    device = next(state.model.parameters()).device
    if procs.is_main:
        run.root.mkdir(parents=True, exist_ok=True)
    if state.sums is None:
        state.sums = torch.zeros(4, dtype=torch.float64, device=device)
    bar = tqdm(total=settings.steps, initial=state.step, disable=not (procs.is_main and settings.progress),
               dynamic_ncols=True, unit="step")
    loop = _Loop(state, settings, procs, run, MetricsLog(run.metrics if procs.is_main else None),
                 NonFiniteWatch(device), evaluator, bar, penalty=penalty, clock_step=state.step)
    with StopSignals() as stop, bar:
        while state.step < settings.steps:
            x, context = next(batches)
            loop.batch_size = len(x) * procs.world_size
            _one_step(loop, net, x, context)
            bar.update(1)
            sync = state.step % settings.log_every == 0 or state.step == settings.steps
            if sync:
                _log(loop)
            # The last step's evaluation is the caller's (it reports it).
            due = settings.eval_every and state.step % settings.eval_every == 0 and state.step < settings.steps
            if evaluator and due:
                _log_eval(loop, evaluator())
            if stop.requested(procs, sync):
                _checkpoint(loop)
                return "terminated" if stop.signum == signal.SIGTERM else "interrupted"
            if settings.ckpt_every and state.step % settings.ckpt_every == 0:
                _checkpoint(loop)
    if state.last_checkpoint is None or state.last_checkpoint[1] != state.step:
        _checkpoint(loop)
    return "done"


def _one_step(loop: _Loop, net: nn.Module, x: Tensor, context: Tensor | None) -> None:
    """One step: gradients, the non-finite watch, the update (or a skip), the schedule."""
    state, settings = loop.state, loop.settings
    out = train_step(net, x, state.optimizer, state.scaler, settings.amp, settings.clip, context, loop.penalty)
    for monitor in state.monitors:
        monitor.after_step(out)
    skip_mode = settings.nonfinite == "skip"
    loop.watch.observe(state.step, x, out, loss=not skip_mode)
    if skip_mode and not _finite_on_all_ranks(loop, x, out):
        state.skipped += 1
    else:
        apply_update(state.optimizer, state.scaler)
        state.sums += out.stacked().to(state.sums.dtype)
        state.count += 1
    state.scheduler.step()
    state.step += 1


def _finite_on_all_ranks(loop: _Loop, x: Tensor, out: StepOutput) -> bool:
    """Skip mode's check, on the host every step: raises for a bad batch; is the loss (and gradient) finite?

    Under fp16, inf gradients are the scaler's business (it skips those updates itself).
    """
    checks = [torch.isfinite(x).all(), torch.isfinite(out.loss)]
    if loop.settings.amp != "fp16":
        checks.append(torch.isfinite(out.grad_norm))
    finite = all_reduce(torch.stack(checks).to(torch.float32), loop.procs, dist.ReduceOp.MIN).tolist()
    if not finite[0]:
        loop.watch.raise_if_seen(loop.procs, loop.state.describe_last_checkpoint())
    return all(finite)


def _log(loop: _Loop) -> None:
    """A metrics record and the bar's text from the sums since the last one (a host sync)."""
    state = loop.state
    loop.watch.raise_if_seen(loop.procs, state.describe_last_checkpoint())
    sums = all_reduce(state.sums.clone(), loop.procs) / loop.procs.world_size
    loss, log_p, logdet, grad_norm = (sums / max(state.count, 1)).tolist()
    now = time.perf_counter()
    record = {
        "split": "train", "step": state.step, **_loss_values(loop.settings.loss_kind, loss, log_p, logdet),
        "grad_norm": grad_norm, "lr": state.scheduler.get_last_lr()[0], "skipped": state.skipped,
        "images_per_sec": loop.batch_size * (state.step - loop.clock_step) / max(now - loop.clock, 1e-9),
    }
    text = _loss_text(record) | {"lr": f"{record['lr']:.2e}"}
    for monitor in state.monitors:
        values = monitor.record(loop.procs)
        record.update(values)
        text.update(monitor.postfix(values))
    loop.log.write(record)
    loop.bar.set_postfix(text, refresh=False)
    state.sums.zero_()
    state.count = 0
    _restart_clock(loop)


def _loss_values(kind: str, loss: float, log_p: float, logdet: float) -> dict[str, float | str]:
    """The loss of a record: the NLL with bits/dim and its log-p / log-det split, labelled as an
    estimate when it is one; a gradient-only surrogate as ``surrogate_loss`` alone."""
    if kind == "gradient":  # its value is no likelihood: no bits/dim, no split
        return {"surrogate_loss": loss, "logdet_mode": kind}
    values = {"loss": loss, "bits_per_dim": bits_per_dim(loss, num_dims=1),  # the loss is already per dimension
              "log_p": log_p, "logdet": logdet}
    return values if kind == "exact" else values | {"logdet_mode": kind}


def _loss_text(record: dict[str, float | str]) -> dict[str, str]:
    if "surrogate_loss" in record:
        return {"surrogate": f"{record['surrogate_loss']:.4f}"}
    est = "~" if "logdet_mode" in record else ""  # ~: an estimate
    return {"loss" + est: f"{record['loss']:.4f}", "bpd" + est: f"{record['bits_per_dim']:.4f}",
            "log_p": f"{record['log_p']:.3f}", "logdet" + est: f"{record['logdet']:.3f}"}


def _restart_clock(loop: _Loop) -> None:
    """Starts a new throughput interval (evaluations and checkpoints are not training time)."""
    loop.clock, loop.clock_step = time.perf_counter(), loop.state.step


def _log_eval(loop: _Loop, result: EvalResult) -> None:
    loop.log.write({"split": "test", "step": loop.state.step, **result.as_dict()})
    if loop.procs.is_main and loop.settings.progress:
        loop.bar.write(f"step {loop.state.step}: test {result}")
    _restart_clock(loop)


def _checkpoint(loop: _Loop) -> None:
    """Checks for non-finite values, then writes the checkpoint (rank 0) atomically."""
    state = loop.state
    loop.watch.raise_if_seen(loop.procs, state.describe_last_checkpoint())
    payload = checkpoint_payload(state, loop.procs)
    if loop.procs.is_main:
        save_checkpoint(payload, loop.run.checkpoint, after=state.describe_last_checkpoint())
    state.last_checkpoint = (str(loop.run.checkpoint), state.step)
    _restart_clock(loop)
