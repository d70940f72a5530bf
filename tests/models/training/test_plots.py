"""Tests of models/training/plots.py: every picture of a run is drawn."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models import training

from .standins import StandIn, vector_data


def test_pictures(tmp_path: Path) -> None:
    model = StandIn((2,))
    data = vector_data(100)[:, :2]
    training.save_samples(model, tmp_path / "s.png", n=50, data=data)
    training.save_density(model, tmp_path / "d.png", data, lambda g: -0.5 * g.pow(2).sum(1), resolution=20)
    training.save_samples(StandIn((1, 4, 4), 17), tmp_path / "i.png", n=10)
    conditional = StandIn((2,), context_features=3)
    labels = torch.arange(100) % 3
    training.save_samples(conditional, tmp_path / "cs.png", data=data, num_classes=3, labels=labels, points=90)
    training.save_class_densities(conditional, tmp_path / "cd.png", data, 3,
                               lambda g, k: -0.5 * (g - k[:, None]).pow(2).sum(1), resolution=20)
    training.save_samples(StandIn((1, 4, 4), 17, context_features=10), tmp_path / "ci.png", n=25, num_classes=10)
    records = [{"split": "train", "step": 1, "bits_per_dim": 2.0}, {"split": "test", "step": 1, "bits_per_dim": 2.1}]
    training.save_loss_curve(records, tmp_path / "l.png")
    assert all((tmp_path / f).stat().st_size > 1000 for f in ("s.png", "d.png", "i.png", "l.png", "cs.png", "cd.png",
                                                              "ci.png"))


def test_a_failed_picture_leaves_the_model_in_training_mode(tmp_path: Path) -> None:
    model = StandIn((2,), context_features=3)  # sampling without the context it needs fails
    with pytest.raises(ValueError, match="context"):
        training.save_samples(model, tmp_path / "s.png", points=10)
    with pytest.raises(ValueError, match="context"):
        training.save_density(model, tmp_path / "d.png", vector_data(100)[:, :2], resolution=4)
    assert model.training and not (tmp_path / "s.png").exists()
