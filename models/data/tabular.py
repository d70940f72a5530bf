"""Tabular data sets: the five of the MAF paper, any file of vectors, a 10-D Gaussian mixture.

POWER, GAS, HEPMASS, MINIBOONE and BSDS300 are read from the files Papamakarios et al.
distributed (``data.tar.gz`` at https://zenodo.org/record/1161203, also used by NSF and
nflows), unpacked into ``data_dir``, and preprocessed and split as in the papers' code
(github.com/gpapamak/maf ``datasets/*.py``, reimplemented here):

* ``power/data.npy``: rows shuffled with seed 42; columns 1 and 3 dropped; uniform noise
  added (0.001 and 0.01 times U(0, 1) on the first two columns, U(0, 1) on the next three,
  none on the last); the last 10% is test, the last 10% of the rest validation;
  standardized by the mean and std of train + validation. D = 6.
* ``gas/ethylene_CO.pickle`` (a pandas DataFrame; needs pandas): columns Meth, Eth and
  Time dropped, then, while a column has a Pearson correlation above 0.98 with another,
  the first such column; standardized by the whole set's mean and std (ddof 1); split
  as POWER, without shuffling. D = 8.
* ``hepmass/1000_train.csv`` and ``1000_test.csv``: rows of class 1 only, label column
  dropped, and the test file's last column; standardized by the train file's mean and
  std (ddof 1); columns whose smallest value occurs more than 5 times in train (the
  discrete ones) dropped, and constant ones; the last 10% of train is validation. D = 21.
* ``miniboone/data.npy`` (outliers and discrete columns already removed): split as POWER
  without shuffling, standardized by train + validation. D = 43.
* ``BSDS300/BSDS300.hdf5`` (needs h5py): its ``train``, ``validation`` and ``test``
  arrays as they are. D = 63.

``TABULAR`` maps each name (and ``"mixture10d"``, see :mod:`models.data.mixture`) to a loader
``(DataRequest) -> DataSplit`` for ``models.data.DATASETS``; each has the three splits
``"train"``, ``"validation"`` and ``"test"``.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from .mixture import load_mixture
from .split import SPLITS, DataRequest, DataSplit, Loader, check_split, keep_first

__all__ = ["TABULAR", "TABULAR_FILES", "load_tabular", "load_vectors", "vectors_loader"]

SOURCE = "https://zenodo.org/record/1161203 (data.tar.gz of Papamakarios et al., MAF, 2017)"
POWER_SEED = 42  # gpapamak/maf datasets/power.py
GAS_MAX_CORRELATION = 0.98
HEPMASS_MAX_REPEATS = 5

# Data set -> (folder in data_dir, files it needs).
TABULAR_FILES: dict[str, tuple[str, tuple[str, ...]]] = {
    "power": ("power", ("data.npy",)),
    "gas": ("gas", ("ethylene_CO.pickle",)),
    "hepmass": ("hepmass", ("1000_train.csv", "1000_test.csv")),
    "miniboone": ("miniboone", ("data.npy",)),
    "bsds300": ("BSDS300", ("BSDS300.hdf5",)),
}

Splits = dict[str, np.ndarray]


# --- splitting and standardizing ---------------------------------------------------


def split_tail(values: np.ndarray, fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """``(head, tail)`` with the last ``int(fraction * N)`` rows in ``tail``."""
    count = int(fraction * values.shape[0])
    return values[: values.shape[0] - count], values[values.shape[0] - count :]


def three_way(values: np.ndarray) -> Splits:
    """The papers' split: the last 10% is test, the last 10% of the rest validation."""
    rest, test = split_tail(values)
    train, validation = split_tail(rest)
    return {"train": train, "validation": validation, "test": test}


def standardize(splits: Splits, reference: np.ndarray, ddof: int = 0) -> Splits:
    """Every split minus ``reference``'s column means, over its column stds (1 where 0)."""
    mean, std = reference.mean(0), reference.std(0, ddof=ddof)
    std = np.where(std > 0, std, 1.0)
    return {name: (values - mean) / std for name, values in splits.items()}


