"""Memory-saving backpropagation (``flows.invertible_backprop``) on Glow: memory and time.

One training step of Glow on 3x32x32 (3 levels, hidden 128, batch 32, synthetic levels in
[0, 256)): ``zero_grad``, ``-log_prob(x).mean()``, backward, Adam step; for K = 4, 8, 16,
32 steps per level, with and without the memory saving.

Memory: each (K, mode) in a fresh process. The model is built, ActNorm initialized, and
Adam's state allocated (one step on zero gradients) before the measured step, so the step's
growth is its activations and parameter gradients. Two measures of the same step:
``allocated``: the peak of the bytes live in torch's CPU allocator during the step over
those live at its start (replayed from the profiler's memory events: exact, allocator
independent); ``rss``: peak resident set size during the step (``ru_maxrss``) over the
resident size before it (includes what oneDNN allocates itself, and the heap kept by
train.py's host-memory setting). Growth per K is the least-squares slope over K.
On CUDA ``torch.cuda.max_memory_allocated`` is used instead.

Budget: the deepest K whose whole process (peak RSS, or on CUDA the peak allocated) fits
``--budget-gb``, from the linear fit of the peak over K; ``--verify`` runs that K.

Time: one process, both models with the same weights, steps interleaved (the order
swapped every round): the median of the per-round ratios over ``--rounds`` with min-max,
and the ratio of the two fastest steps (the least disturbed by other processes); and the
ordinary loss's forward pass over the ordinary step ("forward share"), since rebuilding
re-runs every forward pass, the floor of the ratio is 1 + that share.

    python benchmarks/invertible_memory.py [--depths 4 8 16 32] [--time-depths 8 32] [--rounds 7]
        [--budget-gb 2] [--verify] [--device cpu] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.timing import machine  # noqa: E402
from flows.reversible import invertible_backprop  # noqa: E402
from models import Glow  # noqa: E402
from models.training.allocator import reuse_freed_memory  # noqa: E402

SHAPE, BATCH, SCALES, HIDDEN = (3, 32, 32), 32, 3, 128
MB = 2**20


def setup(depth: int, saving: bool, device: torch.device) -> tuple[Glow, torch.Tensor, torch.optim.Optimizer]:
    """The model (ActNorm initialized), a batch, and Adam with its state allocated."""
    torch.manual_seed(0)
    model = Glow(SHAPE, 256, num_scales=SCALES, num_steps=depth, hidden_features=HIDDEN).to(device)
    x = torch.rand(BATCH, *SHAPE, device=device) * 256
    with torch.no_grad():
        model.log_prob(x)
    if saving:
        model = invertible_backprop(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # zero gradients: the state is allocated, the parameters stay
    optimizer.zero_grad(set_to_none=True)
    return model, x, optimizer


def train_step(model: Glow, x: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad(set_to_none=True)
    (-model.log_prob(x).mean()).backward()
    optimizer.step()


def forward_pass(model: Glow, x: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
    """The loss alone, recorded for autograd but not backpropagated: what a re-run repeats."""
    (-model.log_prob(x).mean()).detach()


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / MB


def _peak_allocated_mb(events) -> float:
    """Peak of the running sum of the profiler's CPU memory events (bytes, + alloc / - free)."""
    live = peak = 0
    for nbytes in (e.nbytes() for e in sorted(events, key=lambda e: e.start_ns())):
        live += nbytes
        peak = max(peak, live)
    return peak / MB


def measure(depth: int, saving: bool, device: torch.device) -> dict[str, float]:
    """One process's figures for one step: growth (allocated and RSS, or CUDA) and whole-process peak."""
    model, x, optimizer = setup(depth, saving, device)
    params = sum(p.numel() for p in model.parameters())
    if device.type == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        train_step(model, x, optimizer)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return dict(allocated=(peak - start) / MB, total=peak / MB, params=params)
    before = _rss_mb()
    train_step(model, x, optimizer)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    from torch.profiler import ProfilerActivity, profile

    optimizer.zero_grad(set_to_none=True)  # frees of blocks from before the profiler go unseen
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train_step(model, x, optimizer)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    return dict(allocated=_peak_allocated_mb(events), rss=peak_rss - before, total=peak_rss, params=params)


def in_fresh_process(depth: int, saving: bool, device: str) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", str(depth), str(int(saving)), "--device", device,
               "--threads", str(torch.get_num_threads())]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def slope(depths: list[int], values: list[float]) -> tuple[float, float]:
    """Least-squares ``(intercept, slope)``."""
    mean_k, mean_v = statistics.fmean(depths), statistics.fmean(values)
    b = sum((k - mean_k) * (v - mean_v) for k, v in zip(depths, values)) / sum((k - mean_k) ** 2 for k in depths)
    return mean_v - b * mean_k, b


