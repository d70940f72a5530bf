"""Training batches: shuffled by ``(seed, epoch)``, sharded by rank, resumable mid-epoch.

Image data arrive in level units and are dequantized here (``x + u``), the models'
convention; a batch is ``(x, context)`` with ``context`` the rows' context or ``None``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from ..metrics import dequantize
from .processes import Processes

__all__ = [
    "check_finite", "Batch", "EpochBatches", "make_train_loader", "train_batches", "augmented", "dequantize_levels",
]


def check_finite(data: Tensor, what: str) -> None:
    """Raises ``ValueError`` naming the first rows of ``data`` that hold NaN or inf (one host sync)."""
    bad = ~torch.isfinite(data.flatten(1).float()).all(1)
    if bool(bad.any()):
        rows = bad.nonzero().flatten()[:5].tolist()
        raise ValueError(f"{what} expected finite values, got NaN or inf in rows {rows} (first 5 shown)")


Batch = tuple[Tensor, Tensor | None]  # (x, context): a batch of data and its context rows, or None


class _Rows(Dataset):
    """A tensor's rows and their context rows, indexed a whole batch at a time, so a loader
    yields one :data:`Batch` per index list."""

    def __init__(self, data: Tensor, context: Tensor | None = None) -> None:
        if context is not None and len(context) != len(data):
            raise ValueError(f"context expected one row per sample ({len(data)}), got {len(context)} rows")
        self.data, self.context = data, context

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: list[int]) -> Batch:
        return self.data[index], None if self.context is None else self.context[index]


class EpochBatches(Sampler[list[int]]):
    """Index batches of one epoch: shuffled by ``(seed, epoch)``, sharded by rank, full batches only.

    ``set_epoch(epoch, start)`` begins that epoch at batch ``start``, so a resumed run sees
    the batches an uninterrupted run would have seen.
    """

    def __init__(self, size: int, batch_size: int, seed: int, procs: Processes) -> None:
        self.batch_size = batch_size
        self._sampler = DistributedSampler(
            range(size), num_replicas=procs.world_size, rank=procs.rank, shuffle=True, seed=seed, drop_last=True
        )
        if len(self) == 0:
            raise ValueError(
                f"batch_size expected at most the {len(self._sampler)} training samples of each of the "
                f"{procs.world_size} process(es), got {batch_size}"
            )
        self._start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self._sampler.set_epoch(epoch)
        self._start = start

    def __len__(self) -> int:
        return len(self._sampler) // self.batch_size

    def __iter__(self) -> Iterator[list[int]]:
        indices = list(self._sampler)
        for b in range(self._start, len(self)):
            yield indices[b * self.batch_size : (b + 1) * self.batch_size]


def make_train_loader(
    data: Tensor, batch_size: int, seed: int, procs: Processes, pin_memory: bool = False,
    context: Tensor | None = None,
) -> DataLoader:
    """A loader of shuffled training batches ``(x, context)`` for this process's shard of ``data``
    (``context``: one row per sample, e.g. one-hot labels, or ``None``)."""
    sampler = EpochBatches(len(data), batch_size, seed, procs)
    # Its own generator: otherwise each new iterator draws a seed from the global RNG,
    # which would make a resumed run's noise differ from an uninterrupted one's.
    return DataLoader(_Rows(data, context), sampler=sampler, batch_size=None, pin_memory=pin_memory,
                      generator=torch.Generator())


def train_batches(
    loader: DataLoader, start_step: int, device: torch.device, dtype: torch.dtype, num_levels: int | None
) -> Iterator[Batch]:
    """Endless batches ``(x, context)`` from step ``start_step`` on, on ``device`` in ``dtype``,
    ``x`` dequantized for image data."""
    sampler: EpochBatches = loader.sampler
    epoch, start = divmod(start_step, len(sampler))
    while True:
        sampler.set_epoch(epoch, start)
        for x, context in loader:
            x = x.to(device=device, dtype=dtype, non_blocking=True)
            if context is not None:
                context = context.to(device=device, dtype=dtype, non_blocking=True)
            yield (x if num_levels is None else dequantize_levels(x, num_levels)), context
        epoch, start = epoch + 1, 0


def augmented(batches: Iterator[Batch], augment: Callable[[Tensor, Tensor | None], Batch] | None) -> Iterator[Batch]:
    """``batches`` through a model's training augmentation ``augment(x, context) -> (x, context)``
    (TarFlow's noise and context dropout), after dequantization; ``batches`` itself without one.

    Example:
        >>> batches = iter([(torch.zeros(2, 1), None)])
        >>> next(augmented(batches, lambda x, context: (x + 1, context)))
        (tensor([[1.],
                [1.]]), None)
    """
    if augment is None:
        yield from batches
        return
    for x, context in batches:
        yield augment(x, context)


def dequantize_levels(x: Tensor, num_levels: int, generator: torch.Generator | None = None) -> Tensor:
    """``x + u``, ``u ~ U[0, 1)``: dequantized levels in level units, ``[0, K)`` (the models' convention)."""
    return dequantize(x, num_levels, generator=generator) * num_levels