# --- the five data sets ------------------------------------------------------------


def power_splits(directory: Path) -> Splits:
    """POWER: household electric power consumption (UCI), 6 columns after preprocessing."""
    raw = load_npy(directory / "data.npy", "POWER")
    _check_columns("POWER", directory / "data.npy", raw, 8)
    rng = np.random.RandomState(POWER_SEED)
    values = raw.astype(np.float64)
    rng.shuffle(values)  # rows
    values = np.delete(values, [1, 3], axis=1)  # global reactive power and global intensity
    n = values.shape[0]
    # Draw order as in the original (voltage, then gap, then sub-metering) so the same
    # seed gives the paper's exact noise; column order is gap, voltage, 3 x sub-metering, time.
    voltage, gap, metering = 0.01 * rng.rand(n, 1), 0.001 * rng.rand(n, 1), rng.rand(n, 3)
    values = values + np.hstack([gap, voltage, metering, np.zeros((n, 1))])
    splits = three_way(values)
    return standardize(splits, np.vstack([splits["train"], splits["validation"]]))


def gas_splits(directory: Path) -> Splits:
    """GAS: ethylene and CO sensor array (UCI), 8 columns after preprocessing."""
    path = directory / "ethylene_CO.pickle"
    pandas = _optional("pandas", f"GAS: reading {path.name} (a pandas DataFrame pickle)")
    # read_pickle runs the pickle: load only the file of the distributed archive.
    frame = pandas.read_pickle(path).drop(columns=["Meth", "Eth", "Time"])
    values = frame.to_numpy(dtype=np.float64)
    values = values[:, drop_correlated(values, GAS_MAX_CORRELATION)]
    return three_way(standardize({"all": values}, values, ddof=1)["all"])


def drop_correlated(values: np.ndarray, threshold: float) -> list[int]:
    """Columns kept after removing, while any column has correlation ``> threshold`` with
    another, the first such column (GAS's cleaning). Returns their indices."""
    kept = list(range(values.shape[1]))
    while True:
        with np.errstate(invalid="ignore", divide="ignore"):  # a constant column: NaN, never > threshold
            above = np.atleast_2d(np.corrcoef(values[:, kept], rowvar=False)) > threshold
        flagged = np.flatnonzero(above.sum(1) > 1)  # the diagonal counts once
        if flagged.size == 0:
            return kept
        del kept[flagged[0]]


def hepmass_splits(directory: Path) -> Splits:
    """HEPMASS: particle collisions (UCI), the class-1 events of the mass-1000 files, 21 columns."""
    train_names, train = read_csv(directory / "1000_train.csv")
    test_names, test = read_csv(directory / "1000_test.csv")
    train, train_names = train[train[:, 0] == 1, 1:], train_names[1:]
    # The distributed test file has one column more than the train file (its last).
    test, test_names = test[test[:, 0] == 1, 1:-1], test_names[1:-1]
    mean, std = train.mean(0), train.std(0, ddof=1)
    constant = std == 0
    train = (train - mean) / np.where(constant, 1.0, std)
    smallest = train.min(0)
    repeats = (train == smallest).sum(0)  # how often each column's smallest value occurs
    kept = [i for i in range(train.shape[1]) if not constant[i] and repeats[i] <= HEPMASS_MAX_REPEATS]
    missing = [train_names[i] for i in kept if train_names[i] not in test_names]
    if missing:
        raise ValueError(
            f"HEPMASS: expected 1000_test.csv to have the columns of 1000_train.csv, got none named {missing}"
        )
    columns = [test_names.index(train_names[i]) for i in kept]  # aligned by name, as pandas does
    test = (test[:, columns] - mean[kept]) / std[kept]
    rest, validation = split_tail(train[:, kept])
    return {"train": rest, "validation": validation, "test": test}