def memory_table(depths: list[int], device: str, budget_gb: float, verify: bool) -> None:
    print(f"\nPeak memory of one training step over the memory before it, MB ({device}; each in a fresh process)")
    keys = ["allocated", "rss"] if device == "cpu" else ["allocated"]
    rows = {saving: [in_fresh_process(k, saving, device) for k in depths] for saving in (False, True)}
    print(f"{'K':>4} " + " ".join(f"{m + ' ' + key:>22}" for m in ("ordinary", "saving") for key in keys) + "  params")
    for i, k in enumerate(depths):
        cells = [f"{rows[s][i][key]:22.1f}" for s in (False, True) for key in keys]
        print(f"{k:>4} " + " ".join(cells) + f"  {rows[False][i]['params'] / 1e6:.2f}M")
    grads = slope(depths, [4 * r["params"] / MB for r in rows[False]])[1]
    for key in keys:
        per_k = [slope(depths, [r[key] for r in rows[s]])[1] for s in (False, True)]
        print(f"growth per K ({key}): ordinary {per_k[0]:.2f} MB/K, saving {per_k[1]:.2f} MB/K "
              f"(of which parameter gradients {grads:.2f} MB/K; target <= 2 MB/K with it)")
    budget = budget_gb * 1024
    print(f"\nDeepest Glow in {budget_gb:g} GB (whole-process peak, linear fit over K = {depths}):")
    for saving in (False, True):
        a, b = slope(depths, [r["total"] for r in rows[saving]])
        deepest = int((budget - a) // b)
        line = f"  {'saving' if saving else 'ordinary':8s}: peak = {a:.0f} MB + {b:.2f} MB x K -> K = {deepest}"
        if verify:
            run = in_fresh_process(deepest, saving, device)
            line += f" (measured at K = {deepest}: {run['total']:.0f} MB)"
        print(line)


def time_table(depths: list[int], rounds: int, device: torch.device) -> None:
    print(f"\nTime per training step, saving / ordinary ({device}; interleaved, {rounds} rounds)")
    print("  (forward share: the ordinary loss's forward pass over the whole ordinary step; rebuilding")
    print("  inputs re-runs every forward, so the ratio cannot fall below 1 + that share)")
    for depth in depths:
        ordinary = setup(depth, False, device)
        saving = setup(depth, True, device)
        runs = ((train_step, ordinary), (train_step, saving), (forward_pass, ordinary))
        for fn, run in runs:  # warm-up
            fn(*run)
        times: dict[int, list[float]] = {0: [], 1: [], 2: []}
        for r in range(rounds):
            for which in ((0, 1, 2) if r % 2 == 0 else (2, 1, 0)):
                fn, run = runs[which]
                start = time.perf_counter()
                fn(*run)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[which].append(time.perf_counter() - start)
        ratios = sorted(s / o for o, s in zip(times[0], times[1]))
        share = statistics.median(f / o for o, f in zip(times[0], times[2]))
        print(f"  K={depth:>3}: ordinary {statistics.median(times[0]):.3f} s (min {min(times[0]):.3f}), saving "
              f"{statistics.median(times[1]):.3f} s (min {min(times[1]):.3f}); ratio per round: median "
              f"{statistics.median(ratios):.3f} (min {ratios[0]:.3f}, max {ratios[-1]:.3f}), of the minima "
              f"{min(times[1]) / min(times[0]):.3f} (target <= 1.3); forward share {share:.3f}")
        del ordinary, saving


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="*", default=[4, 8, 16, 32], help="none: no memory table")
    parser.add_argument("--time-depths", type=int, nargs="*", default=[8, 32])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--budget-gb", type=float, default=2.0)
    parser.add_argument("--verify", action="store_true", help="run the deepest K found, to check the fit")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--child", type=int, nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "cpu":
        reuse_freed_memory()  # as train.py does on the CPU
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.child:
        print(json.dumps(measure(args.child[0], bool(args.child[1]), device)))
        return
    print(f"Glow {SHAPE}, {SCALES} levels, hidden {HIDDEN}, batch {BATCH}; {machine()}")
    if args.depths:
        memory_table(args.depths, args.device, args.budget_gb, args.verify)
    if args.time_depths:
        time_table(args.time_depths, args.rounds, device)


if __name__ == "__main__":
    main()
