"""Pictures of a run: samples beside the data (a grid of images, or a scatter of the first
two features with labelled axes), the learned density beside the true one (2D, per class
for a class-conditional model), and the loss curve. Drawn with matplotlib's Agg backend;
no display needed. :func:`save_run_pictures` draws all of a run's."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import flows

from ..data.split import DataSplit, one_hot
from .evaluation import evaluating
from .files import writing
from .metrics_log import read_metrics
from .state import RunDir

__all__ = ["save_samples", "save_density", "save_class_densities", "save_loss_curve", "save_run_pictures"]


def _figure(ncols: int = 1, size: float = 4.0, share: bool = False, nrows: int = 1):
    """A matplotlib figure drawn by the Agg backend (no display, no pyplot state).

    Returns the figure and its axes: a row ``(ncols,)`` for one row, else ``(nrows, ncols)``.
    """
    from matplotlib.figure import Figure

    figure = Figure(figsize=(size * ncols, size * nrows), layout="constrained")
    axes = figure.subplots(nrows, ncols, squeeze=False, sharex=share, sharey=share)
    return figure, axes[0] if nrows == 1 else axes


def _class_context(labels: Tensor, num_classes: int, like: Tensor) -> Tensor:
    """One-hot rows of ``labels`` on ``like``'s device and dtype: a class-conditional model's context."""
    return one_hot(labels, num_classes).to(device=like.device, dtype=like.dtype)


@torch.no_grad()
def _samples(model: nn.Module, n: int, temperature: float, seed: int, labels: Tensor | None = None,
             num_classes: int | None = None, options: dict[str, Any] | None = None) -> Tensor:
    """``n`` samples drawn without touching the global RNG stream; sample ``i`` of class
    ``labels[i]`` when the model is class-conditional (then ``n == len(labels)``); ``options``:
    more keyword arguments of the model's ``sample`` (TarFlow's guidance and denoising)."""
    options = options or {}
    param = next(model.parameters())
    devices = [param.device] if param.device.type == "cuda" else []
    with evaluating(model), torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        if labels is None:
            x = model.sample(n, temperature=temperature, **options)
        else:  # one sample per context row
            x = model.sample(context=_class_context(labels, num_classes, param), temperature=temperature, **options)
    return x.float().cpu()


def _image_grid(x: Tensor, num_levels: int | None, pad: int = 1, cols: int | None = None) -> Tensor:
    """Images ``(N, C, H, W)`` tiled with ``pad`` grey pixels between them, in [0, 1],
    ``cols`` to a row (default: a square).

    Returns ``(rows * (H + pad), cols * (W + pad), C)``.
    """
    if num_levels is not None:
        x = x.floor().clamp(0, num_levels - 1) / (num_levels - 1)
    else:
        x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-12)
    n, c, h, w = x.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    x = torch.cat([x, torch.full((rows * cols - n, c, h, w), 0.5)])
    x = torch.nn.functional.pad(x, (0, pad, 0, pad), value=0.5)  # (N', C, H+pad, W+pad)
    grid = x.reshape(rows, cols, c, h + pad, w + pad).permute(0, 3, 1, 4, 2)  # (rows, H+pad, cols, W+pad, C)
    return grid.reshape(rows * (h + pad), cols * (w + pad), c)


def save_samples(
    model: nn.Module, path: str | Path, n: int = 64, temperature: float = 1.0, seed: int = 0,
    data: Tensor | None = None, points: int = 2000, num_classes: int | None = None,
    labels: Tensor | None = None, options: dict[str, Any] | None = None,
) -> None:
    """A PNG of samples beside ``data``: for images a grid of ``data``'s first ``n`` images
    beside a grid of ``n`` samples; for vectors a scatter of ``points`` of each (the first
    two features, axes ``x1`` and ``x2``; a histogram of one feature).

    With ``num_classes`` (a class-conditional model) the classes take turns: a row of
    images per class (the data's rows too), or points colored by class (the data's by ``labels``).
    ``options``: more keyword arguments of the model's ``sample``, named in the title.
    """
    images = len(model.in_shape) == 3
    per_class, sample_labels = None, None
    if images and num_classes:
        per_class = math.ceil(n / num_classes)
        sample_labels = torch.arange(num_classes).repeat_interleave(per_class)  # row k: class k
    elif num_classes:
        sample_labels = torch.arange(points) % num_classes
    count = len(sample_labels) if sample_labels is not None else (n if images else points)
    x = _samples(model, count, temperature, seed, sample_labels, num_classes, options)
    named = "".join(f", {k} {v}" for k, v in (options or {}).items() if v)
    title = f"samples, T = {temperature}{named}" + (", a row per class" if per_class else "")
    if images:
        panels = [] if data is None else [("data", _data_images(data, labels, count, per_class, num_classes))]
        figure, axes = _figure(ncols=len(panels) + 1)
        for ax, (name, values) in zip(axes, [*panels, (title, x)], strict=True):
            grid = _image_grid(values, getattr(model, "num_levels", None), cols=per_class)
            ax.imshow(grid.squeeze(-1).numpy(), cmap="gray" if grid.shape[-1] == 1 else None, vmin=0, vmax=1,
                      interpolation="nearest")
            ax.set_axis_off()
            ax.set_title(name)
    else:
        panels = [(title, x, sample_labels)]
        if data is not None:
            panels.insert(0, ("data", data[:points].float().cpu(), None if labels is None else labels[:points]))
        figure, axes = _figure(ncols=len(panels), share=True)
        for ax, (name, values, colors) in zip(axes, panels, strict=True):
            _scatter(ax, values, colors, num_classes)
            ax.set_title(name)
    _save(figure, path)


def _data_images(data: Tensor, labels: Tensor | None, count: int, per_class: int | None,
                 num_classes: int | None) -> Tensor:
    """The first ``count`` images of ``data``, or with ``per_class`` the first ``per_class`` of each class."""
    if per_class is None or labels is None:
        return data[:count].float().cpu()
    rows = []
    for k in range(num_classes):
        found = data[labels == k][:per_class].float().cpu()
        blank = torch.zeros(per_class - len(found), *data.shape[1:])  # a class with fewer images: black
        rows.append(torch.cat([found, blank]))
    return torch.cat(rows)


def _scatter(ax: Any, values: Tensor, colors: Tensor | None, num_classes: int | None) -> None:
    """Points of the first two features on axes ``x1`` and ``x2``, or a histogram of a single feature."""
    if values.shape[1] == 1:
        ax.hist(values[:, 0].numpy(), bins=50, density=True)
        ax.set_xlabel("x1")
        ax.set_ylabel("density")
        return
    color = {} if colors is None or num_classes is None else dict(
        c=colors.numpy(), cmap="tab10", vmin=0, vmax=max(num_classes - 1, 1))
    ax.scatter(values[:, 0].numpy(), values[:, 1].numpy(), s=1, alpha=0.4, **color)
    ax.set_xlabel("x1")
    ax.set_ylabel("x2")
    ax.set_aspect("equal" if values.shape[1] == 2 else "auto")


def _save(figure: Any, path: str | Path) -> None:
    with writing(path):
        figure.savefig(path, dpi=120)


def _plane(data: Tensor, resolution: int) -> tuple[Tensor, tuple[float, float, float, float]]:
    """A ``resolution``-squared grid of points ``(R*R, 2)`` around ``data`` and its extent."""
    low, high = data.float().quantile(0.001, dim=0), data.float().quantile(0.999, dim=0)
    margin = 0.1 * (high - low)
    low, high = (low - margin).tolist(), (high + margin).tolist()
    axes_x = torch.linspace(low[0], high[0], resolution)
    axes_y = torch.linspace(low[1], high[1], resolution)
    grid = torch.stack(torch.meshgrid(axes_x, axes_y, indexing="xy"), -1).reshape(-1, 2)  # (R*R, 2)
    return grid, (low[0], high[0], low[1], high[1])


@torch.no_grad()
def _learned_log_prob(model: nn.Module, grid: Tensor, label: int | None = None,
                      num_classes: int | None = None) -> Tensor:
    """The model's ``log p(x)`` (or ``log p(x | label)``) on ``grid``, in eval mode, on the CPU."""
    param = next(model.parameters())
    parts = []
    with evaluating(model):
        for g in grid.split(4096):
            context = None if label is None else _class_context(torch.full((len(g),), label), num_classes, param)
            parts.append(model.log_prob(g.to(param.device, param.dtype), context).cpu())
    return torch.cat(parts)