def read_csv(path: Path) -> tuple[list[str], np.ndarray]:
    """A comma-separated file with a header line: ``(column names, float64 values)``.

    Fields past the header's count (a trailing delimiter) are ignored, like pandas'
    ``index_col=False``.
    """
    with path.open() as stream:
        names = [name.strip() for name in stream.readline().rstrip("\r\n").split(",")]
    values = np.loadtxt(path, delimiter=",", skiprows=1, usecols=range(len(names)), ndmin=2)
    return names, values


def miniboone_splits(directory: Path) -> Splits:
    """MINIBOONE: particle identification (UCI), 43 columns."""
    values = load_npy(directory / "data.npy", "MINIBOONE").astype(np.float64)
    _check_columns("MINIBOONE", directory / "data.npy", values, None)
    splits = three_way(values)
    return standardize(splits, np.vstack([splits["train"], splits["validation"]]))


def bsds300_splits(directory: Path) -> Splits:
    """BSDS300: 8x8 natural-image patches (Berkeley), 63 pixels (the 64th is implied)."""
    path = directory / "BSDS300.hdf5"
    h5py = _optional("h5py", f"BSDS300: reading {path.name} (HDF5)")
    with h5py.File(path, "r") as archive:
        return {name: np.asarray(archive[name], dtype=np.float64) for name in SPLITS}


READERS: dict[str, Callable[[Path], Splits]] = {
    "power": power_splits,
    "gas": gas_splits,
    "hepmass": hepmass_splits,
    "miniboone": miniboone_splits,
    "bsds300": bsds300_splits,
}


def load_npy(path: Path, label: str) -> np.ndarray:
    """A ``.npy`` array of numbers (no pickles); ``ValueError`` naming the file if it is cut off or not one."""
    try:
        values = np.load(path, allow_pickle=False)
    except (ValueError, EOFError, OSError) as error:
        if isinstance(error, (FileNotFoundError, PermissionError)):
            raise
        raise ValueError(f"{label}: expected a NumPy .npy array in {path}, got a file that cannot be read ({error}); "
                         "it is truncated, corrupt or in another format") from error
    if not (np.issubdtype(values.dtype, np.number) or values.dtype == np.bool_):
        raise ValueError(f"{label}: expected numbers in {path}, got an array of {values.dtype}")
    return values


def _check_columns(label: str, path: Path, values: np.ndarray, columns: int | None) -> None:
    if values.ndim != 2 or (columns is not None and values.shape[1] != columns):
        expected = f"(N, {columns})" if columns is not None else "(N, D)"
        raise ValueError(f"{label}: expected an array of shape {expected} in {path}, got {values.shape}")


def _vectors(name: str, values: np.ndarray) -> DataSplit:
    """A float32 ``DataSplit`` of kind ``"vector"``."""
    return DataSplit(name, torch.from_numpy(values.astype(np.float32)), "vector")


def _optional(module: str, purpose: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"{purpose} needs the optional package {module!r}, which is not installed; pip install {module}"
        ) from error


# --- loading -------------------------------------------------------------------------


def load_tabular(name: str, data_dir: str | Path = "data", split: str = "train") -> DataSplit:
    """One split of a MAF-paper data set, preprocessed as in the paper.

    Args:
        name: ``"power"``, ``"gas"``, ``"hepmass"``, ``"miniboone"`` or ``"bsds300"``.
        data_dir: the folder holding the unpacked archive's ``power/``, ``gas/``, ... folders.
        split: ``"train"``, ``"validation"`` or ``"test"``.

    Returns:
        A :class:`~models.data.split.DataSplit` of kind ``"vector"``: float32 ``(N, D)``.

    Raises:
        FileNotFoundError: naming the folder, the files expected there and their source.
    """
    if name not in READERS:
        raise ValueError(f"load_tabular expected one of {sorted(READERS)}, got {name!r}")
    check_split(split, name)
    folder, files = TABULAR_FILES[name]
    directory = Path(data_dir) / folder
    missing = [file for file in files if not (directory / file).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{name.upper()}: expected {', '.join(files)} in {directory}, missing {', '.join(missing)}; "
            f"download {SOURCE} and unpack it so that {directory} holds them"
        )
    return _vectors(name, READERS[name](directory)[split])


