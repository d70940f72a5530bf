"""Tests of models/data/images.py (and downloads.py): digits, MNIST and CIFAR-10 from files in their
distributed formats.

No test touches the network: downloads are served by a fake ``urlopen``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import re
import struct
import tarfile
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from models.data import images as image_sets
from models.data import load_dataset
from models.data.images import read_cifar_batch, read_idx


def test_digits_split_and_levels():
    train, test = load_dataset("digits"), load_dataset("digits", split="test")
    assert (len(train), len(test)) == (1497, 300)
    for ds in (train, test):
        assert ds.kind == "image" and ds.shape == (1, 8, 8) and ds.num_levels == 17
        assert ds.data.dtype == torch.float32 and ds.labels.dtype == torch.int64
        assert torch.equal(ds.data, ds.data.round()) and float(ds.data.min()) == 0.0
        assert float(ds.data.max()) == 16.0
    assert torch.bincount(test.labels).tolist() == [30] * 10  # stratified test split
    assert torch.bincount(train.labels, minlength=10).sum() == 1497
    assert torch.equal(load_dataset("digits", num_samples=5).data, train.data[:5])


# --- MNIST -------------------------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    """An uncompressed IDX file of unsigned bytes: magic 0x0000 08 ndim, dims, data."""
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def fake_mnist(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)


def mnist_files(rng: np.random.Generator) -> dict[str, bytes]:
    """The four MNIST files, gzip-compressed, with 3 training and 2 test images."""
    files = {}
    for split, n in (("train", 3), ("test", 2)):
        pixels, labels = fake_mnist(rng, n)
        image_name, label_name = image_sets.MNIST_SPLITS[split]
        files[image_name] = gzip.compress(idx_bytes(pixels))
        files[label_name] = gzip.compress(idx_bytes(labels))
    return files


def write_files(directory, files: dict[str, bytes]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (directory / name).write_bytes(content)


def test_mnist_reads_idx_files(tmp_path):
    files = mnist_files(np.random.default_rng(0))
    write_files(tmp_path / "mnist", files)
    for split, n in (("train", 3), ("test", 2)):
        ds = load_dataset("mnist", tmp_path, split=split)
        image_name, label_name = image_sets.MNIST_SPLITS[split]
        pixels = np.frombuffer(gzip.decompress(files[image_name])[16:], np.uint8).reshape(n, 1, 28, 28)
        labels = np.frombuffer(gzip.decompress(files[label_name])[8:], np.uint8)
        assert torch.equal(ds.data, torch.from_numpy(pixels.astype(np.float32)))
        assert torch.equal(ds.labels, torch.from_numpy(labels.astype(np.int64)))
        assert ds.num_levels == 256 and ds.shape == (1, 28, 28) and ds.kind == "image"


def test_read_idx_rejects_wrong_magic(tmp_path):
    path = tmp_path / "labels.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros(4, np.uint8))))
    with pytest.raises(ValueError, match=r"expected IDX magic number 2051 \(0x00000803\), got 2049"):
        read_idx(path, image_sets.IDX_IMAGES_MAGIC)


def test_read_idx_rejects_a_file_too_short_for_the_magic(tmp_path):
    path = tmp_path / "tiny.gz"
    path.write_bytes(gzip.compress(b"\x00\x00"))
    with pytest.raises(ValueError, match=r"expected IDX magic number 2049 \(0x00000801\), got a 2-byte file"):
        read_idx(path, image_sets.IDX_LABELS_MAGIC)


def test_read_idx_rejects_short_header(tmp_path):
    path = tmp_path / "short.gz"
    path.write_bytes(gzip.compress(b"\x00\x00\x08\x03\x00\x00"))
    with pytest.raises(ValueError, match=r"expected an IDX header of 16 bytes, got 6 bytes"):
        read_idx(path, image_sets.IDX_IMAGES_MAGIC)


def test_read_idx_rejects_truncated_data(tmp_path):
    path = tmp_path / "truncated.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((2, 28, 28), np.uint8))[:-1]))
    with pytest.raises(ValueError, match=r"expected 1568 data bytes for shape \(2, 28, 28\), got 1567"):
        read_idx(path, image_sets.IDX_IMAGES_MAGIC)


def test_mnist_rejects_label_count_mismatch(tmp_path):
    files = mnist_files(np.random.default_rng(0))
    files["t10k-labels-idx1-ubyte.gz"] = gzip.compress(idx_bytes(np.zeros(5, np.uint8)))
    write_files(tmp_path / "mnist", files)
    with pytest.raises(ValueError, match=r"MNIST test: expected as many labels as images \(2\), got 5"):
        load_dataset("mnist", tmp_path, split="test")


def test_mnist_missing_files_name_directory_and_hint(tmp_path):
    pattern = (
        r"MNIST: expected t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz in "
        + re.escape(str(tmp_path / "mnist"))
        + r", not found; pass download=True \(train.py --download\)"
    )
    with pytest.raises(FileNotFoundError, match=pattern):
        load_dataset("mnist", tmp_path, split="test")


def serve(monkeypatch, files: dict[str, bytes]) -> list[str]:
    """Replaces urlopen with one that serves ``files`` by the URL's last part."""
    requested = []

    def urlopen(url, timeout=None):
        requested.append(url)
        return io.BytesIO(files[url.rsplit("/", 1)[-1]])

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return requested


