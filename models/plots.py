"""Pictures of a run: a grid of samples, the learned density beside the true one (2D),
and the loss curve. Drawn with matplotlib's Agg backend; no display needed."""

from __future__ import annotations

import math

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["save_samples", "save_density", "save_loss_curve"]


def _figure(ncols: int = 1, size: float = 4.0, share: bool = False):
    """A matplotlib figure drawn by the Agg backend (no display, no pyplot state)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(size * ncols, size), layout="constrained")
    return figure, figure.subplots(1, ncols, squeeze=False, sharex=share, sharey=share)[0]


@torch.no_grad()
def _samples(model: nn.Module, n: int, temperature: float, seed: int) -> Tensor:
    """``n`` samples drawn without touching the global RNG stream."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        x = model.sample(n, temperature=temperature)
    model.train(was_training)
    return x.float().cpu()


def _image_grid(x: Tensor, num_levels: int | None, pad: int = 1) -> Tensor:
    """Images ``(N, C, H, W)`` tiled with ``pad`` grey pixels between them, in [0, 1].

    Returns ``(rows * (H + pad), cols * (W + pad), C)``.
    """
    if num_levels is not None:
        x = x.floor().clamp(0, num_levels - 1) / (num_levels - 1)
    else:
        x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-12)
    n, c, h, w = x.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    x = torch.cat([x, torch.full((rows * cols - n, c, h, w), 0.5)])
    x = torch.nn.functional.pad(x, (0, pad, 0, pad), value=0.5)  # (N', C, H+pad, W+pad)
    grid = x.reshape(rows, cols, c, h + pad, w + pad).permute(0, 3, 1, 4, 2)  # (rows, H+pad, cols, W+pad, C)
    return grid.reshape(rows * (h + pad), cols * (w + pad), c)


def save_samples(
    model: nn.Module, path: str | Path, n: int = 64, temperature: float = 1.0, seed: int = 0,
    data: Tensor | None = None, points: int = 2000,
) -> None:
    """A PNG of samples: a grid of ``n`` images, or for vectors a scatter of ``points`` samples'
    first two features beside as many of ``data``'s."""
    x = _samples(model, n if len(model.in_shape) == 3 else points, temperature, seed)
    if x.dim() == 4:
        figure, (ax,) = _figure()
        grid = _image_grid(x, getattr(model, "num_levels", None))
        ax.imshow(grid.squeeze(-1).numpy(), cmap="gray" if grid.shape[-1] == 1 else None, vmin=0, vmax=1,
                  interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(f"samples, T = {temperature}")
    else:
        panels = [(f"samples, T = {temperature}", x)]
        if data is not None:
            panels.append(("data", data[:points].float().cpu()))
        figure, axes = _figure(ncols=len(panels), share=True)
        for ax, (title, values) in zip(axes, panels, strict=True):
            ax.scatter(values[:, 0].numpy(), values[:, 1].numpy(), s=1, alpha=0.4)
            ax.set_title(title)
            ax.set_aspect("equal")
    figure.savefig(path, dpi=120)


@torch.no_grad()
def save_density(
    model: nn.Module, path: str | Path, data: Tensor, true_log_prob: Callable[[Tensor], Tensor] | None = None,
    resolution: int = 200,
) -> None:
    """A PNG of a 2D model's density on a grid around ``data``, beside the true density if given."""
    low, high = data.float().quantile(0.001, dim=0), data.float().quantile(0.999, dim=0)
    margin = 0.1 * (high - low)
    low, high = (low - margin).tolist(), (high + margin).tolist()
    axes_x = torch.linspace(low[0], high[0], resolution)
    axes_y = torch.linspace(low[1], high[1], resolution)
    grid = torch.stack(torch.meshgrid(axes_x, axes_y, indexing="xy"), -1).reshape(-1, 2)  # (R*R, 2)
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    learned = torch.cat([model.log_prob(g.to(param.device, param.dtype)).cpu() for g in grid.split(4096)])
    model.train(was_training)
    panels = [("learned density", learned)]
    if true_log_prob is not None:
        panels.append(("true density", true_log_prob(grid.to(torch.float64)).cpu()))
    figure, axes = _figure(ncols=len(panels))
    for ax, (title, log_p) in zip(axes, panels, strict=True):
        image = log_p.double().exp().reshape(resolution, resolution).numpy()
        ax.imshow(image, origin="lower", extent=(low[0], high[0], low[1], high[1]), cmap="viridis")
        ax.set_title(title)
    figure.savefig(path, dpi=120)


def save_loss_curve(records: list[dict[str, Any]], path: str | Path) -> None:
    """A PNG of training bits/dim per step, with test bits/dim where evaluated."""
    figure, (ax,) = _figure(size=5.0)
    train = [r for r in records if r["split"] == "train"]
    test = [r for r in records if r["split"] == "test"]
    ax.plot([r["step"] for r in train], [r["bits_per_dim"] for r in train], label="train")
    if test:
        ax.plot([r["step"] for r in test], [r["bits_per_dim"] for r in test], "o-", label="test")
    ax.set_xlabel("step")
    ax.set_ylabel("bits / dim")
    ax.legend()
    figure.savefig(path, dpi=120)
