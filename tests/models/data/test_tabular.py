"""Tests of models/data/tabular.py: the MAF-paper tabular sets from small files in their distributed
formats, and files of vectors."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from models.data import SPLITS, DataRequest, load_dataset
from models.data.tabular import TABULAR, drop_correlated, load_tabular, load_vectors


def _load_all(name: str, data_dir) -> dict[str, np.ndarray]:
    return {split: load_tabular(name, data_dir, split).data.double().numpy() for split in SPLITS}


def _assert_standardized(values: np.ndarray, ddof: int = 0, atol: float = 1e-5) -> None:
    np.testing.assert_allclose(values.mean(0), 0.0, atol=atol)
    np.testing.assert_allclose(values.std(0, ddof=ddof), 1.0, atol=atol)


# --- POWER --------------------------------------------------------------------


def _write_power(root, n: int = 1000) -> np.ndarray:
    rng = np.random.default_rng(0)
    raw = rng.normal(size=(n, 8)) * 3 + 5
    raw[:, 0] = np.arange(n) * 0.5  # identifies the row (its noise is below 0.001)
    raw[:, [1, 3]] = np.nan  # the dropped columns: any survivor would show as NaN
    (root / "power").mkdir()
    np.save(root / "power" / "data.npy", raw)
    return raw


def test_power_drops_columns_splits_and_standardizes(tmp_path) -> None:
    _write_power(tmp_path)
    splits = _load_all("power", tmp_path)
    assert [splits[s].shape for s in SPLITS] == [(810, 6), (90, 6), (100, 6)]  # 10% test, 10% of rest
    assert all(np.isfinite(v).all() for v in splits.values())  # columns 1 and 3 are gone
    _assert_standardized(np.vstack([splits["train"], splits["validation"]]))  # by train + validation
    _assert_standardized(splits["train"], atol=0.1)
    # The last column (time) gets no noise, the first (row index) at most 0.001.
    assert splits["test"][:, 0].std() > 0


def test_power_shuffles_with_the_papers_seed(tmp_path) -> None:
    _write_power(tmp_path)
    test = load_tabular("power", tmp_path, "test").data.double().numpy()
    order = np.random.RandomState(42).permutation(1000)[-100:]  # rows the paper's test set holds
    # Column 0 is the row index (x 0.5) plus < 0.001 of noise, standardized: same ranking.
    assert np.array_equal(np.argsort(test[:, 0]), np.argsort(order))
    again = load_tabular("power", tmp_path, "test").data
    assert torch.equal(again, torch.from_numpy(test).float())  # deterministic


# --- MINIBOONE ----------------------------------------------------------------


def test_miniboone_splits_in_order_and_standardizes(tmp_path) -> None:
    values = np.random.default_rng(1).normal(size=(500, 5)) * 4 - 2
    values[:, 0] = np.arange(500)
    (tmp_path / "miniboone").mkdir()
    np.save(tmp_path / "miniboone" / "data.npy", values)
    splits = _load_all("miniboone", tmp_path)
    assert [splits[s].shape for s in SPLITS] == [(405, 5), (45, 5), (50, 5)]
    _assert_standardized(np.vstack([splits["train"], splits["validation"]]))
    # No shuffle: validation and test are the last rows, in order.
    assert splits["train"][:, 0].max() < splits["validation"][:, 0].min()
    assert splits["validation"][:, 0].max() < splits["test"][:, 0].min()
    assert bool(np.all(np.diff(splits["test"][:, 0]) > 0))


# --- GAS ----------------------------------------------------------------------


def test_drop_correlated_removes_the_first_of_each_correlated_group() -> None:
    rng = np.random.default_rng(2)
    a, b, c = rng.normal(size=(3, 400))
    values = np.stack([a, a + 1e-3 * rng.normal(size=400), b, c, 2 * c + 1, np.ones(400)], axis=1)
    # a ~ a' and c ~ 2c + 1 exceed 0.98; the first of each pair goes, one at a time.
    assert drop_correlated(values, 0.98) == [1, 2, 4, 5]


def test_gas_from_a_pandas_pickle(tmp_path) -> None:
    pandas = pytest.importorskip("pandas", reason="GAS is a pandas pickle; pandas is optional")
    rng = np.random.default_rng(3)
    n = 400
    base = rng.normal(size=(n, 3))
    frame = pandas.DataFrame({
        "Time": np.arange(n, dtype=float), "Meth": rng.normal(size=n), "Eth": rng.normal(size=n),
        "s1": base[:, 0] * 5 + 1, "s2": base[:, 0] * 5 + 1 + 1e-3 * rng.normal(size=n),  # correlated
        "s3": base[:, 1], "s4": base[:, 2] * 0.1,
    })
    (tmp_path / "gas").mkdir()
    frame.to_pickle(tmp_path / "gas" / "ethylene_CO.pickle")
    splits = _load_all("gas", tmp_path)
    assert [splits[s].shape for s in SPLITS] == [(324, 3), (36, 3), (40, 3)]
    everything = np.vstack([splits[s] for s in SPLITS])
    _assert_standardized(everything, ddof=1)  # standardized before the split, as the paper
    np.testing.assert_allclose(everything[:, 1], (base[:, 1] - base[:, 1].mean()) / base[:, 1].std(ddof=1), atol=1e-5)


def test_gas_without_pandas_says_so(tmp_path, monkeypatch) -> None:
    (tmp_path / "gas").mkdir()
    (tmp_path / "gas" / "ethylene_CO.pickle").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas now raises ImportError
    with pytest.raises(ImportError, match=r"GAS: reading ethylene_CO.pickle .* needs the optional package 'pandas'"):
        load_tabular("gas", tmp_path)


# --- HEPMASS ------------------------------------------------------------------


def _hepmass_rows(rng, n: int) -> np.ndarray:
    label = (np.arange(n) % 2).astype(float)  # half background (0), half signal (1)
    features = rng.normal(size=(n, 4)) * 2 + 1
    discrete = rng.integers(0, 3, size=(n, 1)).astype(float)  # its smallest value repeats
    mass = np.full((n, 1), 1000.0)
    return np.hstack([label[:, None], features, discrete, mass])


def _write_csv(path, names: list[str], rows: np.ndarray, trailing: bool = False) -> None:
    lines = [",".join(names)] + [",".join(f"{v:.9g}" for v in row) + ("," if trailing else "") for row in rows]
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("test_layout", ["extra_column", "same_header", "trailing_comma"])
def test_hepmass_keeps_signal_drops_discrete_and_standardizes(tmp_path, test_layout) -> None:
    rng = np.random.default_rng(4)
    names = ["# label", "f0", "f1", "f2", "f3", "f4", "mass"]
    (tmp_path / "hepmass").mkdir()
    train_rows, test_rows = _hepmass_rows(rng, 400), _hepmass_rows(rng, 100)
    _write_csv(tmp_path / "hepmass" / "1000_train.csv", names, train_rows)
    if test_layout == "extra_column":  # one column more than train: the last is dropped
        test_rows = np.hstack([test_rows, rng.normal(size=(100, 1))])
        _write_csv(tmp_path / "hepmass" / "1000_test.csv", names + ["extra"], test_rows)
    else:
        _write_csv(tmp_path / "hepmass" / "1000_test.csv", names, test_rows, trailing=test_layout == "trailing_comma")
    splits = _load_all("hepmass", tmp_path)
    # 200 signal rows in train (10% of them validation), 50 in test; f4 (discrete) and
    # mass (constant) are dropped.
    assert [splits[s].shape for s in SPLITS] == [(180, 4), (20, 4), (50, 4)]
    signal = train_rows[train_rows[:, 0] == 1, 1:5]
    _assert_standardized(np.vstack([splits["train"], splits["validation"]]), ddof=1)
    mean, std = signal.mean(0), signal.std(0, ddof=1)
    expected_test = (test_rows[test_rows[:, 0] == 1, 1:5] - mean) / std
    np.testing.assert_allclose(splits["test"], expected_test, atol=1e-5)


# --- BSDS300 ------------------------------------------------------------------


def test_bsds300_reads_the_three_arrays(tmp_path) -> None:
    h5py = pytest.importorskip("h5py", reason="BSDS300 is HDF5; h5py is optional")
    rng = np.random.default_rng(5)
    arrays = {split: rng.normal(size=(n, 63)) for split, n in zip(SPLITS, (30, 10, 12))}
    (tmp_path / "BSDS300").mkdir()
    with h5py.File(tmp_path / "BSDS300" / "BSDS300.hdf5", "w") as archive:
        for name, values in arrays.items():
            archive[name] = values
    for split, values in arrays.items():
        loaded = load_tabular("bsds300", tmp_path, split)
        np.testing.assert_allclose(loaded.data.numpy(), values, atol=1e-6)
        assert loaded.kind == "vector" and loaded.name == "bsds300"


def test_bsds300_without_h5py_says_so(tmp_path, monkeypatch) -> None:
    (tmp_path / "BSDS300").mkdir()
    (tmp_path / "BSDS300" / "BSDS300.hdf5").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(ImportError, match=r"BSDS300: reading BSDS300.hdf5 \(HDF5\) needs the optional package 'h5py'"):
        load_tabular("bsds300", tmp_path)


# --- errors and the registry --------------------------------------------------


@pytest.mark.parametrize(("name", "pattern"), [
    ("power", r"POWER: expected data\.npy in .*power, missing data\.npy; download https://zenodo\.org/record/1161203"),
    ("gas", r"GAS: expected ethylene_CO\.pickle in .*gas, missing"),
    ("hepmass", r"HEPMASS: expected 1000_train\.csv, 1000_test\.csv in .*hepmass, missing 1000_train\.csv"),
    ("miniboone", r"MINIBOONE: expected data\.npy in .*miniboone"),
    ("bsds300", r"BSDS300: expected BSDS300\.hdf5 in .*BSDS300"),
])
def test_missing_files_name_the_folder_files_and_source(tmp_path, name, pattern) -> None:
    with pytest.raises(FileNotFoundError, match=pattern):
        load_tabular(name, tmp_path)


def test_argument_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"load_tabular expected one of .*'power'.*got 'powr'"):
        load_tabular("powr", tmp_path)
    with pytest.raises(ValueError, match=r"split: expected one of \('train', 'validation', 'test'\), got 'val'"):
        load_tabular("power", tmp_path, "val")
    (tmp_path / "power").mkdir()
    np.save(tmp_path / "power" / "data.npy", np.zeros((10, 7)))
    with pytest.raises(ValueError, match=r"POWER: expected an array of shape \(N, 8\) .*got \(10, 7\)"):
        load_tabular("power", tmp_path)


def test_registry_loaders_take_a_request(tmp_path) -> None:
    _write_power(tmp_path)
    assert set(TABULAR) == {"power", "gas", "hepmass", "miniboone", "bsds300", "mixture10d"}
    test = TABULAR["power"](DataRequest(split="test", data_dir=tmp_path, num_samples=7))
    assert test.data.shape == (7, 6) and test.data.dtype == torch.float32 and test.kind == "vector"
    with pytest.raises(ValueError, match=r"num_samples: power test has 100 samples, got 101"):
        TABULAR["power"](DataRequest(split="test", data_dir=tmp_path, num_samples=101))


# --- files of vectors ---------------------------------------------------------


@pytest.mark.parametrize("kind", ["npy", "csv", "csv_header"])
def test_load_vectors_splits_standardizes_and_is_seeded(tmp_path, kind) -> None:
    values = np.random.default_rng(6).normal(size=(200, 3)) * [1.0, 5.0, 0.1] + [0.0, 3.0, -7.0]
    path = tmp_path / f"points.{kind[:3]}"
    if kind == "npy":
        np.save(path, values)
    else:
        header = ["a,b,c"] if kind == "csv_header" else []
        path.write_text("\n".join(header + [",".join(f"{v:.17g}" for v in row) for row in values]) + "\n")
    splits = {s: load_vectors(path, s, seed=1).data.double().numpy() for s in SPLITS}
    assert [splits[s].shape for s in SPLITS] == [(162, 3), (18, 3), (20, 3)]
    _assert_standardized(splits["train"])
    assert np.array_equal(load_vectors(path, "test", seed=1).data.numpy(), splits["test"].astype(np.float32))
    assert not np.allclose(load_vectors(path, "test", seed=2).data.numpy(), splits["test"].astype(np.float32))
    assert load_vectors(path).name == "points"


def test_load_vectors_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"load_vectors expected a \.npy or \.csv file, got 'x\.txt'"):
        load_vectors(tmp_path / "x.txt")
    with pytest.raises(FileNotFoundError, match=r"load_vectors expected a file at .*missing\.npy, not found"):
        load_vectors(tmp_path / "missing.npy")
    np.save(tmp_path / "flat.npy", np.zeros(5))
    with pytest.raises(ValueError, match=r"expected an array of shape \(N, D\) with N >= 2 .*got \(5,\)"):
        load_vectors(tmp_path / "flat.npy")
    np.save(tmp_path / "nan.npy", np.array([[0.0, np.nan], [1.0, 2.0]]))
    with pytest.raises(ValueError, match=r"expected finite values .*got 1 NaN or inf"):
        load_vectors(tmp_path / "nan.npy")
    with pytest.raises(ValueError, match=r"load_vectors expected fractions in \[0, 1\), got test_fraction=1.5"):
        load_vectors(tmp_path / "nan.npy", test_fraction=1.5)


@pytest.mark.parametrize(("name", "content", "match"), [
    ("cut.npy", "cut", r"load_vectors: expected a NumPy \.npy array in .*cut\.npy, got a file that cannot be read "
                       r"\(.*\); it is truncated, corrupt or in another format"),
    ("random.npy", "random", r"random\.npy, got a file that cannot be read"),
    ("empty.npy", b"", r"empty\.npy, got a file that cannot be read"),
    ("words.npy", "words", r"load_vectors: expected numbers in .*words\.npy, got an array of <U"),
    ("text.csv", b"a,b\n1,x\n", r"load_vectors expected comma-separated numbers in .*text\.csv .*could not convert"),
    ("ragged.csv", b"1,2\n3\n", r"ragged\.csv .*number of columns changed"),
    ("binary.csv", "random", r"binary\.csv \(one header line allowed\), got .*codec can't decode"),
    ("empty.csv", b"", r"load_vectors expected an array of shape \(N, D\) with N >= 2 in .*empty\.csv, got \(0, 1\)"),
])
def test_a_bad_file_of_vectors_is_one_clear_error(tmp_path, name, content, match) -> None:
    good = tmp_path / "good.npy"
    np.save(good, np.random.default_rng(0).normal(size=(50, 3)))
    if content == "cut":
        content = good.read_bytes()[:300]
    elif content == "random":
        content = b"\xf4" + np.random.default_rng(1).bytes(300)
    elif content == "words":
        np.save(tmp_path / "w.npy", np.array([["a", "b"], ["c", "d"]]))
        content = (tmp_path / "w.npy").read_bytes()
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=match):
        load_vectors(tmp_path / name)


def test_load_dataset_takes_the_path_of_a_file_of_vectors(tmp_path) -> None:
    values = np.random.default_rng(0).normal(size=(40, 3))
    np.savetxt(tmp_path / "points.csv", values, delimiter=",", header="a,b,c", comments="")
    train = load_dataset(str(tmp_path / "points.csv"))
    test = load_dataset(tmp_path / "points.csv", split="test")
    assert (len(train), len(test), train.shape, train.name, train.kind) == (33, 4, (3,), "points", "vector")
    assert torch.equal(test.data, load_vectors(tmp_path / "points.csv", "test", seed=0).data)
    with pytest.raises(FileNotFoundError, match=r"load_vectors expected a file at .*nope\.npy, not found"):
        load_dataset(tmp_path / "nope.npy")
