"""The data-set registry: ``DATASETS`` maps a name to a loader, ``load_dataset`` calls it.

``DATASETS`` is a plain dict from a name to a loader ``(DataRequest) -> DataSplit``;
adding a set is one entry. The sets: the toy 2D densities (:mod:`models.data.toy`), the
images (:mod:`models.data.images`), and the tabular sets with the 10-D mixture
(:mod:`models.data.tabular`, :mod:`models.data.mixture`).
"""

from __future__ import annotations

import os
from pathlib import Path

from .images import IMAGES
from .split import DEFAULT_DATA_DIR, DataRequest, DataSplit, Loader, check_split
from .tabular import TABULAR, vectors_loader
from .toy import TOY

__all__ = ["DATASETS", "load_dataset"]

FILE_SUFFIXES = (".npy", ".csv")  # a name ending so is the path of a file of vectors

DATASETS: dict[str, Loader] = {
    **TOY,  # checkerboard, eight_gaussians, rings, two_moons
    **IMAGES,  # digits, mnist, cifar10
    **TABULAR,  # power, gas, hepmass, miniboone, bsds300, mixture10d
}


def load_dataset(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    split: str = "train",
    *,
    download: bool = False,
    num_samples: int | None = None,
    seed: int = 0,
) -> DataSplit:
    """Loads one split of the data set registered as ``name`` in ``DATASETS``, or of a file of vectors.

    Args:
        name: a key of ``DATASETS``, or the path of a ``.npy`` or ``.csv`` file of vectors ``(N, D)``
            (see :func:`~models.data.tabular.load_vectors`: rows shuffled by ``seed``, the last
            10% test, the last 10% of the rest validation, standardized by train).
        data_dir: directory of downloadable sets; ``DEFAULT_DATA_DIR`` (``./data``) if None.
        split: ``"train"``, ``"validation"`` (the tabular sets and mixture10d) or ``"test"``.
        download: fetch missing MNIST / CIFAR-10 files, verifying their checksums.
        num_samples: sets drawn from a known density: the sample size (default 50,000
            train, 10,000 test); other sets: keep only the first ``num_samples`` (default: all).
        seed: seed of the sample of a set drawn from a known density, or of a file's shuffle.

    Returns:
        The :class:`~models.data.split.DataSplit`.

    Example:
        >>> split = load_dataset("digits", split="test")
        >>> split.data.shape, split.num_levels
        (torch.Size([300, 1, 8, 8]), 17)
    """
    is_file = str(name).endswith(FILE_SUFFIXES)
    if name not in DATASETS and not is_file:
        raise ValueError(f"unknown data set {name!r}; expected one of {', '.join(DATASETS)}, or a .npy or .csv file")
    check_split(split, name)
    if num_samples is not None and (type(num_samples) is not int or num_samples < 1):
        raise ValueError(f"num_samples: expected a positive integer or None, got {num_samples!r}")
    directory = DEFAULT_DATA_DIR if data_dir is None else Path(data_dir)
    request = DataRequest(split, directory, download, num_samples, seed)
    return (vectors_loader(name) if is_file else DATASETS[name])(request)
