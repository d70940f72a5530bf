"""What every data set shares: the split container, the split names and the request type.

A loader takes a :class:`DataRequest` and returns a :class:`DataSplit`; ``models.data``
keeps them in a registry (``DATASETS``). This module is the leaf of ``models/data/``:
the loaders, the registry and the training kit import it, and it imports no loader.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .known import KnownDensity

__all__ = [
    "DataSplit", "DataRequest", "Loader", "SPLITS", "DEFAULT_DATA_DIR", "one_hot", "check_split", "keep_first",
]

SPLITS = ("train", "validation", "test")  # every split name a loader may be asked for
DEFAULT_DATA_DIR = Path("data")


@dataclass(frozen=True, eq=False)
class DataSplit:
    """One split of a data set, held in memory.

    Attributes:
        name: the registry name.
        data: ``(N, *shape)`` float32 samples; integer levels ``0..K-1`` for discrete sets.
        kind: ``"image"`` (``(C, H, W)`` levels), ``"toy2d"`` or ``"vector"`` (tabular).
        labels: ``(N,)`` int64 class labels in ``0..num_classes-1``, or ``None`` where the set has none.
        num_levels: ``K`` for discrete data, ``None`` for continuous data.
        density: the true density of a set drawn from a known density, else ``None``.
        num_classes: how many classes ``labels`` name, ``None`` without labels.

    Example:
        >>> split = DataSplit("points", torch.zeros(5, 3), "vector")
        >>> len(split), split.shape
        (5, (3,))
    """

    name: str
    data: Tensor
    kind: str
    labels: Tensor | None = None
    num_levels: int | None = None
    density: KnownDensity | None = None
    num_classes: int | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of one sample, e.g. ``(1, 8, 8)`` or ``(2,)``."""
        return tuple(self.data.shape[1:])

    def __len__(self) -> int:
        return self.data.shape[0]

    def class_context(self) -> Tensor:
        """The labels one-hot, ``(N, num_classes)`` float32: the context of a class-conditional model."""
        if self.labels is None or self.num_classes is None:
            raise ValueError(
                f"a class-conditional model expected a data set with class labels (the 2D toys, mixture10d, "
                f"digits, mnist, cifar10), got {self.name!r}, which has none"
            )
        return one_hot(self.labels, self.num_classes)


def one_hot(labels: Tensor, num_classes: int) -> Tensor:
    """``(N,)`` int64 labels as ``(N, num_classes)`` float32 one-hot rows.

    Example:
        >>> one_hot(torch.tensor([2, 0]), 3)
        tensor([[0., 0., 1.],
                [1., 0., 0.]])
    """
    return torch.nn.functional.one_hot(labels, num_classes).to(torch.float32)


@dataclass(frozen=True)
class DataRequest:
    """What ``load_dataset`` asks of a loader; each loader reads the fields it needs.

    Attributes:
        split: one of :data:`SPLITS`; a set without a validation split refuses ``"validation"``.
        data_dir: where downloadable sets live.
        download: fetch missing files (network) instead of raising.
        num_samples: sets drawn from a known density: sample size; other sets: keep the first ``num_samples``.
        seed: sets drawn from a known density: seed of the sample (each split has its own stream);
            files of vectors: seed of the shuffle.
    """

    split: str = "train"
    data_dir: Path = DEFAULT_DATA_DIR
    download: bool = False
    num_samples: int | None = None
    seed: int = 0


Loader = Callable[[DataRequest], DataSplit]


def check_split(split: str, name: str = "", available: tuple[str, ...] = SPLITS) -> None:
    """Raises ``ValueError`` unless ``split`` is a split name that data set ``name`` has.

    Example:
        >>> check_split("validation", "digits", ("train", "test"))
        Traceback (most recent call last):
        ...
        ValueError: split: expected one of ('train', 'test') for digits, got 'validation'; digits has no ...
    """
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    if split not in available:
        raise ValueError(
            f"split: expected one of {available} for {name}, got {split!r}; {name} has no {split} split"
        )


def keep_first(split: DataSplit, request: DataRequest) -> DataSplit:
    """``split`` cut to its first ``request.num_samples`` samples (labels too), if asked."""
    n = request.num_samples
    if n is None:
        return split
    if n > len(split):
        raise ValueError(f"num_samples: {split.name} {request.split} has {len(split)} samples, got {n}")
    labels = None if split.labels is None else split.labels[:n]
    return dataclasses.replace(split, data=split.data[:n], labels=labels)
