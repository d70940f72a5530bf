"""GPU check at the scale users train: Glow's CIFAR-10 training step, and the digits figure on the GPU.

Parts, each in a process of its own with a time limit (so a failure, an out-of-memory or a
slow compile cannot stop the others), in this order:

* ``glow-fp32``, ``glow-bf16``: one training step of ``train.py`` (forward, backward,
  clipped gradients, fused Adam; the kit's ``train_step``) of Glow at 3x32x32 with
  ``models.Glow.PRESETS["cifar10"]`` (L=3, K=32, 512 channels; 44M parameters) and the
  cifar10 run preset's batch of 64, on synthetic 8-bit images (no network needed), in
  float32 and under bf16 autocast. Reported: images/s over the timed steps after warm-up,
  peak GPU memory (``torch.cuda.max_memory_allocated``) and the last loss in bits/dim,
  which must be finite.
* ``digits``: ``train.py``'s default run (RealNVP, digits preset, 6000 steps) on the GPU;
  its test bits/dim must be within 0.05 of the CPU figure in README.md.
* ``glow-compile``: as ``glow-fp32`` with the step's model under ``torch.compile`` (last:
  compiling Glow's 96 flow steps takes minutes).

The limits add up to under 10 minutes; a part that runs out of time fails. Prints one
table and exits 1 if any part failed (2 for bad arguments or no GPU).

Usage (from anywhere; it runs from the repository root)::

    bash benchmarks/gpu_check.sh           # on a CUDA GPU, under 10 minutes
    bash benchmarks/gpu_check.sh --cpu     # the same code at tiny sizes on the CPU (~1 minute; tests run it)
    bash benchmarks/gpu_check.sh --parts glow-fp32,glow-bf16 --out /tmp/check
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models import build_model  # noqa: E402
from models.training import (  # noqa: E402
    Processes, apply_update, build_optimizer, make_scaler, prepare_model, train_step,
)

PARTS = ("glow-fp32", "glow-bf16", "digits", "glow-compile")
LIMITS_S = {"glow-fp32": 90, "glow-bf16": 90, "digits": 180, "glow-compile": 210}  # 570 s in all
TOTAL_S = 590  # every part gets at most what is left of this
TOLERANCE_BPD = 0.05  # GPU against CPU test bits/dim of the digits default run
GLOW_BATCH = 64  # train.py's cifar10 preset
README_FIGURE = re.compile(r"RealNVP \(the default run\) \| `python train.py` \| \*\*([\d.]+) ± ([\d.]+)\*\*")


@dataclass
class Result:
    """One part's outcome: what it measured, and ``ok`` with a short note."""

    part: str
    ok: bool
    note: str
    images_per_s: float | None = None
    peak_gib: float | None = None


def readme_cpu_figure() -> tuple[float, float]:
    """The default run's test bits/dim and its standard error, from README.md's digits table."""
    match = README_FIGURE.search((ROOT / "README.md").read_text())
    if match is None:
        raise ValueError("README.md: expected the digits table's row 'RealNVP (the default run) | `python train.py` "
                         "| **B ± E**', got none; update README_FIGURE in benchmarks/gpu_check.py")
    return float(match[1]), float(match[2])


# --- the parts, each run in a child process -------------------------------------------------


def glow_part(mode: str, cpu: bool) -> Result:
    """Timed training steps of Glow's CIFAR-10 preset (tiny sizes with ``cpu``) on synthetic images."""
    device = torch.device("cpu" if cpu else "cuda")
    shape, batch, warmup, timed = ((3, 8, 8), 8, 1, 2) if cpu else ((3, 32, 32), GLOW_BATCH, 3, 20)
    sizes = dict(num_scales=2, num_steps=2, hidden_features=16) if cpu else {}
    torch.manual_seed(0)
    model = build_model("glow", "cifar10", shape, num_levels=256, **sizes).to(device)
    x = (torch.randint(0, 256, (batch, *shape), device=device) + torch.rand(batch, *shape, device=device)).float()
    optimizer, scaler = build_optimizer(model, 1e-4), make_scaler("none", device)
    if not cpu:
        torch.cuda.reset_peak_memory_stats()
    net = prepare_model(model, (x, None), Processes(), device, compile=mode == "compile")
    amp = "bf16" if mode == "bf16" else "none"

    def step():
        out = train_step(net, x, optimizer, scaler, amp, clip=100.0)
        apply_update(optimizer, scaler)
        return out

    for _ in range(warmup):  # compilation happens here
        step()
    synchronize = (lambda: None) if cpu else torch.cuda.synchronize
    synchronize()
    start = time.perf_counter()
    for _ in range(timed):
        out = step()
    synchronize()
    speed = timed * batch / (time.perf_counter() - start)
    bpd = out.loss.item() / math.log(2)
    peak = None if cpu else torch.cuda.max_memory_allocated() / 2**30
    params = sum(p.numel() for p in model.parameters())
    what = f"{params:,} parameters, {'x'.join(map(str, shape))}, batch {batch}"
    if not math.isfinite(bpd):
        return Result(f"glow-{mode}", False, f"{what}: the loss is not finite ({bpd})", speed, peak)
    return Result(f"glow-{mode}", True, f"{what}: loss {bpd:.3f} bits/dim", speed, peak)


