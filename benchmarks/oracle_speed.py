"""Oracle speed: exact per-sample Jacobians of a D=192 Glow-style flow (3x8x8), batch 16.

Compares ``flows.jacobian.jacobian`` (vmap over jacrev) with the row-by-row
``torch.autograd.grad`` loop that tutorials show. Target: at least 10x faster.

    python benchmarks/oracle_speed.py
"""

from __future__ import annotations

import pathlib
import statistics
import sys
from functools import partial

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import flows  # noqa: E402
from benchmarks.timing import machine, median_seconds  # noqa: E402
from flows.jacobian import jacobian  # noqa: E402
from flows.nets import GlowConvNet  # noqa: E402


def glow_stack(channels: int = 3, depth: int = 4) -> flows.Flow:
    """Squeeze, ``depth`` Glow steps on 12 channels, unsqueeze: a 3x8x8 -> 3x8x8 bijection."""
    c = channels * 4
    steps = []
    for i in range(depth):
        steps += [flows.ActNorm(c), flows.InvConv1x1(c), flows.AffineCoupling(c, partial(GlowConvNet, hidden_features=32), parity=i % 2)]
    return flows.Sequential(flows.Squeeze(), *steps, flows.Inverse(flows.Squeeze()))


def rows_over_batch(flow: flows.Flow, x: torch.Tensor) -> torch.Tensor:
    """The tutorial loop: one ``autograd.grad`` per output entry, summed over the batch
    (valid because samples are independent): ``D`` backward passes of batch ``B``."""
    x = x.clone().requires_grad_(True)
    y = flow(x)[0].reshape(x.shape[0], -1)
    rows = [torch.autograd.grad(y[:, i].sum(), x, retain_graph=True)[0].reshape(x.shape[0], -1) for i in range(y.shape[1])]
    return torch.stack(rows, dim=1)


def row_by_row(flow: flows.Flow, x: torch.Tensor) -> torch.Tensor:
    """The naive loop: one ``autograd.grad`` per output entry and sample (``B*D`` passes)."""
    rows = []
    for b in range(x.shape[0]):
        xb = x[b : b + 1].clone().requires_grad_(True)
        y = flow(xb)[0].reshape(-1)
        rows.append(torch.stack([torch.autograd.grad(y[i], xb, retain_graph=True)[0].reshape(-1) for i in range(y.numel())]))
    return torch.stack(rows)


def main() -> None:
    torch.manual_seed(0)
    flow = glow_stack().double()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(16, 3, 8, 8, dtype=torch.float64)
    flow(x)
    flow.eval()
    fast = jacobian(flow, x)
    loops = {"autograd.grad per output row, batch summed": rows_over_batch,
             "autograd.grad per output row and sample": row_by_row}
    errors = {name: float((loop(flow, x) - fast).abs().max()) for name, loop in loops.items()}
    # Interleave the methods so that drifts in machine load (a shared VM) hit all alike;
    # the speed-up is the median over rounds of the ratio measured within a round.
    rounds: list[dict[str, float]] = []
    for _ in range(5):
        times = {"fast": median_seconds(lambda: jacobian(flow, x), repeats=3)}
        times.update({name: median_seconds(lambda: loop(flow, x), repeats=1, warmup=0) for name, loop in loops.items()})
        rounds.append(times)
    print(f"machine: {machine()}")
    print(f"D=192, batch 16, float64: flows.jacobian.jacobian {statistics.median(r['fast'] for r in rounds):.3f} s")
    for name in loops:
        seconds = statistics.median(r[name] for r in rounds)
        ratio = statistics.median(r[name] / r["fast"] for r in rounds)
        print(f"  {name}: {seconds:.3f} s, flows.jacobian is {ratio:.1f}x faster (max |diff| {errors[name]:.1e})")


if __name__ == "__main__":
    main()
