"""Test likelihood of a model: negative log-likelihood per dimension with its standard error.

:func:`evaluating` is the one way to switch a model to eval mode for a while: the model
goes back to its previous mode when the block ends, also when it raises.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import repeat
from typing import Any

import torch
from torch import Tensor, nn

import flows

from ..metrics import bits_per_dim
from .batches import dequantize_levels
from .processes import Processes, all_reduce

__all__ = ["evaluating", "EvalResult", "evaluate", "kl_gap"]


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode inside the block; the model's previous mode after it, even if the block raises.

    Example:
        >>> model = torch.nn.Dropout()
        >>> with evaluating(model):
        ...     model.training
        False
        >>> model.training
        True
    """
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@dataclass(frozen=True)
class EvalResult:
    """Test negative log-likelihood per dimension, with the standard error of the mean, and
    the average log-likelihood per sample in nats (as the tabular papers report it).

    For a model with free-form log-dets, ``logdet_mode`` says how they were computed:
    ``"exact"``, or ``"estimate"``, averaged over ``passes`` independent passes, with
    ``estimator_stderr`` the standard error (bits/dim) of that average over the passes
    (``bits_per_dim_stderr`` is the spread over the test samples, as for every model).
    ``None`` for a model whose log-dets are exact by structure.
    """

    nats_per_dim: float
    bits_per_dim: float
    bits_per_dim_stderr: float
    count: int
    log_likelihood: float = math.nan
    log_likelihood_stderr: float = math.nan
    logdet_mode: str | None = None
    passes: int = 1
    estimator_stderr: float = math.nan

    def as_dict(self) -> dict[str, float | int | str]:
        values = {"nats_per_dim": self.nats_per_dim, "bits_per_dim": self.bits_per_dim,
                  "bits_per_dim_stderr": self.bits_per_dim_stderr, "count": self.count,
                  "log_likelihood": self.log_likelihood, "log_likelihood_stderr": self.log_likelihood_stderr}
        if self.logdet_mode == "estimate":
            values |= {"logdet_mode": "estimate", "passes": self.passes,
                       "bits_per_dim_estimator_stderr": self.estimator_stderr}
        elif self.logdet_mode is not None:
            values["logdet_mode"] = self.logdet_mode
        return values

    def __str__(self) -> str:
        text = (f"{self.bits_per_dim:.4f} ± {self.bits_per_dim_stderr:.4f} bits/dim "
                f"({self.nats_per_dim:.4f} nats/dim, {self.count} samples); average log-likelihood "
                f"{self.log_likelihood:.4f} ± {self.log_likelihood_stderr:.4f} nats per sample")
        if self.logdet_mode == "estimate":
            return (text + f"; log-dets estimated: the mean of {self.passes} passes, ± {self.estimator_stderr:.4f} "
                           "bits/dim over the passes")
        return text + ("; exact log-dets" if self.logdet_mode == "exact" else "")


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: Tensor,
    *,
    num_levels: int | None,
    batch_size: int,
    procs: Processes = Processes(),
    seed: int = 0,
    context: Tensor | None = None,
    logdet_mode: str | None = None,
    passes: int = 1,
) -> EvalResult:
    """Test NLL of ``data`` (given ``context``, one row per sample, if not ``None``) in eval
    mode, without gradients, sharded over the processes.

    Image data (``num_levels`` not ``None``) are dequantized with noise from a generator
    seeded by ``seed`` (and the rank), so the number is reproducible and the global RNG is
    untouched. ``logdet_mode`` (``"exact"`` or ``"estimate"``) puts a model's free-form
    layers in that mode for the evaluation (``None``: the model as it is, for structured
    log-dets). Estimates are averaged over ``passes`` passes over the data, each with the
    same dequantization and fresh estimator draws from a generator seeded by ``seed``; the
    standard error over the passes is the estimator's (one batch shares some draws, so
    only whole passes are independent).
    """
    if logdet_mode not in (None, "exact", "estimate"):
        raise ValueError(f"evaluate expected logdet_mode None, 'exact' or 'estimate', got {logdet_mode!r}")
    device = next(model.parameters()).device
    if logdet_mode is None:
        return _result([nll[None] for nll in _test_nll(model, data, num_levels, batch_size, procs, seed, context)],
                       data, procs, None, device)
    if logdet_mode == "exact":
        passes = 1
    elif passes < 2:
        raise ValueError(f"evaluate expected passes >= 2 to estimate a standard error over them, got {passes}")
    devices = [device] if device.type == "cuda" else []
    with flows.logdet_mode(model, logdet_mode), torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed * 1_000_003 + procs.rank + 1)  # the estimators' draws
        runs = [_test_nll(model, data, num_levels, batch_size, procs, seed, context) for _ in range(passes)]
    return _result([torch.stack(batch) for batch in zip(*runs)], data, procs, logdet_mode, device)