def md5(content: bytes) -> str:
    return hashlib.md5(content).hexdigest()


def test_mnist_download_verifies_and_writes(tmp_path, monkeypatch):
    files = mnist_files(np.random.default_rng(1))
    for name, content in files.items():
        monkeypatch.setitem(image_sets.MNIST_FILES, name, md5(content))
    requested = serve(monkeypatch, files)
    ds = load_dataset("mnist", tmp_path, split="train", download=True)
    assert len(ds) == 3 and requested == [image_sets.MNIST_URL + name for name in image_sets.MNIST_SPLITS["train"]]
    assert sorted(p.name for p in (tmp_path / "mnist").iterdir()) == sorted(image_sets.MNIST_SPLITS["train"])


def test_mnist_download_rejects_bad_checksum(tmp_path, monkeypatch):
    serve(monkeypatch, mnist_files(np.random.default_rng(1)))  # official MD5s will not match
    message = r"MNIST: expected MD5 f68b3c2dcbeaaa9fbdd348bbdeb94873 for https://.*, got"
    with pytest.raises(ValueError, match=message):
        load_dataset("mnist", tmp_path, download=True)
    assert list((tmp_path / "mnist").iterdir()) == []  # nothing partial is left behind


def test_mnist_download_failure_is_reported(tmp_path, monkeypatch):
    def urlopen(url, timeout=None):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    with pytest.raises(FileNotFoundError, match=r"MNIST: could not download https://.*no network.*by hand"):
        load_dataset("mnist", tmp_path, download=True)
    assert list((tmp_path / "mnist").iterdir()) == []


# --- CIFAR-10 ----------------------------------------------------------------------


def cifar_batch(rng: np.random.Generator, n: int, protocol: int = 2) -> tuple[bytes, np.ndarray, list[int]]:
    pixels = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, n).tolist()
    batch = {"batch_label": "testing batch", "data": pixels, "labels": labels, "filenames": ["a.png"] * n}
    return pickle.dumps(batch, protocol=protocol), pixels, labels


def cifar_files(rng: np.random.Generator) -> dict[str, bytes]:
    names = image_sets.CIFAR10_SPLITS["train"] + image_sets.CIFAR10_SPLITS["test"]
    return {name: cifar_batch(rng, 2, protocol=2 + i % 4)[0] for i, name in enumerate(names)}


def test_cifar_batch_layout(tmp_path):
    content, pixels, labels = cifar_batch(np.random.default_rng(0), 3)
    (tmp_path / "batch").write_bytes(content)
    images, got_labels = read_cifar_batch(tmp_path / "batch")
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.uint8
    # Row layout: 1024 red, 1024 green, 1024 blue values, each plane row-major.
    n, c, h, w = 2, 1, 5, 30
    assert int(images[n, c, h, w]) == int(pixels[n, c * 1024 + h * 32 + w])
    assert got_labels.tolist() == labels


def test_cifar10_reads_all_batches(tmp_path):
    files = cifar_files(np.random.default_rng(0))
    write_files(tmp_path / image_sets.CIFAR10_FOLDER, files)
    train = load_dataset("cifar10", tmp_path)
    test = load_dataset("cifar10", tmp_path, split="test")
    assert (len(train), len(test)) == (10, 2) and train.shape == (3, 32, 32)
    assert train.num_levels == 256 and train.data.dtype == torch.float32
    first, _ = read_cifar_batch(tmp_path / image_sets.CIFAR10_FOLDER / "data_batch_1")
    last, labels = read_cifar_batch(tmp_path / image_sets.CIFAR10_FOLDER / "data_batch_5")
    assert torch.equal(train.data[:2], first.float()) and torch.equal(train.data[-2:], last.float())
    assert torch.equal(train.labels[-2:], labels)


