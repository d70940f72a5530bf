"""Tests of models/training/plots.py: every picture of a run is drawn."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models import build_model, training
from models.training import plots

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


def captured(monkeypatch: pytest.MonkeyPatch) -> list:
    """The figures save_* draw, instead of their PNG files."""
    figures = []
    monkeypatch.setattr(plots, "_save", lambda figure, path: figures.append(figure))
    return figures


def test_an_image_run_shows_real_data_beside_the_samples(monkeypatch: pytest.MonkeyPatch) -> None:
    figures = captured(monkeypatch)
    data = torch.randint(0, 17, (30, 1, 4, 4)).float()
    training.save_samples(StandIn((1, 4, 4), 17), "s.png", n=9, data=data)
    training.save_samples(StandIn((1, 4, 4), 17, context_features=3), "c.png", n=6, data=data, num_classes=3,
                          labels=torch.arange(30) % 3)
    training.save_samples(StandIn((1, 4, 4), 17), "alone.png", n=9)  # no data given: the samples alone
    titles = [[ax.get_title() for ax in figure.axes] for figure in figures]
    assert titles == [["data", "samples, T = 1.0"], ["data", "samples, T = 1.0, a row per class"],
                      ["samples, T = 1.0"]]
    shown = figures[0].axes[0].get_images()[0].get_array()
    assert shown.shape == (3 * 5, 3 * 5)  # 9 data images of 4x4 with a pixel of padding, 3 to a row
    expected = plots._image_grid(data[:9], 17, cols=3).squeeze(-1).numpy()
    assert (shown == expected).all()  # the data's own first images, not samples
    per_class = figures[1].axes[0].get_images()[0].get_array()
    rows = plots._image_grid(torch.cat([data[torch.arange(30) % 3 == k][:2] for k in range(3)]), 17, cols=2)
    assert (per_class == rows.squeeze(-1).numpy()).all()  # row k: images of class k


def test_scatter_plots_label_their_axes_and_show_the_data(monkeypatch: pytest.MonkeyPatch) -> None:
    figures = captured(monkeypatch)
    training.save_samples(StandIn((3,)), "s.png", data=torch.randn(50, 3), points=40)
    training.save_samples(build_model("maf", "small", (1,)), "h.png", data=torch.randn(50, 1), points=40)
    training.save_density(StandIn((2,)), "d.png", torch.randn(50, 2), lambda g: -g.pow(2).sum(1), resolution=8)
    scatter, histogram, density = figures
    assert [ax.get_title() for ax in scatter.axes] == ["data", "samples, T = 1.0"]
    assert [(ax.get_xlabel(), ax.get_ylabel()) for ax in scatter.axes] == [("x1", "x2")] * 2
    assert [len(ax.collections[0].get_offsets()) for ax in scatter.axes] == [40, 40]
    assert [(ax.get_xlabel(), ax.get_ylabel()) for ax in histogram.axes] == [("x1", "density")] * 2
    assert [(ax.get_xlabel(), ax.get_ylabel()) for ax in density.axes] == [("x1", "x2")] * 2


def test_the_loss_curve_never_draws_a_surrogate_as_bits_per_dim(monkeypatch: pytest.MonkeyPatch) -> None:
    figures = captured(monkeypatch)
    records = [{"split": "train", "step": 1, "surrogate_loss": -40.0, "logdet_mode": "gradient"},
               {"split": "test", "step": 1, "bits_per_dim": 2.1}]
    training.save_loss_curve(records, "l.png")
    (ax,) = figures[0].axes
    assert "gradient surrogate" in ax.get_title() and [len(line.get_xdata()) for line in ax.lines] == [0, 1]
    training.save_loss_curve([{"split": "train", "step": 1, "bits_per_dim": 2.0, "logdet_mode": "estimate"}], "l.png")
    assert [t.get_text() for t in figures[1].axes[0].get_legend().get_texts()] == ["train (estimate)"]


def test_sample_options_reach_the_model_and_the_title(monkeypatch: pytest.MonkeyPatch) -> None:
    figures, calls = captured(monkeypatch), []
    model = StandIn((1, 4, 4), 17, context_features=2)
    sample = model.sample
    monkeypatch.setattr(model, "sample", lambda *args, guidance, denoise, **kwargs: (
        calls.append((guidance, denoise)), sample(*args, **kwargs))[1])
    training.save_samples(model, "s.png", n=4, num_classes=2, options={"guidance": 2.0, "denoise": False})
    assert calls == [(2.0, False)]
    assert figures[0].axes[0].get_title() == "samples, T = 1.0, guidance 2.0, a row per class"
