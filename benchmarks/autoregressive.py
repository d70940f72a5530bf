"""Autoregressive flows: MAF density against sampling throughput, and the cost of a spline.

(a) A 5-layer MAF (MADEs of 2 hidden layers x 128, ActNorm between layers) at batch 256:
density evaluation (``forward``) is one MADE pass per layer, sampling (``inverse``) ``D``
passes per layer, so their throughput ratio should be about ``D``. Run it on a quiet
machine: with another process on the cores, torch's threads oversubscribe them and the
figures drop by up to 100x. (b) One
``RQSplineCoupling`` (8 bins) against one ``AffineCoupling`` of the same width (D = 64,
MLP conditioners 2 x 128, batch 256), forward and inverse: the NSF paper reports splines
adding 30-40% to a training step of a whole model; this is the cost of the layer alone.

    python benchmarks/autoregressive.py
"""

from __future__ import annotations

import pathlib
import sys
from functools import partial

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import flows  # noqa: E402
from benchmarks.timing import machine, median_seconds  # noqa: E402
from flows.nets import MLP  # noqa: E402
from models import MAF  # noqa: E402

BATCH = 256
# Sampling at D = 512 runs 5 x 512 MADE passes: one timed call (after one warm-up) suffices.
SAMPLING_REPEATS = {8: 5, 64: 3, 512: 1}


def _perturbed(module: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    """Moves zero-initialized layers off the identity, so every branch does real work."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * std)
    return module.eval()


def maf_throughput(features: int) -> tuple[float, float]:
    """Samples per second of a 5-layer MAF: ``(density, sampling)``."""
    model = MAF((features,), num_steps=5, hidden_features=128, num_blocks=1)
    x = torch.randn(BATCH, features)
    model.transform(x)  # ActNorm's data-dependent initialization
    transform = _perturbed(model).transform
    with torch.no_grad():
        z, _ = transform(x)
        density = median_seconds(lambda: transform(x), repeats=20)
        sampling = median_seconds(lambda: transform.inverse(z), repeats=SAMPLING_REPEATS[features])
    return BATCH / density, BATCH / sampling


def coupling_seconds(layer: flows.Flow, x: torch.Tensor) -> tuple[float, float]:
    """Median seconds of ``(forward, inverse)`` on ``x``."""
    layer = _perturbed(layer)
    with torch.no_grad():
        y, _ = layer(x)
        return median_seconds(lambda: layer(x), repeats=50), median_seconds(lambda: layer.inverse(y), repeats=50)


def main() -> None:
    torch.manual_seed(0)
    print(f"machine: {machine()}\n")
    print(f"(a) 5-layer MAF, MADE 2 x 128, batch {BATCH}: samples per second")
    print("| D | density (forward) | sampling (inverse) | density / sampling |")
    print("|---|---|---|---|")
    for features in (8, 64, 512):
        density, sampling = maf_throughput(features)
        print(f"| {features} | {density:,.0f} | {sampling:,.0f} | {density / sampling:,.0f} |")

    features = 64
    subnet = partial(MLP, hidden_features=128, num_blocks=1)
    x = torch.randn(BATCH, features) * 1.5
    affine = coupling_seconds(flows.AffineCoupling(features, subnet), x)
    spline = coupling_seconds(flows.RQSplineCoupling(features, subnet, num_bins=8), x)
    print(f"\n(b) one coupling layer, D = {features}, MLP 2 x 128, batch {BATCH}: milliseconds")
    print("| direction | AffineCoupling | RQSplineCoupling (8 bins) | spline / affine |")
    print("|---|---|---|---|")
    for name, a, s in zip(("forward", "inverse"), affine, spline):
        print(f"| {name} | {a * 1e3:.3f} | {s * 1e3:.3f} | {s / a:.2f} |")


if __name__ == "__main__":
    main()
