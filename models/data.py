"""Data sets for density estimation: a registry, toy 2D densities and image sets.

``load_dataset(name, ...)`` looks ``name`` up in ``DATASETS``, a plain dict from a name
to a loader ``(DataRequest) -> Dataset``; adding a set is one entry. The sets:

* toy 2D (``checkerboard``, ``eight_gaussians``, ``rings``, ``two_moons``, see
  :mod:`models.toy`): a fixed-seed sample of the true density, 50,000 points for
  ``train`` and 10,000 for ``test`` by default; ``Dataset.density`` is the density.
* ``digits``: the 8x8 UCI handwritten digits embedded in ``models/assets`` (17 levels,
  1497 train / 300 test, see ``models/assets/README.md``); works offline.
* ``mnist`` and ``cifar10``: read from ``data_dir`` in their distributed formats (MNIST's
  IDX gzip files in ``data_dir/mnist``; CIFAR-10's python batches in
  ``data_dir/cifar-10-batches-py``), downloaded there with ``download=True``.

Images come as float32 tensors ``(N, C, H, W)`` of the raw integer levels ``0..K-1``
with ``K = num_levels``; dequantise them with :func:`models.metrics.dequantize`.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import pickle
import shutil
import struct
import tarfile
import tempfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from models.tabular import TABULAR
from models.toy import TOY_DENSITIES, ToyDensity

__all__ = ["Dataset", "DataRequest", "DATASETS", "load_dataset", "one_hot", "DEFAULT_DATA_DIR"]

DEFAULT_DATA_DIR = Path("data")
ASSETS = Path(__file__).resolve().parent / "assets"
SPLITS = ("train", "test")
TOY_SIZES = {"train": 50_000, "test": 10_000}

MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"  # torchvision's mirror
MNIST_FILES = {  # name -> MD5 of the official files (as torchvision checks them)
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
MNIST_SPLITS = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_SPLITS = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}


@dataclass(frozen=True, eq=False)
class Dataset:
    """One split of a data set, held in memory.

    Attributes:
        name: the registry name.
        data: ``(N, *shape)`` float32 samples; integer levels ``0..K-1`` for discrete sets.
        kind: ``"image"`` (``(C, H, W)`` levels), ``"toy2d"`` or ``"vector"`` (tabular).
        labels: ``(N,)`` int64 class labels in ``0..num_classes-1``, or ``None`` where the set has none.
        num_levels: ``K`` for discrete data, ``None`` for continuous data.
        density: the true density of a toy set, else ``None``.
        num_classes: how many classes ``labels`` name, ``None`` without labels.
    """

    name: str
    data: Tensor
    kind: str
    labels: Tensor | None = None
    num_levels: int | None = None
    density: ToyDensity | None = None
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
    """``(N,)`` int64 labels as ``(N, num_classes)`` float32 one-hot rows."""
    return torch.nn.functional.one_hot(labels, num_classes).to(torch.float32)


@dataclass(frozen=True)
class DataRequest:
    """What ``load_dataset`` asks of a loader; each loader reads the fields it needs.

    Attributes:
        split: ``"train"`` or ``"test"``.
        data_dir: where downloadable sets live.
        download: fetch missing files (network) instead of raising.
        num_samples: toy sets: sample size; other sets: keep the first ``num_samples``.
        seed: toy sets: seed of the sample (train and test use different streams).
    """

    split: str = "train"
    data_dir: Path = DEFAULT_DATA_DIR
    download: bool = False
    num_samples: int | None = None
    seed: int = 0


Loader = Callable[[DataRequest], Dataset]


def load_dataset(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    split: str = "train",
    *,
    download: bool = False,
    num_samples: int | None = None,
    seed: int = 0,
) -> Dataset:
    """Loads one split of the data set registered as ``name`` in ``DATASETS``.

    Args:
        name: a key of ``DATASETS``.
        data_dir: directory of downloadable sets; ``DEFAULT_DATA_DIR`` (``./data``) if None.
        split: ``"train"`` or ``"test"``.
        download: fetch missing MNIST / CIFAR-10 files, verifying their checksums.
        num_samples: toy sets: the sample size (default 50,000 train, 10,000 test);
            other sets: keep only the first ``num_samples`` (default: all).
        seed: seed of a toy set's sample.

    Returns:
        The :class:`Dataset`.

    Example:
        >>> ds = load_dataset("digits", split="test")
        >>> ds.data.shape, ds.num_levels
        (torch.Size([300, 1, 8, 8]), 17)
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; expected one of {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
    if num_samples is not None and (type(num_samples) is not int or num_samples < 1):
        raise ValueError(f"num_samples: expected a positive integer or None, got {num_samples!r}")
    directory = DEFAULT_DATA_DIR if data_dir is None else Path(data_dir)
    request = DataRequest(split, directory, download, num_samples, seed)
    return DATASETS[name](request)


def _first(request: DataRequest, name: str, data: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Keeps the first ``request.num_samples`` samples, if asked."""
    n = request.num_samples
    if n is None:
        return data, labels
    if n > data.shape[0]:
        raise ValueError(
            f"num_samples: {name} {request.split} has {data.shape[0]} samples, got {n}"
        )
    return data[:n], labels[:n]


# --- toy 2D ------------------------------------------------------------------------


def _toy_loader(name: str) -> Loader:
    """The loader of toy set ``name``: a fixed-seed sample of its true density."""

    def load(request: DataRequest) -> Dataset:
        density = TOY_DENSITIES[name]()
        n = request.num_samples or TOY_SIZES[request.split]
        # One stream per (seed, split), so train and test never share points.
        stream = 2 * request.seed + SPLITS.index(request.split)
        generator = torch.Generator().manual_seed(stream)
        data, labels = density.sample_labelled(n, generator)  # drawn in float64
        return Dataset(name, data.to(torch.float32), "toy2d", labels=labels, density=density,
                       num_classes=density.num_classes)

    return load


# --- digits (embedded) -------------------------------------------------------------


def load_digits(request: DataRequest) -> Dataset:
    """The 8x8 UCI digits from ``models/assets/digits.npz``: 17 levels, (N, 1, 8, 8)."""
    with np.load(ASSETS / "digits.npz") as archive:
        images = torch.from_numpy(archive["images"])  # (1797, 8, 8) uint8
        labels = torch.from_numpy(archive["labels"])
        is_test = torch.zeros(images.shape[0], dtype=torch.bool)
        is_test[torch.from_numpy(archive["test_index"])] = True
    keep = is_test if request.split == "test" else ~is_test
    data, labels = _first(request, "digits", images[keep].unsqueeze(1).float(), labels[keep])
    return Dataset("digits", data, "image", labels=labels.long(), num_levels=17, num_classes=10)


# --- MNIST -------------------------------------------------------------------------


def read_idx(path: Path, magic: int) -> Tensor:
    """Reads a gzip-compressed IDX file of unsigned bytes (LeCun's MNIST format).

    Args:
        path: the ``.gz`` file.
        magic: the expected magic number, ``0x0803`` (2051) for images (3 dimensions)
            or ``0x0801`` (2049) for labels (1 dimension).

    Returns:
        A uint8 tensor of the shape the header gives.
    """
    with gzip.open(path, "rb") as stream:
        raw = stream.read()
    found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else f"a {len(raw)}-byte file"
    if found != magic:
        raise ValueError(f"{path}: expected IDX magic number {magic} (0x{magic:08x}), got {found}")
    ndim = magic & 0xFF  # the magic number's last byte
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: expected an IDX header of {header} bytes, got {len(raw)} bytes")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    size = int(np.prod(dims))
    if len(raw) != header + size:
        raise ValueError(
            f"{path}: expected {size} data bytes for shape {dims}, got {len(raw) - header}; "
            f"the file is truncated or corrupt"
        )
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).reshape(dims)


def load_mnist(request: DataRequest) -> Dataset:
    """MNIST from ``data_dir/mnist/*-ubyte.gz``: 256 levels, (N, 1, 28, 28)."""
    directory = request.data_dir / "mnist"
    names = MNIST_SPLITS[request.split]
    missing = [name for name in names if not (directory / name).is_file()]
    if missing and request.download:
        for name in missing:
            _download(MNIST_URL + name, directory / name, MNIST_FILES[name], "MNIST")
    elif missing:
        raise _missing_error("MNIST", directory, missing)
    images = read_idx(directory / names[0], IDX_IMAGES_MAGIC)
    labels = read_idx(directory / names[1], IDX_LABELS_MAGIC).long()
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"MNIST {request.split}: expected as many labels as images ({images.shape[0]}), "
            f"got {labels.shape[0]} in {directory / names[1]}"
        )
    data, labels = _first(request, "mnist", images[:, None].float(), labels)
    return Dataset("mnist", data, "image", labels=labels, num_levels=256, num_classes=10)


# --- CIFAR-10 ----------------------------------------------------------------------


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR batch holds (dicts, lists, strings, numpy arrays),
    so a tampered file cannot run code the way a plain ``pickle.load`` would."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR batch")
        return super().find_class(module, name)


def read_cifar_batch(path: Path) -> tuple[Tensor, Tensor]:
    """Reads one CIFAR-10 python batch: ``(N, 3, 32, 32)`` uint8 images, ``(N,)`` labels.

    Each row of the batch's ``data`` is 1024 red, then green, then blue values, each
    plane row-major, so a reshape to ``(N, 3, 32, 32)`` is the image.
    """
    with path.open("rb") as stream:
        # latin1 reads the original Python 2 pickles, whose numpy buffers are str.
        batch = _BatchUnpickler(stream, encoding="latin1").load()
    if not isinstance(batch, dict) or not {"data", "labels"} <= batch.keys():
        found = f"keys {sorted(map(str, batch))}" if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"{path}: expected a dict with 'data' and 'labels', got {found}")
    data = batch["data"]
    well_formed = isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
    if not well_formed or data.shape[1] != 3072:
        raise ValueError(
            f"{path}: expected 'data' as a uint8 array of shape (N, 3072), got "
            f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}"
        )
    if len(batch["labels"]) != data.shape[0]:
        raise ValueError(f"{path}: expected {data.shape[0]} labels, got {len(batch['labels'])}")
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())  # (N, 3, 32, 32)
    return images, torch.as_tensor(batch["labels"], dtype=torch.int64)


def load_cifar10(request: DataRequest) -> Dataset:
    """CIFAR-10 from ``data_dir/cifar-10-batches-py``: 256 levels, (N, 3, 32, 32)."""
    directory = request.data_dir / CIFAR10_FOLDER
    names = CIFAR10_SPLITS[request.split]
    missing = [name for name in names if not (directory / name).is_file()]
    if missing and request.download:
        _download_cifar10(request.data_dir)
    elif missing:
        raise _missing_error("CIFAR-10", directory, missing)
    batches = [read_cifar_batch(directory / name) for name in names]
    images = torch.cat([images for images, _ in batches])
    labels = torch.cat([labels for _, labels in batches])
    data, labels = _first(request, "cifar10", images.float(), labels)
    return Dataset("cifar10", data, "image", labels=labels, num_levels=256, num_classes=10)


def _download_cifar10(data_dir: Path) -> None:
    """Fetches the official archive and unpacks its folder into ``data_dir`` atomically."""
    archive = data_dir / "cifar-10-python.tar.gz"
    if not archive.is_file():
        _download(CIFAR10_URL, archive, CIFAR10_MD5, "CIFAR-10")
    else:
        _check_md5(archive, CIFAR10_MD5, "CIFAR-10", str(archive), "delete it and try again")
    with tempfile.TemporaryDirectory(dir=data_dir) as scratch:
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(scratch, filter="data")  # no absolute paths, links or devices
        target = data_dir / CIFAR10_FOLDER
        if target.exists():  # a partial folder: replace it with the complete one
            shutil.rmtree(target)
        os.replace(Path(scratch) / CIFAR10_FOLDER, target)


# --- files and downloads -----------------------------------------------------------


def _missing_error(label: str, directory: Path, missing: list[str]) -> FileNotFoundError:
    return FileNotFoundError(
        f"{label}: expected {', '.join(missing)} in {directory}, not found; pass "
        f"download=True (train.py --download) to fetch them, or copy them there by hand"
    )


def _md5(path: Path) -> str:
    digest = hashlib.md5()  # the official checksums are MD5: integrity, not security
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_md5(path: Path, md5: str, label: str, source: str, hint: str) -> None:
    found = _md5(path)
    if found != md5:
        raise ValueError(f"{label}: expected MD5 {md5} for {source}, got {found}; {hint}")


def _download(url: str, path: Path, md5: str, label: str) -> None:
    """Downloads ``url`` to ``path`` through a temporary file, keeping it only if its
    MD5 matches, so ``path`` is never a partial or corrupt file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, scratch = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    scratch_path = Path(scratch)
    try:
        with os.fdopen(handle, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=60) as response:
                    shutil.copyfileobj(response, out)
            except (OSError, http.client.HTTPException) as error:  # URLError is an OSError
                raise FileNotFoundError(
                    f"{label}: could not download {url} ({error}); put {path.name} in "
                    f"{path.parent} by hand"
                ) from error
        hint = f"the download was discarded; try again, or put {path.name} in {path.parent} by hand"
        _check_md5(scratch_path, md5, label, url, hint)
        os.replace(scratch_path, path)
    finally:
        scratch_path.unlink(missing_ok=True)


DATASETS: dict[str, Loader] = {
    **{name: _toy_loader(name) for name in TOY_DENSITIES},
    "digits": load_digits,
    "mnist": load_mnist,
    "cifar10": load_cifar10,
    **TABULAR,  # power, gas, hepmass, miniboone, bsds300, mixture10d (models/tabular.py)
}
