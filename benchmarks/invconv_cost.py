"""1x1 convolution: cost of the logdet and of the inverse, LU against full, per channel count.

The LU logdet is ``sum(log_s)``, O(C); the full one is ``slogdet(W)``, O(C^3). The inverse
needs ``W^-1``: two triangular solves for LU, a dense inverse for full.

    python benchmarks/invconv_cost.py
"""

from __future__ import annotations

import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import flows  # noqa: E402
from benchmarks.timing import machine, median_seconds  # noqa: E402


def logdet_seconds(conv: flows.InvConv1x1) -> float:
    if conv.lu:
        return median_seconds(lambda: conv.log_s.sum(), repeats=200)
    return median_seconds(lambda: torch.linalg.slogdet(conv.weight), repeats=50)


def main() -> None:
    print(f"machine: {machine()}")
    print("| C | LU logdet (us) | full logdet (us) | LU W^-1 from parameters (us) | full W^-1 (us) | inverse pass, batch 16x16x16 (ms) LU / full |")
    print("|---|---|---|---|---|---|")
    for channels in (16, 64, 256, 512):
        row = [str(channels)]
        convs = {lu: flows.InvConv1x1(channels, lu=lu, seed=0) for lu in (True, False)}
        row += [f"{logdet_seconds(convs[lu]) * 1e6:.1f}" for lu in (True, False)]
        with torch.no_grad():
            row += [f"{median_seconds(lambda c=convs[lu]: c._compute(inverse=True), repeats=20) * 1e6:.0f}" for lu in (True, False)]
            y = torch.randn(16, channels, 16, 16)
            inverse = [median_seconds(lambda c=convs[lu]: c.inverse(y), repeats=5) * 1e3 for lu in (True, False)]
        row.append(f"{inverse[0]:.1f} / {inverse[1]:.1f}")
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
