"""Tests of models/data/split.py: the split container, split names and the first-samples helper."""

from __future__ import annotations

import pytest
import torch

from models.data import DataRequest, DataSplit, check_split, keep_first, load_dataset


def test_class_context_is_one_hot_and_needs_labels():
    digits = load_dataset("digits", split="test")
    context = digits.class_context()
    assert context.shape == (300, 10) and context.dtype == torch.float32
    assert torch.equal(context.argmax(1), digits.labels) and torch.equal(context.sum(1), torch.ones(300))
    unlabeled = DataSplit("vectors", torch.zeros(4, 3), "vector")
    with pytest.raises(ValueError, match=r"a class-conditional model expected a data set with class labels .*got 'vectors'"):
        unlabeled.class_context()


def test_keep_first_keeps_the_labels_of_the_samples_it_keeps():
    digits = load_dataset("digits", split="test")
    first = keep_first(digits, DataRequest(split="test", num_samples=7))
    assert torch.equal(first.data, digits.data[:7]) and torch.equal(first.labels, digits.labels[:7])
    assert first.num_levels == 17 and first.num_classes == 10 and first.name == "digits"
    assert keep_first(digits, DataRequest(split="test")) is digits
    unlabeled = DataSplit("vectors", torch.zeros(4, 3), "vector")
    assert keep_first(unlabeled, DataRequest(num_samples=2)).labels is None
    with pytest.raises(ValueError, match=r"num_samples: vectors train has 4 samples, got 5"):
        keep_first(unlabeled, DataRequest(num_samples=5))


def test_check_split_names_the_split_and_the_set():
    check_split("validation", "power")
    with pytest.raises(ValueError, match=r"split: expected one of \('train', 'validation', 'test'\), got 'val'"):
        check_split("val", "power")
    with pytest.raises(ValueError, match=r"split: expected one of \('train', 'test'\) for digits, got 'validation'"):
        check_split("validation", "digits", ("train", "test"))