def digits_part(cpu: bool, out: pathlib.Path, limit: float) -> Result:
    """train.py's default run on the GPU (4 steps on the CPU with ``cpu``), against README's CPU figure."""
    quick = ["--device", "cpu", "--steps", "4", "--log-every", "2", "--num-samples", "4"]
    flags = quick if cpu else ["--device", "cuda"]
    command = [sys.executable, "train.py", *flags, "--out", str(out / "digits"), "--overwrite"]
    log = out / "digits.log"
    with log.open("w") as stream:
        done = subprocess.run(command, cwd=ROOT, stdout=stream, stderr=subprocess.STDOUT, timeout=limit)
    if done.returncode != 0:
        tail = " | ".join(log.read_text().strip().splitlines()[-3:])
        return Result("digits", False, f"train.py exited {done.returncode}: {tail[-300:]}")
    records = [json.loads(line) for line in (out / "digits" / "metrics.jsonl").read_text().splitlines() if line]
    speeds = [r["images_per_sec"] for r in records if r["split"] == "train"][1:]  # after the warm-up interval
    test = [r for r in records if r["split"] == "test"][-1]
    speed = sorted(speeds)[len(speeds) // 2] if speeds else None
    got = f"test {test['bits_per_dim']:.4f} ± {test['bits_per_dim_stderr']:.4f} bits/dim"
    if cpu:
        return Result("digits", math.isfinite(test["bits_per_dim"]), f"{got} after 4 steps (--cpu: not compared)",
                      speed)
    figure, stderr = readme_cpu_figure()
    gap = test["bits_per_dim"] - figure
    ok = abs(gap) <= TOLERANCE_BPD
    return Result("digits", ok, f"{got}; README's CPU figure {figure:.3f} ± {stderr:.3f}: difference {gap:+.4f} "
                                f"({'within' if ok else 'beyond'} {TOLERANCE_BPD})", speed)


# --- the orchestration -------------------------------------------------------------------------


def run_part(part: str, cpu: bool, out: pathlib.Path, limit: float) -> Result:
    """``part`` in a child process of at most ``limit`` seconds; a crash or a timeout is a failed result."""
    try:
        if part == "digits":
            return digits_part(cpu, out, limit)
        command = [sys.executable, __file__, "--child", part, *(["--cpu"] if cpu else [])]
        log = out / f"{part}.log"
        with log.open("w") as stream:
            done = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=stream, text=True, timeout=limit)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            tail = " | ".join(log.read_text().strip().splitlines()[-2:])
            return Result(part, False, f"exited {done.returncode}: {tail[-300:]}")
        return Result(**json.loads(lines[-1][len("RESULT "):]))
    except subprocess.TimeoutExpired:
        return Result(part, False, f"ran out of its {limit:.0f} s")


def table(results: list[Result]) -> str:
    """The summary: a row per part."""
    rows = [f"{'part':<13} {'result':<6} {'images/s':>9} {'peak GiB':>9}  note"]
    for r in results:
        speed = "-" if r.images_per_s is None else f"{r.images_per_s:,.0f}"
        peak = "-" if r.peak_gib is None else f"{r.peak_gib:.2f}"
        rows.append(f"{r.part:<13} {'ok' if r.ok else 'FAIL':<6} {speed:>9} {peak:>9}  {r.note}")
    return "\n".join(rows)


def machine(cpu: bool) -> str:
    if cpu:
        return f"CPU mode (tiny sizes), torch {torch.__version__}, {torch.get_num_threads()} threads"
    props = torch.cuda.get_device_properties(0)
    return (f"{props.name} ({props.total_memory / 2**30:.0f} GiB), torch {torch.__version__}, "
            f"CUDA {torch.version.cuda}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU, no compile part")
    parser.add_argument("--parts", default=None, help=f"comma-separated parts to run, of {','.join(PARTS)}")
    parser.add_argument("--out", default="runs/gpu_check", help="folder of the logs and the digits run")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:  # a part's own process
        result = glow_part(args.child.removeprefix("glow-"), args.cpu)
        print("RESULT " + json.dumps(result.__dict__), flush=True)
        return 0
    default = [p for p in PARTS if p != "glow-compile"] if args.cpu else list(PARTS)
    parts = args.parts.split(",") if args.parts else default
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        print(f"gpu_check: --parts expected names among {', '.join(PARTS)}, got {', '.join(unknown)}", file=sys.stderr)
        return 2
    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: expected a CUDA GPU, got none; pass --cpu for the CPU mode", file=sys.stderr)
        return 2
    out = (ROOT / args.out) if not os.path.isabs(args.out) else pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"gpu_check: {machine(args.cpu)}; parts {', '.join(parts)}; logs in {out}", flush=True)
    start, results = time.perf_counter(), []
    for part in parts:
        left = TOTAL_S - (time.perf_counter() - start)
        results.append(run_part(part, args.cpu, out, max(1.0, min(LIMITS_S[part], left))))
        print(f"  {part}: {'ok' if results[-1].ok else 'FAIL'} ({time.perf_counter() - start:.0f} s so far)",
              flush=True)
    print()
    print(table(results))
    print(f"\n{sum(r.ok for r in results)} of {len(results)} parts ok in {time.perf_counter() - start:.0f} s")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