def load_vectors(
    path: str | Path,
    split: str = "train",
    seed: int = 0,
    test_fraction: float = 0.1,
    validation_fraction: float = 0.1,
) -> DataSplit:
    """Any ``.npy`` or ``.csv`` file of vectors ``(N, D)`` as a data set (``train.py --dataset path``).

    Rows are shuffled with ``seed`` (``load_dataset`` and train.py: 0, so every run holds out
    the same rows); the last ``int(test_fraction * N)`` rows are test and the last
    ``int(validation_fraction * rest)`` of the rest validation; every split is standardized
    by the train split's column means and stds (std 1 for a constant column). A CSV file
    may have one header line.

    Example:
        >>> import numpy as np, tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "points.npy"
        >>> np.save(path, np.random.default_rng(0).normal(size=(100, 3)))
        >>> load_vectors(path, "test").data.shape
        torch.Size([10, 3])
    """
    path = Path(path)
    check_split(split, path.stem)
    if not 0 <= test_fraction < 1 or not 0 <= validation_fraction < 1:
        raise ValueError(
            f"load_vectors expected fractions in [0, 1), got test_fraction={test_fraction}, "
            f"validation_fraction={validation_fraction}"
        )
    values = _read_vectors(path)
    values = values[np.random.default_rng(seed).permutation(values.shape[0])]
    rest, test = split_tail(values, test_fraction)
    train, validation = split_tail(rest, validation_fraction)
    splits = standardize({"train": train, "validation": validation, "test": test}, train)
    return _vectors(path.stem, splits[split])


def _read_vectors(path: Path) -> np.ndarray:
    if path.suffix not in (".npy", ".csv"):
        raise ValueError(f"load_vectors expected a .npy or .csv file, got {path.name!r}")
    if not path.is_file():
        raise FileNotFoundError(f"load_vectors expected a file at {path}, not found")
    if path.suffix == ".npy":
        values = load_npy(path, "load_vectors")
    else:
        try:
            with path.open() as stream:
                first = stream.readline().split(",")
            header = not all(_is_number(field) for field in first)
            with warnings.catch_warnings():  # an empty file: the shape check below says so
                warnings.simplefilter("ignore", UserWarning)
                values = np.loadtxt(path, delimiter=",", skiprows=int(header), ndmin=2)
        except ValueError as error:  # text that is not numbers (UnicodeDecodeError too), ragged rows
            raise ValueError(f"load_vectors expected comma-separated numbers in {path} (one header line allowed), "
                             f"got {str(error).splitlines()[0]}") from error
    if values.ndim != 2 or values.shape[0] < 2:
        raise ValueError(f"load_vectors expected an array of shape (N, D) with N >= 2 in {path}, got {values.shape}")
    values = values.astype(np.float64)
    if not np.isfinite(values).all():
        bad = int((~np.isfinite(values)).sum())
        raise ValueError(f"load_vectors expected finite values in {path}, got {bad} NaN or inf")
    return values


def _is_number(field: str) -> bool:
    try:
        float(field)
    except ValueError:
        return False
    return True


# --- registry ------------------------------------------------------------------------


def _tabular_loader(name: str) -> Loader:
    def load(request: DataRequest) -> DataSplit:
        return keep_first(load_tabular(name, request.data_dir, request.split), request)

    return load


def vectors_loader(path: str | Path, **options) -> Loader:
    """A ``DATASETS`` loader for a file of vectors (see :func:`load_vectors`; ``options``
    are its fractions); the request's ``seed`` chooses the shuffle."""

    def load(request: DataRequest) -> DataSplit:
        return keep_first(load_vectors(path, request.split, request.seed, **options), request)

    return load


TABULAR: dict[str, Loader] = {
    **{name: _tabular_loader(name) for name in READERS},
    "mixture10d": load_mixture,
}