def _test_nll(model: nn.Module, data: Tensor, num_levels: int | None, batch_size: int, procs: Processes, seed: int,
              context: Tensor | None) -> list[Tensor]:
    """Negative log-likelihoods (nats, float64) of the samples of this process's shard, batch by batch."""
    param = next(model.parameters())
    generator = torch.Generator(param.device).manual_seed(seed * 1_000_003 + procs.rank)
    shard = slice(procs.rank, None, procs.world_size)
    contexts = repeat(None) if context is None else context[shard].split(batch_size)
    parts = []
    with evaluating(model):
        for chunk, ctx in zip(data[shard].split(batch_size), contexts):
            x = chunk.to(device=param.device, dtype=param.dtype)
            if num_levels is not None:
                x = dequantize_levels(x, num_levels, generator)
            if ctx is not None:
                ctx = ctx.to(device=param.device, dtype=param.dtype)
            parts.append(-model.log_prob(x, ctx).double())  # nats per sample
    return parts


def _result(batches: list[Tensor], data: Tensor, procs: Processes, logdet_mode: str | None,
            device: torch.device) -> EvalResult:
    """The result from the NLLs of each batch, ``(passes, batch)`` each: per sample, their mean over the passes."""
    passes = len(batches[0]) if batches else 1
    sums = torch.zeros(3 + passes, dtype=torch.float64, device=device)  # count, sum, sum of squares; each pass's sum
    for nll in batches:
        per_sample = nll.mean(0)
        sums += torch.cat([torch.stack([torch.ones_like(per_sample).sum(), per_sample.sum(), per_sample.pow(2).sum()]),
                           nll.sum(1)])
    count, total, squares, *pass_totals = all_reduce(sums, procs).tolist()
    dims = math.prod(data.shape[1:])
    mean = total / count
    variance = max(squares / count - mean**2, 0.0) * count / max(count - 1, 1)  # Bessel-corrected
    stderr = math.sqrt(variance / count)
    # The estimator's standard error: the spread of the passes' test NLLs, over sqrt(passes).
    estimator = torch.tensor(pass_totals).div(count).std().item() / math.sqrt(passes) if passes > 1 else math.nan
    return EvalResult(mean / dims, bits_per_dim(mean, dims), bits_per_dim(stderr, dims), int(count), -mean, stderr,
                      logdet_mode, passes, bits_per_dim(estimator, dims))


def kl_gap(result: EvalResult, density: Any, dims: int, conditional: bool = False) -> tuple[dict[str, float], str]:
    """On data of known ``density``: the test NLL minus the true entropy is the KL gap, KL(p || model)
    per dim (given the class, ``H(X | class)`` is the floor and the gap is the expected KL per class).

    Returns the values for the test record and a line for the user.
    """
    entropy, stderr = density.conditional_entropy() if conditional else density.entropy()
    gap = result.nats_per_dim - entropy / dims
    what = "H(X | class)" if conditional else "entropy"
    return ({"entropy_per_dim": entropy / dims, "kl_gap_per_dim": gap},
            f"true density: {entropy / dims:.4f} ± {stderr / dims:.4f} nats/dim ({what}), the best a model can "
            f"reach; KL gap {gap:.4f} nats/dim")
