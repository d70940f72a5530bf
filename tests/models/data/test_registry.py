"""Tests of models/data/registry.py: the registry and load_dataset's checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.data import DATASETS, SPLITS, TOY_DENSITIES, load_dataset


def test_registry_holds_every_set():
    assert set(TOY_DENSITIES) | {"digits", "mnist", "cifar10"} <= set(DATASETS)


def test_load_dataset_rejects_unknown_name():
    names = r"unknown data set 'svhn'; expected one of checkerboard, .*digits, mnist, cifar10"
    with pytest.raises(ValueError, match=names):
        load_dataset("svhn")


def test_load_dataset_rejects_bad_split():
    with pytest.raises(ValueError, match=r"split: expected one of \('train', 'validation', 'test'\), got 'valid'"):
        load_dataset("digits", split="valid")


@pytest.mark.parametrize("num_samples", [0, -1, 2.0, True])
def test_load_dataset_rejects_bad_num_samples(num_samples):
    with pytest.raises(ValueError, match=r"num_samples: expected a positive integer or None, got"):
        load_dataset("rings", num_samples=num_samples)


def test_load_dataset_rejects_too_many_samples():
    with pytest.raises(ValueError, match=r"num_samples: digits test has 300 samples, got 301"):
        load_dataset("digits", split="test", num_samples=301)


def test_one_set_of_split_names():
    assert SPLITS == ("train", "validation", "test")


def test_tabular_sets_load_their_validation_split(tmp_path):
    (tmp_path / "miniboone").mkdir()
    np.save(tmp_path / "miniboone" / "data.npy", np.random.default_rng(0).normal(size=(500, 5)))
    sizes = {split: len(load_dataset("miniboone", tmp_path, split)) for split in SPLITS}
    assert sizes == {"train": 405, "validation": 45, "test": 50}
    validation = load_dataset("mixture10d", split="validation", num_samples=20)
    assert validation.shape == (10,) and not torch.equal(validation.data, load_dataset("mixture10d", split="test",
                                                                                      num_samples=20).data)


@pytest.mark.parametrize("name", [*TOY_DENSITIES, "digits", "mnist", "cifar10"])
def test_sets_without_a_validation_split_say_so(name, tmp_path):
    message = rf"split: expected one of \('train', 'test'\) for {name}, got 'validation'; {name} has no validation split"
    with pytest.raises(ValueError, match=message):
        load_dataset(name, tmp_path, split="validation")