@pytest.mark.parametrize(
    "batch, message",
    [
        ([1, 2], r"expected a dict with 'data' and 'labels', got list"),
        ({"data": np.zeros((2, 3072), np.uint8)}, r"expected a dict with 'data' and 'labels', got keys \['data'\]"),
        (
            {"data": np.zeros((2, 3072), np.int64), "labels": [0, 1]},
            r"expected 'data' as a uint8 array of shape \(N, 3072\), got int64 \(2, 3072\)",
        ),
        ({"data": np.zeros((2, 1024), np.uint8), "labels": [0, 1]}, r"got uint8 \(2, 1024\)"),
        ({"data": np.zeros((2, 3072), np.uint8), "labels": [0]}, r"expected 2 labels, got 1"),
    ],
)
def test_cifar_batch_rejects_malformed_content(tmp_path, batch, message):
    (tmp_path / "batch").write_bytes(pickle.dumps(batch))
    with pytest.raises(ValueError, match=message):
        read_cifar_batch(tmp_path / "batch")


def test_cifar_batch_refuses_to_run_code(tmp_path):
    (tmp_path / "batch").write_bytes(pickle.dumps({"data": print, "labels": []}))
    with pytest.raises(ValueError, match=r"batch: expected a CIFAR-10 python batch .*builtins.print is not allowed"):
        read_cifar_batch(tmp_path / "batch")


def test_cifar10_missing_files_name_directory_and_hint(tmp_path):
    folder = re.escape(str(tmp_path / image_sets.CIFAR10_FOLDER))
    pattern = r"CIFAR-10: expected test_batch in " + folder + r", not found; .*--download"
    with pytest.raises(FileNotFoundError, match=pattern):
        load_dataset("cifar10", tmp_path, split="test")


def cifar_archive(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(f"{image_sets.CIFAR10_FOLDER}/{name}")
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def test_cifar10_download_verifies_and_unpacks(tmp_path, monkeypatch):
    archive = cifar_archive(cifar_files(np.random.default_rng(2)))
    monkeypatch.setattr(image_sets, "CIFAR10_MD5", md5(archive))
    serve(monkeypatch, {"cifar-10-python.tar.gz": archive})
    assert len(load_dataset("cifar10", tmp_path, split="test", download=True)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]


def test_cifar10_download_rejects_a_bad_existing_archive(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not the archive")
    message = (
        r"CIFAR-10: expected MD5 c58f30108f718f92721af3b95e74349a for .*cifar-10-python.tar.gz, "
        r"got .*; delete it and try again"
    )
    with pytest.raises(ValueError, match=message):
        load_dataset("cifar10", tmp_path, download=True)


@pytest.mark.parametrize("fault", ["cut off", "random bytes", "garbled stream"])
def test_a_damaged_mnist_file_is_one_clear_error(tmp_path, fault):
    files = mnist_files(np.random.default_rng(0))
    good = files["t10k-images-idx3-ubyte.gz"]
    files["t10k-images-idx3-ubyte.gz"] = {
        "cut off": good[: len(good) // 2],
        "random bytes": np.random.default_rng(1).bytes(len(good)),
        "garbled stream": good[:10] + np.random.default_rng(2).bytes(len(good) - 10),  # a valid gzip header
    }[fault]
    write_files(tmp_path / "mnist", files)
    message = r"t10k-images-idx3-ubyte.gz: expected a gzip-compressed IDX file, got one that cannot be " \
              r"decompressed \(.*\); it is truncated or corrupt: delete it and download it again"
    with pytest.raises(ValueError, match=message):
        load_dataset("mnist", tmp_path, split="test")


@pytest.mark.parametrize("fault", ["cut off", "random bytes", "empty"])
def test_a_damaged_cifar_batch_is_one_clear_error(tmp_path, fault):
    files = cifar_files(np.random.default_rng(0))
    good = files["test_batch"]
    files["test_batch"] = {"cut off": good[: len(good) // 2], "random bytes": np.random.default_rng(1).bytes(400),
                           "empty": b""}[fault]
    write_files(tmp_path / image_sets.CIFAR10_FOLDER, files)
    message = r"test_batch: expected a CIFAR-10 python batch \(a pickle\), got one that cannot be read \(\w+: .*\); " \
              r"it is truncated or corrupt"
    with pytest.raises(ValueError, match=message):
        load_dataset("cifar10", tmp_path, split="test")
