"""Reconstruction drift of memory-saving backpropagation over depth, float32 and bf16.

Glow on 3x32x32 (3 levels, hidden 128, batch 32) trained for ``--train-steps`` Adam steps
(lr warmed up linearly to 1e-3) on synthetic smooth images (4x4 noise upsampled, in levels [0, 256)), so that it
is no longer the near-identity of its initialization. For K steps per level, one backward pass
with ``flows.invertible_backprop`` and a ``DriftMonitor``, against ordinary
backpropagation in the same precision:

- drift: the monitor's ``max |x_rebuilt - x|`` over the inputs of all runs of steps
  (the flow's activations are O(1) after ActNorm);
- grad error: ``|g_saving - g_ordinary| / |g_ordinary|`` over all parameters (2-norms);
- for bf16 autocast, the same error of ordinary bf16 against float32, for scale.

    python benchmarks/invertible_drift.py [--depths 8 16 32 64] [--train-steps 30] [--max-run-length 32]
"""

from __future__ import annotations

import argparse
import copy
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.timing import machine  # noqa: E402
from flows.reversible import DriftMonitor, invertible_backprop  # noqa: E402
from models import Glow  # noqa: E402


def gradient(model: Glow, x: torch.Tensor, amp: bool) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        loss = -model.log_prob(x).mean()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def smooth_images(n: int) -> torch.Tensor:
    low = torch.rand(n, 3, 4, 4)
    x = torch.nn.functional.interpolate(low, size=(32, 32), mode="bilinear", align_corners=False)
    return ((x + 0.05 * torch.rand(n, 3, 32, 32)) / 1.05 * 256).clamp(0, 255.99)


def trained_glow(depth: int, steps: int) -> tuple[Glow, torch.Tensor]:
    torch.manual_seed(0)
    model = Glow((3, 32, 32), 256, num_scales=3, num_steps=depth, hidden_features=128)
    data = smooth_images(32 * (steps + 1))
    with torch.no_grad():
        model.log_prob(data[:32])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(steps):
        for group in optimizer.param_groups:  # Glow's linear warm-up (here over all the steps)
            group["lr"] = 1e-3 * (step + 1) / steps
        optimizer.zero_grad(set_to_none=True)
        (-model.log_prob(data[32 * (step + 1) : 32 * (step + 2)]).mean()).backward()
        optimizer.step()
    return model, data[:32]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--train-steps", type=int, default=30)
    parser.add_argument("--max-run-length", type=int, default=32, help="invertible_backprop's max_run_length (0: none)")
    args = parser.parse_args()
    print(f"Glow (3, 32, 32), 3 levels, hidden 128, batch 32, trained {args.train_steps} steps, "
          f"max_run_length={args.max_run_length}; {machine()}")
    print(f"{'K':>4} {'fp32 drift':>11} {'fp32 grad err':>14} {'bf16 drift':>11} {'bf16 grad err':>14} "
          f"{'bf16 vs fp32 (ordinary)':>24}")
    for depth in args.depths:
        model, x = trained_glow(depth, args.train_steps)
        row = [f"{depth:>4}"]
        reference = gradient(model, x, amp=False)
        for amp in (False, True):
            monitor = DriftMonitor()
            saving = invertible_backprop(
                copy.deepcopy(model), monitor=monitor, max_run_length=args.max_run_length or None
            )
            ordinary = gradient(model, x, amp) if amp else reference
            error = relative(gradient(saving, x, amp), ordinary)
            row += [f"{monitor.read():11.2e}", f"{error:14.2e}"]
            if amp:
                row.append(f"{relative(ordinary, reference):24.2e}")
        print(" ".join(row), flush=True)


if __name__ == "__main__":
    main()
