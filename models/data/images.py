"""Image data sets: the embedded 8x8 digits, MNIST and CIFAR-10.

* ``digits``: the 8x8 UCI handwritten digits embedded in ``models/assets`` (17 levels,
  1497 train / 300 test, see ``models/assets/README.md``); works offline.
* ``mnist`` and ``cifar10``: read from ``data_dir`` in their distributed formats (MNIST's
  IDX gzip files in ``data_dir/mnist``; CIFAR-10's python batches in
  ``data_dir/cifar-10-batches-py``), downloaded there with ``download=True``.

Images come as float32 tensors ``(N, C, H, W)`` of the raw integer levels ``0..K-1``
with ``K = num_levels``, labeled by class; dequantize them with
:func:`models.metrics.dequantize`. Each set has a ``train`` and a ``test`` split.
"""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import struct
import tarfile
import tempfile
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .downloads import check_md5, download, missing_files_error
from .split import DataRequest, DataSplit, Loader, check_split, keep_first

__all__ = ["IMAGES", "load_digits", "load_mnist", "load_cifar10", "read_idx", "read_cifar_batch"]

ASSETS = Path(__file__).resolve().parent.parent / "assets"
IMAGE_SPLITS = ("train", "test")

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


# --- digits (embedded) -------------------------------------------------------------


def load_digits(request: DataRequest) -> DataSplit:
    """The 8x8 UCI digits from ``models/assets/digits.npz``: 17 levels, (N, 1, 8, 8)."""
    check_split(request.split, "digits", IMAGE_SPLITS)
    with np.load(ASSETS / "digits.npz") as archive:
        images = torch.from_numpy(archive["images"])  # (1797, 8, 8) uint8
        labels = torch.from_numpy(archive["labels"])
        is_test = torch.zeros(images.shape[0], dtype=torch.bool)
        is_test[torch.from_numpy(archive["test_index"])] = True
    keep = is_test if request.split == "test" else ~is_test
    digits = DataSplit("digits", images[keep].unsqueeze(1).float(), "image", labels=labels[keep].long(),
                       num_levels=17, num_classes=10)
    return keep_first(digits, request)


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
    try:
        with gzip.open(path, "rb") as stream:
            raw = stream.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise ValueError(
            f"{path}: expected a gzip-compressed IDX file, got one that cannot be decompressed ({error}); it is "
            f"truncated or corrupt: delete it and download it again"
        ) from error
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


def load_mnist(request: DataRequest) -> DataSplit:
    """MNIST from ``data_dir/mnist/*-ubyte.gz``: 256 levels, (N, 1, 28, 28)."""
    check_split(request.split, "mnist", IMAGE_SPLITS)
    directory = request.data_dir / "mnist"
    names = MNIST_SPLITS[request.split]
    missing = [name for name in names if not (directory / name).is_file()]
    if missing and request.download:
        for name in missing:
            download(MNIST_URL + name, directory / name, MNIST_FILES[name], "MNIST")
    elif missing:
        raise missing_files_error("MNIST", directory, missing)
    images = read_idx(directory / names[0], IDX_IMAGES_MAGIC)
    labels = read_idx(directory / names[1], IDX_LABELS_MAGIC).long()
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"MNIST {request.split}: expected as many labels as images ({images.shape[0]}), "
            f"got {labels.shape[0]} in {directory / names[1]}"
        )
    mnist = DataSplit("mnist", images[:, None].float(), "image", labels=labels, num_levels=256, num_classes=10)
    return keep_first(mnist, request)


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
        try:
            # latin1 reads the original Python 2 pickles, whose numpy buffers are str.
            batch = _BatchUnpickler(stream, encoding="latin1").load()
        except Exception as error:  # a cut-off or garbled pickle can raise almost any kind
            raise ValueError(
                f"{path}: expected a CIFAR-10 python batch (a pickle), got one that cannot be read "
                f"({type(error).__name__}: {error}); it is truncated or corrupt: delete the folder and download "
                "it again"
            ) from error
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


def load_cifar10(request: DataRequest) -> DataSplit:
    """CIFAR-10 from ``data_dir/cifar-10-batches-py``: 256 levels, (N, 3, 32, 32)."""
    check_split(request.split, "cifar10", IMAGE_SPLITS)
    directory = request.data_dir / CIFAR10_FOLDER
    names = CIFAR10_SPLITS[request.split]
    missing = [name for name in names if not (directory / name).is_file()]
    if missing and request.download:
        _download_cifar10(request.data_dir)
    elif missing:
        raise missing_files_error("CIFAR-10", directory, missing)
    batches = [read_cifar_batch(directory / name) for name in names]
    images = torch.cat([images for images, _ in batches])
    labels = torch.cat([labels for _, labels in batches])
    cifar = DataSplit("cifar10", images.float(), "image", labels=labels, num_levels=256, num_classes=10)
    return keep_first(cifar, request)


def _download_cifar10(data_dir: Path) -> None:
    """Fetches the official archive and unpacks its folder into ``data_dir`` atomically."""
    archive = data_dir / "cifar-10-python.tar.gz"
    if not archive.is_file():
        download(CIFAR10_URL, archive, CIFAR10_MD5, "CIFAR-10")
    else:
        check_md5(archive, CIFAR10_MD5, "CIFAR-10", str(archive), "delete it and try again")
    with tempfile.TemporaryDirectory(dir=data_dir) as scratch:
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(scratch, filter="data")  # no absolute paths, links or devices
        target = data_dir / CIFAR10_FOLDER
        if target.exists():  # a partial folder: replace it with the complete one
            shutil.rmtree(target)
        os.replace(Path(scratch) / CIFAR10_FOLDER, target)


IMAGES: dict[str, Loader] = {"digits": load_digits, "mnist": load_mnist, "cifar10": load_cifar10}