def _draw_density(ax: Any, log_p: Tensor, extent: tuple[float, ...], resolution: int, title: str) -> None:
    image = log_p.double().exp().reshape(resolution, resolution).numpy()
    ax.imshow(image, origin="lower", extent=extent, cmap="viridis")
    ax.set_xlabel("x1")
    ax.set_ylabel("x2")
    ax.set_title(title)


def save_density(
    model: nn.Module, path: str | Path, data: Tensor, true_log_prob: Callable[[Tensor], Tensor] | None = None,
    resolution: int = 200,
) -> None:
    """A PNG of a 2D model's density on a grid around ``data``, beside the true density if given."""
    grid, extent = _plane(data, resolution)
    panels = [("learned density", _learned_log_prob(model, grid))]
    if true_log_prob is not None:
        panels.append(("true density", true_log_prob(grid.to(torch.float64)).cpu()))
    figure, axes = _figure(ncols=len(panels))
    for ax, (title, log_p) in zip(axes, panels, strict=True):
        _draw_density(ax, log_p, extent, resolution, title)
    _save(figure, path)


def save_class_densities(
    model: nn.Module, path: str | Path, data: Tensor, num_classes: int,
    true_log_prob_given: Callable[[Tensor, Tensor], Tensor] | None = None, resolution: int = 120,
) -> None:
    """A PNG of a class-conditional 2D model: a column per class, its learned ``p(x | class)``
    above the true one if given (the model's context is the one-hot class)."""
    grid, extent = _plane(data, resolution)
    rows = 1 if true_log_prob_given is None else 2
    figure, axes = _figure(ncols=num_classes, size=2.5, nrows=rows)
    axes = axes.reshape(rows, num_classes)
    for k in range(num_classes):
        _draw_density(axes[0, k], _learned_log_prob(model, grid, k, num_classes), extent, resolution,
                      f"learned, class {k}")
        if true_log_prob_given is not None:
            truth = true_log_prob_given(grid.to(torch.float64), torch.full((len(grid),), k)).cpu()
            _draw_density(axes[1, k], truth, extent, resolution, f"true, class {k}")
    _save(figure, path)


