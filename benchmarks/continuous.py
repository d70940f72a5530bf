"""FFJORD on the 2D toys: seconds and NFE per training step, and the KL gap at a fixed wall time.

For each toy set, trains ``models.continuous.FFJORD`` (the ``toy2d`` preset unless
overridden) with Adam on batches of 512 for ``--budget`` seconds of wall time, logging
the forward and backward NFE and the seconds of every step, then evaluates the test
split (10,000 points) with the exact trace and reports the KL gap ``NLL - H`` (total nats
and nats/dim, with its standard error), H being the toy's exact entropy.

The reference (issue 11, measured on this machine): a continuous flow of 3x128, exact
trace, tolerance 1e-5, reached 0.59 (checkerboard) and 0.074 (8 Gaussians) total nats
after 300 steps at 0.72 s/step, i.e. 216 s; the default budget is that wall time.

    python benchmarks/continuous.py                                 # both toys, 216 s each
    python benchmarks/continuous.py --kinetic-energy 0.01 --jacobian-norm 0.01   # with RNODE
    python benchmarks/continuous.py --bf16                          # the estimator under bf16 autocast

Measured (2026-12-02, 1 thread of 2 CPU cores shared with other sessions, load average
5-9; wall-time figures move with that load): the default command gave checkerboard 808
steps at 0.253 s/step, NFE 56 (74 at the end), KL gap 0.219 ± 0.005 nats (0.109/dim);
8 Gaussians 636 steps at 0.359 s/step, NFE 68, 0.058 ± 0.011 (0.029/dim). Under heavier
load (~9): checkerboard 279 steps, 0.347; 8 Gaussians 420 steps, 0.044 ± 0.010. With
``--lr 1e-3``: 0.725 and 0.404. With RNODE (``--kinetic-energy 0.01 --jacobian-norm 0.01``,
load ~9 then ~5): checkerboard 507 steps at 0.451 s/step, NFE 50 (68), 0.241 ± 0.005;
8 Gaussians 568 steps at 0.389 s/step, NFE 62, 0.036 ± 0.010 (0.018/dim).
On the quiet machine (later the same day, one thread): checkerboard 721 steps at 0.308
s/step, NFE 56 (74 at the end), 0.199 ± 0.005 (0.100/dim); 8 Gaussians 612 steps at 0.372
s/step, NFE 68, 0.073 ± 0.011; with RNODE: checkerboard 775 steps at 0.286 s/step, NFE 62,
0.203 ± 0.005; 8 Gaussians 664 steps at 0.327 s/step, NFE 62, 0.039 ± 0.009.

The training loop is written here (not train.py) and is plain: sample a batch, loss
``-mean log p + mean(RNODE term)``, backward, Adam step; the NFE counts are Python ints,
and the loss is read once per ``--log-every`` steps.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import flows  # noqa: E402
from benchmarks.timing import machine  # noqa: E402
from flows.continuous import function_evaluations, regularization  # noqa: E402
from models.continuous import FFJORD  # noqa: E402
from models.data import load_dataset  # noqa: E402
from models.metrics import nats_mean_and_stderr  # noqa: E402

BATCH = 512
PEER = {"checkerboard": 0.59, "eight_gaussians": 0.074}  # total nats after 216 s (300 steps x 0.72 s)


def build(args: argparse.Namespace) -> FFJORD:
    sizes = {**FFJORD.PRESETS["toy2d"], "atol": args.tol, "rtol": args.tol}
    sizes.update({k: v for k, v in dict(hidden_features=args.hidden, num_blocks=args.num_blocks).items() if v})
    return FFJORD((2,), **sizes, kinetic_energy=args.kinetic_energy, jacobian_norm=args.jacobian_norm)


def train(model: FFJORD, data: torch.Tensor, args: argparse.Namespace) -> list[dict[str, float]]:
    """Trains for ``args.budget`` seconds; one record (seconds, NFE) per step."""
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(0)
    records: list[dict[str, float]] = []
    start = time.perf_counter()
    while time.perf_counter() - start < args.budget:
        tick = time.perf_counter()
        x = data[torch.randint(len(data), (BATCH,), generator=generator)]
        loss = -model.log_prob(x).mean()
        penalty = regularization(model)
        total = loss if penalty is None else loss + penalty.mean()
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        counts = function_evaluations(model)
        records.append({"seconds": time.perf_counter() - tick, **counts})
        if len(records) % args.log_every == 0:
            print(f"  step {len(records)}: loss {float(loss.detach()):.3f}, NFE {counts['forward']}, "
                  f"{records[-1]['seconds']:.2f} s", flush=True)
    return records


def kl_gap(model: FFJORD, name: str) -> tuple[float, float]:
    """Test KL gap ``NLL - H`` in total nats, with the standard error of the NLL."""
    test = load_dataset(name, split="test")
    with flows.logdet_mode(model, "exact"), torch.no_grad():
        nll = -torch.cat([model.log_prob(x) for x in test.data.split(2500)])
    mean, stderr = nats_mean_and_stderr(nll)
    return mean - test.density.entropy()[0], stderr


def run_toy(name: str, args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    model = build(args)
    records = train(model, load_dataset(name, split="train").data, args)
    gap, stderr = kl_gap(model, name)
    seconds = statistics.median(r["seconds"] for r in records)
    last = records[-min(50, len(records)):]
    print(
        f"{name}: {len(records)} steps in {sum(r['seconds'] for r in records):.0f} s; median {seconds:.3f} s/step; "
        f"NFE forward median {statistics.median(r['forward'] for r in records):.0f} "
        f"(last 50 steps {statistics.median(r['forward'] for r in last):.0f}); "
        f"KL gap {gap:.3f} ± {stderr:.3f} nats = {gap / 2:.3f} nats/dim (peer: {PEER[name]} total at equal wall time)",
        flush=True,
    )


def bf16_estimator(args: argparse.Namespace) -> None:
    """Bias and spread of the Hutchinson log-det of a trained-looking flow under bf16 autocast.

    A toy2d model trained ``--bf16-steps`` steps on the checkerboard in float32, then
    1,000 estimates per point (one batch) for 8 points, in float32 and under bf16 autocast,
    against the float64 exact log-det; mean |bias| in units of the standard error.
    """
    torch.manual_seed(0)
    model = build(args)
    args.budget = args.bf16_seconds
    train(model, load_dataset("checkerboard", split="train").data, args)
    flow = model.transform[-1]
    x = load_dataset("checkerboard", split="test").data[:8]
    exact = flows.exact_logdet(flow.double(), x.double())
    flow.float()
    draws = 1000
    for label, context in (("float32", torch.autocast("cpu", enabled=False)),
                           ("bf16 autocast", torch.autocast("cpu", dtype=torch.bfloat16))):
        with context, flows.logdet_mode(flow, "estimate"), torch.no_grad():
            estimates = flow(x.repeat(draws, 1))[1].double().reshape(draws, 8)
        nfe = flow.nfe_forward
        bias = estimates.mean(0) - exact
        stderr = estimates.std(0) / math.sqrt(draws)
        print(f"{label:14s} NFE {nfe:4d}  |bias| mean {bias.abs().mean():.4f} nats (max {bias.abs().max():.4f}), "
              f"max |z| {(bias / stderr).abs().max():.1f}, spread (sd) {estimates.std(0).mean():.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=216.0, help="wall-clock seconds of training per toy")
    parser.add_argument("--datasets", nargs="+", default=["checkerboard", "eight_gaussians"])
    parser.add_argument("--lr", type=float, default=5e-3, help="Adam; 1e-3 (FFJORD's) reached 0.725 and 0.404 nats in 216 s")
    parser.add_argument("--tol", type=float, default=1e-5, help="the solver's atol and rtol")
    parser.add_argument("--hidden", type=int, default=0, help="hidden features (0: the preset's)")
    parser.add_argument("--num-blocks", type=int, default=0, help="dynamics-net depth (0: the preset's)")
    parser.add_argument("--kinetic-energy", type=float, default=0.0, help="RNODE weight of ∫|f|^2")
    parser.add_argument("--jacobian-norm", type=float, default=0.0, help="RNODE weight of ∫|df/dz|_F^2")
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--bf16", action="store_true", help="measure the estimator under bf16 autocast instead")
    parser.add_argument("--bf16-seconds", type=float, default=60.0, help="training before the bf16 measurement")
    args = parser.parse_args()
    print(f"machine: {machine()}; {vars(args)}", flush=True)
    if args.bf16:
        bf16_estimator(args)
        return
    for name in args.datasets:
        run_toy(name, args)


if __name__ == "__main__":
    main()
