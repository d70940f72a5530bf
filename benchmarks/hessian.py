"""Per-sample Hessians of log p: ``flows.derivatives.hessian`` against the tutorial loop.

A D=64 flow (ActNorm, 1x1 linear map, affine and spline couplings with MLP conditioners
of 128 units, four steps), batch 16, float32. The loop is the row-by-row double
backward that tutorials show: per sample, the score with ``create_graph``, then one
``autograd.grad`` per score entry (B * D = 1024 backward passes). ``hessian`` is D
forward-over-reverse Hessian-vector products, batched over the samples and vmapped over
the D directions (one call). Interleaved rounds, median of the per-round ratio. Target:
at least 20x faster.

    python benchmarks/hessian.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time
from functools import partial

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import flows  # noqa: E402
from benchmarks.timing import machine  # noqa: E402
from flows.derivatives import hessian  # noqa: E402
from flows.nets import MLP  # noqa: E402

D, BATCH = 64, 16


def flow_distribution() -> flows.FlowDistribution:
    torch.manual_seed(0)
    net = partial(MLP, hidden_features=128)
    layers: list[flows.Flow] = []
    for i in range(4):
        coupling = flows.AffineCoupling(D, net, parity=i % 2) if i % 2 == 0 else flows.RQSplineCoupling(D, net, parity=1)
        layers += [flows.ActNorm(D), flows.InvConv1x1(D), coupling]
    dist = flows.FlowDistribution(flows.Sequential(*layers), flows.StandardNormal(D))
    dist.log_prob(torch.randn(256, D))  # ActNorm's initialization
    with torch.no_grad():
        for p in dist.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return dist.eval()


def tutorial_loop(dist: flows.FlowDistribution, x: torch.Tensor) -> torch.Tensor:
    """Per sample, per score entry: one double-backward ``autograd.grad``."""
    hessians = []
    for i in range(x.shape[0]):
        xi = x[i : i + 1].clone().requires_grad_(True)
        (gradient,) = torch.autograd.grad(dist.log_prob(xi).sum(), xi, create_graph=True)
        rows = [torch.autograd.grad(gradient[0, k], xi, retain_graph=True)[0][0] for k in range(D)]
        hessians.append(torch.stack(rows))
    return torch.stack(hessians)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    rounds = parser.parse_args().rounds
    dist = flow_distribution()
    x = torch.randn(BATCH, D)
    fast, slow = hessian(dist, x).detach(), tutorial_loop(dist, x).detach()
    error = float((fast - slow).abs().max() / slow.abs().max())
    times: dict[str, list[float]] = {"hessian": [], "loop": []}
    for _ in range(rounds):
        for name, fn in (("hessian", lambda: hessian(dist, x)), ("loop", lambda: tutorial_loop(dist, x))):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    ratios = sorted(s / f for f, s in zip(times["hessian"], times["loop"]))
    print(f"machine: {machine()}")
    print(f"D={D}, batch {BATCH}, float32; relative difference of the two Hessians {error:.1e}")
    for name, values in times.items():
        print(f"{name:8s} median {statistics.median(values) * 1e3:8.1f} ms  (min {min(values) * 1e3:.1f}, "
              f"max {max(values) * 1e3:.1f})")
    print(f"speed-up: median {statistics.median(ratios):.1f}x over {rounds} interleaved rounds "
          f"(min {ratios[0]:.1f}x, max {ratios[-1]:.1f}x); target >= 20x")


if __name__ == "__main__":
    main()
