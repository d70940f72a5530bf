"""Tests of models/data.py and models/toy.py: true densities, loaders and the registry.

No test touches the network: downloads are served by a fake ``urlopen``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import pickle
import re
import struct
import tarfile
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from models import data
from models.data import DATASETS, load_dataset, read_cifar_batch, read_idx
from models.mixture import GaussianMixture
from models.toy import TOY_DENSITIES, Checkerboard, EightGaussians, Rings, TwoMoons

# --- toy 2D densities --------------------------------------------------------------

BINS = 10  # per axis, for comparing sample counts with the density


def midpoint_grid(density, step: float):
    """Cell centres over ``density.bounds`` (a multiple of BINS cells per axis, each at
    most ``step`` wide), the cell area, and the cell counts per axis."""
    axes, sizes, widths = [], [], []
    for low, high in density.bounds:
        n = BINS * math.ceil((high - low) / (BINS * step))
        width = (high - low) / n
        axes.append(low + width * (torch.arange(n, dtype=torch.float64) + 0.5))
        sizes.append(n)
        widths.append(width)
    points = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 2)
    return points, widths[0] * widths[1], sizes


# Cells of 0.02 are a tenth of the narrowest noise std (0.1 -> 0.2 std per cell); the
# checkerboard's 0.05 cells tile its 2x2 squares exactly.
STEPS = {"checkerboard": 0.05, "eight_gaussians": 0.02, "rings": 0.02, "two_moons": 0.02}


@pytest.fixture(scope="module")
def grids():
    """name -> (density, grid points, cell area, cells per axis, density on the grid)."""
    out = {}
    for name, cls in TOY_DENSITIES.items():
        density = cls()
        points, area, sizes = midpoint_grid(density, STEPS[name])
        out[name] = density, points, area, sizes, density.log_prob(points).exp()
    return out


@pytest.mark.parametrize("name", list(TOY_DENSITIES))
def test_toy_density_integrates_to_one(name, grids):
    _, _, area, _, p = grids[name]
    # The midpoint rule is exact for the checkerboard (cells tile the squares) and, for
    # the smooth densities, off by the Gaussian factor exp(-2 pi^2 std^2 / step^2)
    # < 1e-200 (Poisson summation); the mass outside the bounds is < 1e-13, and summing
    # ~2e5 float64 terms rounds by ~1e-14 (measured errors: <= 6e-15).
    assert float(p.sum() * area) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("name", list(TOY_DENSITIES))
def test_toy_samples_follow_the_density(name, grids):
    density, _, area, (nx, ny), p = grids[name]
    n = 100_000
    x = density.sample(n, torch.Generator().manual_seed(1))
    # Probability of each of BINS x BINS boxes from the density, counts from samples.
    probs = (p * area).reshape(BINS, nx // BINS, BINS, ny // BINS).sum(dim=(1, 3)).reshape(-1)
    (x0, x1), (y0, y1) = density.bounds
    i = ((x[:, 0] - x0) / (x1 - x0) * BINS).long().clamp(0, BINS - 1)
    j = ((x[:, 1] - y0) / (y1 - y0) * BINS).long().clamp(0, BINS - 1)
    counts = torch.bincount(i * BINS + j, minlength=BINS * BINS).double()
    # Boxes expected to hold < 5 points are pooled so the normal approximation holds;
    # 5 binomial standard deviations over <= 101 boxes: a false alarm has p < 1e-4.
    big = probs * n >= 5
    expected = torch.cat([probs[big], probs[~big].sum(dim=0, keepdim=True)]) * n
    observed = torch.cat([counts[big], counts[~big].sum(dim=0, keepdim=True)])
    z = (observed - expected) / (expected * (1 - expected / n)).clamp_min(1e-12).sqrt()
    assert float(z.abs().max()) < 5.0, f"max |z| {float(z.abs().max()):.2f}"


@pytest.mark.parametrize("name", list(TOY_DENSITIES))
def test_toy_entropy_matches_the_grid(name, grids):
    density, _, area, _, p = grids[name]
    value, stderr = density.entropy()
    log_p = p.log()
    grid_entropy = float(-(torch.where(p > 0, p * log_p, 0.0)).sum() * area)
    # Grid error as in the normalisation test (< 1e-9); the Monte Carlo value is within
    # 5 of its standard errors (exact, stderr 0, for the checkerboard).
    assert abs(grid_entropy - value) < 5 * stderr + 1e-9


@pytest.mark.parametrize("name", list(TOY_DENSITIES))
def test_toy_entropy_matches_fresh_samples(name, grids):
    density = grids[name][0]
    value, stderr = density.entropy()
    nll = -density.log_prob(density.sample(20_000, torch.Generator().manual_seed(2)))
    assert bool(torch.isfinite(nll).all())  # every sample lies in the support
    mean = float(nll.mean())
    fresh_stderr = float(nll.std()) / math.sqrt(nll.numel())
    # Two independent estimates of E[-log p]: within 5 combined standard errors.
    assert abs(mean - value) < 5 * math.hypot(stderr, fresh_stderr) + 1e-12


@pytest.mark.parametrize("name", list(TOY_DENSITIES))
def test_toy_sample_shape_dtype_and_seed(name):
    density = TOY_DENSITIES[name]()
    a = density.sample(5, torch.Generator().manual_seed(7))
    b = density.sample(5, torch.Generator().manual_seed(7))
    assert a.shape == (5, 2) and a.dtype == torch.float64 and torch.equal(a, b)
    assert density.log_prob(a.float()).dtype == torch.float32
    assert density.log_prob(a).shape == (5,)


@pytest.mark.parametrize("name", list(TOY_DENSITIES))
def test_toy_class_densities_integrate_to_one_and_mix_to_the_density(name, grids):
    density, points, area, _, p = grids[name]
    per_class = torch.stack([density.log_prob_given(points, torch.full((len(points),), k))
                             for k in range(density.num_classes)])  # (K, N)
    # Each class density is normalised (same midpoint-rule error as the whole density) ...
    masses = per_class.exp().sum(1) * area
    torch.testing.assert_close(masses, torch.ones_like(masses), rtol=0.0, atol=1e-12)
    # ... and the equal mixture of them is the density itself.
    mixture = torch.logsumexp(per_class, 0) - math.log(density.num_classes)
    finite = p > 0
    torch.testing.assert_close(mixture[finite].exp(), p[finite], rtol=1e-12, atol=0.0)
    assert bool(torch.isinf(mixture[~finite]).all())


@pytest.mark.parametrize("name", list(TOY_DENSITIES))
def test_toy_labels_name_the_class_each_point_came_from(name):
    density = TOY_DENSITIES[name]()
    x, labels = density.sample_labelled(5000, torch.Generator().manual_seed(4))
    assert torch.equal(x, density.sample(5000, torch.Generator().manual_seed(4)))  # the same draws
    assert labels.dtype == torch.int64 and set(labels.tolist()) == set(range(density.num_classes))
    own = density.log_prob_given(x, labels)
    assert bool(torch.isfinite(own).all())
    # The true class explains a point better than any other class, for all but the few
    # points of a class that fall where another's density is higher (overlaps).
    others = torch.stack([density.log_prob_given(x, torch.full_like(labels, k)) for k in range(density.num_classes)])
    assert float((others.argmax(0) == labels).double().mean()) > 0.97


@pytest.mark.parametrize("name", list(TOY_DENSITIES))
def test_toy_conditional_entropy_matches_fresh_samples(name, grids):
    density, points, area, _, _ = grids[name]
    value, stderr = density.conditional_entropy()
    x, labels = density.sample_labelled(20_000, torch.Generator().manual_seed(5))
    nll = -density.log_prob_given(x, labels)
    fresh, fresh_stderr = float(nll.mean()), float(nll.std()) / math.sqrt(nll.numel())
    assert abs(fresh - value) < 5 * math.hypot(stderr, fresh_stderr) + 1e-12
    # H(X | class) <= H(X) <= H(X | class) + log K, with equality on the right for disjoint classes.
    entropy = density.entropy()[0]
    assert value - 1e-2 < entropy < value + math.log(density.num_classes) + 1e-2


def test_mixture_classes_are_its_weighted_components():
    mixture = GaussianMixture(dim=3, num_components=4)
    x, labels = mixture.sample_labelled(200, torch.Generator().manual_seed(0))
    per_class = torch.stack([mixture.log_prob_given(x, torch.full_like(labels, k)) for k in range(4)])
    torch.testing.assert_close(torch.logsumexp(per_class + mixture.log_weights[:, None], 0), mixture.log_prob(x))
    value, stderr = mixture.conditional_entropy()
    assert value < mixture.entropy()[0] and stderr > 0


@pytest.mark.parametrize(
    "labels, message",
    [
        (torch.zeros(3, dtype=torch.float64), r"Rings.log_prob_given: expected int64 labels of shape \(3,\), got torch.float64 \(3,\)"),
        (torch.zeros(2, dtype=torch.int64), r"expected int64 labels of shape \(3,\), got torch.int64 \(2,\)"),
        (torch.tensor([0, 4, -1]), r"Rings.log_prob_given: expected labels in 0..3, got \[-1, 4\]"),
    ],
)
def test_log_prob_given_rejects_bad_labels(labels, message):
    with pytest.raises(ValueError, match=message):
        Rings().log_prob_given(torch.zeros(3, 2), labels)


def test_class_context_is_one_hot_and_needs_labels():
    digits = load_dataset("digits", split="test")
    context = digits.class_context()
    assert context.shape == (300, 10) and context.dtype == torch.float32
    assert torch.equal(context.argmax(1), digits.labels) and torch.equal(context.sum(1), torch.ones(300))
    unlabelled = data.Dataset("vectors", torch.zeros(4, 3), "vector")
    with pytest.raises(ValueError, match=r"a class-conditional model expected a data set with class labels .*got 'vectors'"):
        unlabelled.class_context()


def test_checkerboard_values():
    points = torch.tensor([[-3.0, -3.0], [-1.0, -3.0], [1.5, 0.5], [0.5, 1.5], [4.0, 0.0], [-5.0, -3.0]])
    expected = [-math.log(32), -math.inf, -math.log(32), -math.log(32), -math.inf, -math.inf]
    assert Checkerboard().log_prob(points).tolist() == expected


def test_rings_closed_form_matches_angle_quadrature():
    # The trapezoid rule is spectrally accurate for the periodic integrand over the
    # ring's angle; 4096 nodes resolve std / R = 0.025 rad to round-off.
    rings = Rings()
    x = rings.sample(20, torch.Generator().manual_seed(3)) + 0.3 * torch.randn(20, 2)
    theta = torch.arange(4096, dtype=torch.float64) * (2 * math.pi / 4096)
    circle = torch.stack([theta.cos(), theta.sin()], dim=1)  # (T, 2)
    total = torch.zeros(20, dtype=torch.float64)
    for radius in rings.radii.tolist():
        sq = (x[:, None, :] - radius * circle).pow(2).sum(-1)  # (20, T)
        total += (-sq / (2 * rings.std**2)).exp().mean(dim=1) / (2 * math.pi * rings.std**2)
    expected = (total / len(rings.radii)).log()
    torch.testing.assert_close(rings.log_prob(x), expected, rtol=0.0, atol=1e-10)


def test_two_moons_quadrature_is_converged(grids):
    moons, points, _, _, _ = grids["two_moons"]
    points = points[::5]  # ~7,000 points spread over the bounds box
    fine = TwoMoons(num_panels=4 * 64)
    # Measured ~3e-11 over the whole bounds box, down to log p = -120.
    torch.testing.assert_close(moons.log_prob(points), fine.log_prob(points), rtol=0.0, atol=1e-9)


def test_toy_sample_rejects_bad_n():
    with pytest.raises(ValueError, match=r"Rings.sample: expected n >= 1, got 0"):
        Rings().sample(0)


def test_toy_log_prob_rejects_bad_shape():
    with pytest.raises(ValueError, match=r"TwoMoons.log_prob: expected points of shape \(N, 2\), got \(3,\)"):
        TwoMoons().log_prob(torch.zeros(3))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: EightGaussians(std=0.0), r"EightGaussians: expected radius > 0 and std > 0, got 2.0, 0.0"),
        (lambda: Rings(radii=()), r"Rings: expected positive radii and std > 0, got \(\), 0.1"),
        (lambda: TwoMoons(num_panels=0), r"TwoMoons: expected std > 0 and num_panels >= 1, got 0.1, 0"),
    ],
)
def test_toy_constructors_reject_bad_arguments(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# --- registry ----------------------------------------------------------------------


def test_toy_sets_are_fixed_samples():
    train = load_dataset("checkerboard")
    test = load_dataset("checkerboard", split="test")
    assert (len(train), len(test)) == (50_000, 10_000)
    assert train.kind == "toy2d" and train.shape == (2,) and train.data.dtype == torch.float32
    assert train.num_levels is None and train.num_classes == 8
    assert train.labels.shape == (50_000,) and set(train.labels.tolist()) == set(range(8))
    assert isinstance(train.density, Checkerboard)
    assert torch.equal(load_dataset("checkerboard").data, train.data)  # the same every time
    assert not torch.equal(test.data, train.data[:10_000])
    small = load_dataset("checkerboard", num_samples=100)
    other_seed = load_dataset("checkerboard", num_samples=100, seed=1)
    assert len(small) == 100 and not torch.equal(other_seed.data, small.data)


def test_registry_holds_every_set():
    assert set(TOY_DENSITIES) | {"digits", "mnist", "cifar10"} <= set(DATASETS)


def test_load_dataset_rejects_unknown_name():
    names = r"unknown data set 'svhn'; expected one of checkerboard, .*digits, mnist, cifar10"
    with pytest.raises(ValueError, match=names):
        load_dataset("svhn")


def test_load_dataset_rejects_bad_split():
    with pytest.raises(ValueError, match=r"split: expected 'train' or 'test', got 'valid'"):
        load_dataset("digits", split="valid")


@pytest.mark.parametrize("num_samples", [0, -1, 2.0, True])
def test_load_dataset_rejects_bad_num_samples(num_samples):
    with pytest.raises(ValueError, match=r"num_samples: expected a positive integer or None, got"):
        load_dataset("rings", num_samples=num_samples)


def test_load_dataset_rejects_too_many_samples():
    with pytest.raises(ValueError, match=r"num_samples: digits test has 300 samples, got 301"):
        load_dataset("digits", split="test", num_samples=301)


# --- digits ------------------------------------------------------------------------


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
        images, labels = fake_mnist(rng, n)
        image_name, label_name = data.MNIST_SPLITS[split]
        files[image_name] = gzip.compress(idx_bytes(images))
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
        image_name, label_name = data.MNIST_SPLITS[split]
        images = np.frombuffer(gzip.decompress(files[image_name])[16:], np.uint8).reshape(n, 1, 28, 28)
        labels = np.frombuffer(gzip.decompress(files[label_name])[8:], np.uint8)
        assert torch.equal(ds.data, torch.from_numpy(images.astype(np.float32)))
        assert torch.equal(ds.labels, torch.from_numpy(labels.astype(np.int64)))
        assert ds.num_levels == 256 and ds.shape == (1, 28, 28) and ds.kind == "image"


def test_read_idx_rejects_wrong_magic(tmp_path):
    path = tmp_path / "labels.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros(4, np.uint8))))
    with pytest.raises(ValueError, match=r"expected IDX magic number 2051 \(0x00000803\), got 2049"):
        read_idx(path, data.IDX_IMAGES_MAGIC)


def test_read_idx_rejects_a_file_too_short_for_the_magic(tmp_path):
    path = tmp_path / "tiny.gz"
    path.write_bytes(gzip.compress(b"\x00\x00"))
    with pytest.raises(ValueError, match=r"expected IDX magic number 2049 \(0x00000801\), got a 2-byte file"):
        read_idx(path, data.IDX_LABELS_MAGIC)


def test_read_idx_rejects_short_header(tmp_path):
    path = tmp_path / "short.gz"
    path.write_bytes(gzip.compress(b"\x00\x00\x08\x03\x00\x00"))
    with pytest.raises(ValueError, match=r"expected an IDX header of 16 bytes, got 6 bytes"):
        read_idx(path, data.IDX_IMAGES_MAGIC)


def test_read_idx_rejects_truncated_data(tmp_path):
    path = tmp_path / "truncated.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((2, 28, 28), np.uint8))[:-1]))
    with pytest.raises(ValueError, match=r"expected 1568 data bytes for shape \(2, 28, 28\), got 1567"):
        read_idx(path, data.IDX_IMAGES_MAGIC)


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
        monkeypatch.setitem(data.MNIST_FILES, name, md5(content))
    requested = serve(monkeypatch, files)
    ds = load_dataset("mnist", tmp_path, split="train", download=True)
    assert len(ds) == 3 and requested == [data.MNIST_URL + name for name in data.MNIST_SPLITS["train"]]
    assert sorted(p.name for p in (tmp_path / "mnist").iterdir()) == sorted(data.MNIST_SPLITS["train"])


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
    names = data.CIFAR10_SPLITS["train"] + data.CIFAR10_SPLITS["test"]
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
    write_files(tmp_path / data.CIFAR10_FOLDER, files)
    train = load_dataset("cifar10", tmp_path)
    test = load_dataset("cifar10", tmp_path, split="test")
    assert (len(train), len(test)) == (10, 2) and train.shape == (3, 32, 32)
    assert train.num_levels == 256 and train.data.dtype == torch.float32
    first, _ = read_cifar_batch(tmp_path / data.CIFAR10_FOLDER / "data_batch_1")
    last, labels = read_cifar_batch(tmp_path / data.CIFAR10_FOLDER / "data_batch_5")
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
    with pytest.raises(pickle.UnpicklingError, match=r"builtins.print is not allowed in a CIFAR batch"):
        read_cifar_batch(tmp_path / "batch")


def test_cifar10_missing_files_name_directory_and_hint(tmp_path):
    folder = re.escape(str(tmp_path / data.CIFAR10_FOLDER))
    pattern = r"CIFAR-10: expected test_batch in " + folder + r", not found; .*--download"
    with pytest.raises(FileNotFoundError, match=pattern):
        load_dataset("cifar10", tmp_path, split="test")


def cifar_archive(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(f"{data.CIFAR10_FOLDER}/{name}")
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def test_cifar10_download_verifies_and_unpacks(tmp_path, monkeypatch):
    archive = cifar_archive(cifar_files(np.random.default_rng(2)))
    monkeypatch.setattr(data, "CIFAR10_MD5", md5(archive))
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