def save_loss_curve(records: list[dict[str, Any]], path: str | Path) -> None:
    """A PNG of training bits/dim per step, with test bits/dim where evaluated.

    Training records without bits/dim (a gradient-only surrogate loss, no likelihood) are
    left out, and the title says so; estimated ones are labelled as estimates.
    """
    figure, (ax,) = _figure(size=5.0)
    train = [r for r in records if r["split"] == "train" and "bits_per_dim" in r]
    test = [r for r in records if r["split"] == "test"]
    estimated = any(r.get("logdet_mode") == "estimate" for r in train)
    ax.plot([r["step"] for r in train], [r["bits_per_dim"] for r in train],
            label="train (estimate)" if estimated else "train")
    if any(r["split"] == "train" and "surrogate_loss" in r for r in records):
        ax.set_title("training loss: a gradient surrogate, no likelihood (not drawn)")
    if test:
        ax.plot([r["step"] for r in test], [r["bits_per_dim"] for r in test], "o-", label="test")
    ax.set_xlabel("step")
    ax.set_ylabel("bits / dim")
    ax.legend()
    _save(figure, path)


def save_run_pictures(model: nn.Module, run: RunDir, train: DataSplit, test: DataSplit, *, conditional: bool,
                      num_samples: int, temperature: float, seed: int, logdet_mode: str | None = None,
                      sample_options: dict[str, Any] | None = None) -> list[Path]:
    """A run's pictures: samples beside the data, the learned density of 2D data, the loss curve.

    ``logdet_mode``: the mode of a free-form model's layers for the learned density (as
    for evaluation; ``None``: the model as it is). ``sample_options``: see :func:`save_samples`.
    Returns the paths written.
    """
    with contextlib.nullcontext() if logdet_mode is None else flows.logdet_mode(model, logdet_mode):
        return _run_pictures(model, run, train, test, conditional, num_samples, temperature, seed, sample_options)


def _run_pictures(model: nn.Module, run: RunDir, train: DataSplit, test: DataSplit, conditional: bool,
                  num_samples: int, temperature: float, seed: int, options: dict[str, Any] | None) -> list[Path]:
    classes = train.num_classes if conditional else None
    save_samples(model, run.samples, num_samples, temperature, seed, train.data, num_classes=classes,
                 labels=train.labels, options=options)
    written = [run.samples]
    if train.kind == "toy2d" and classes:
        save_class_densities(model, run.density, train.data, classes, test.density.log_prob_given)
        written.append(run.density)
    elif train.kind == "toy2d":
        save_density(model, run.density, train.data, test.density.log_prob)
        written.append(run.density)
    if run.metrics.exists():
        save_loss_curve(read_metrics(run.metrics), run.loss)
        written.append(run.loss)
    return written
