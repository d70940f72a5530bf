"""Data sets for density estimation: a registry of loaders, each returning one split in memory.

``load_dataset(name, data_dir, split)`` looks ``name`` up in ``DATASETS`` and returns a
:class:`DataSplit`. Sets drawn from a known density (the 2D toys, ``mixture10d``) carry
it as ``DataSplit.density``, so a run can report its KL gap.

Example:
    >>> load_dataset("two_moons", split="test", num_samples=100).shape
    (2,)
"""

from __future__ import annotations

# The split container and what loaders are asked (the leaf every other module imports)
from .split import DEFAULT_DATA_DIR, SPLITS, DataRequest, DataSplit, Loader, check_split, keep_first, one_hot

# Densities known exactly
from .known import KnownDensity
from .toy import TOY_DENSITIES, Checkerboard, EightGaussians, Rings, TwoMoons
from .mixture import GaussianMixture

# Loaders and the registry
from .images import load_cifar10, load_digits, load_mnist
from .tabular import load_tabular, load_vectors, vectors_loader
from .registry import DATASETS, load_dataset

__all__ = [
    "DataSplit", "DataRequest", "Loader", "SPLITS", "DEFAULT_DATA_DIR", "one_hot", "check_split", "keep_first",
    "KnownDensity", "Checkerboard", "EightGaussians", "Rings", "TwoMoons", "TOY_DENSITIES", "GaussianMixture",
    "load_digits", "load_mnist", "load_cifar10", "load_tabular", "load_vectors", "vectors_loader",
    "DATASETS", "load_dataset",
]
