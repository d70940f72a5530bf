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

import torch
from torch import Tensor, nn

from ..metrics import bits_per_dim
from .batches import dequantize_levels
from .processes import Processes, all_reduce

__all__ = ["evaluating", "EvalResult", "evaluate"]


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
    the average log-likelihood per sample in nats (as the tabular papers report it)."""

    nats_per_dim: float
    bits_per_dim: float
    bits_per_dim_stderr: float
    count: int
    log_likelihood: float = math.nan
    log_likelihood_stderr: float = math.nan

    def as_dict(self) -> dict[str, float | int]:
        return {"nats_per_dim": self.nats_per_dim, "bits_per_dim": self.bits_per_dim,
                "bits_per_dim_stderr": self.bits_per_dim_stderr, "count": self.count,
                "log_likelihood": self.log_likelihood, "log_likelihood_stderr": self.log_likelihood_stderr}

    def __str__(self) -> str:
        return (f"{self.bits_per_dim:.4f} ± {self.bits_per_dim_stderr:.4f} bits/dim "
                f"({self.nats_per_dim:.4f} nats/dim, {self.count} samples); average log-likelihood "
                f"{self.log_likelihood:.4f} ± {self.log_likelihood_stderr:.4f} nats per sample")


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
) -> EvalResult:
    """Test NLL of ``data`` (given ``context``, one row per sample, if not ``None``) in eval
    mode, without gradients, sharded over the processes.

    Image data (``num_levels`` not ``None``) are dequantized with noise from a generator
    seeded by ``seed`` (and the rank), so the number is reproducible and the global RNG is
    untouched.
    """
    param = next(model.parameters())
    generator = torch.Generator(param.device).manual_seed(seed * 1_000_003 + procs.rank)
    sums = torch.zeros(3, dtype=torch.float64, device=param.device)  # count, sum, sum of squares
    shard = slice(procs.rank, None, procs.world_size)
    contexts = repeat(None) if context is None else context[shard].split(batch_size)
    with evaluating(model):
        for chunk, ctx in zip(data[shard].split(batch_size), contexts):
            x = chunk.to(device=param.device, dtype=param.dtype)
            if num_levels is not None:
                x = dequantize_levels(x, num_levels, generator)
            if ctx is not None:
                ctx = ctx.to(device=param.device, dtype=param.dtype)
            nll = -model.log_prob(x, ctx).double()  # nats per sample
            sums += torch.stack([torch.ones_like(nll).sum(), nll.sum(), nll.pow(2).sum()])
    count, total, squares = all_reduce(sums, procs).tolist()
    dims = math.prod(data.shape[1:])
    mean = total / count
    variance = max(squares / count - mean**2, 0.0) * count / max(count - 1, 1)  # Bessel-corrected
    stderr = math.sqrt(variance / count)
    return EvalResult(mean / dims, bits_per_dim(mean, dims), bits_per_dim(stderr, dims), int(count), -mean, stderr)
