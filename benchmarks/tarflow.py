"""TarFlow on the 8x8 digits: a training run, class-conditional samples with and without
guidance, and sampling speed (sequential with a key/value cache against fixed-point samplers).

train.py trains TarFlow too (``python train.py --model tarflow``); this script keeps a small
loop of its own, for the samples at several guidance weights in one run, with the digits
budget of the other models (Adam 1e-3, 200 warm-up steps, cosine decay to 0,
batch 128, gradient norm clipped at 100) and models.training's evaluation (test bits/dim of
uniformly dequantized data, the figure every model reports)::

    python benchmarks/tarflow.py --threads 1 train --steps 6000 --out runs/tarflow-digits   # p(x), sigma = 0
    python benchmarks/tarflow.py --threads 1 train --steps 6000 --conditional --noise-std 0.05 \\
        --out runs/tarflow-digits-cond                                                       # p(x | class)
    python benchmarks/tarflow.py --threads 1 speed --checkpoint runs/tarflow-digits-cond/model.pt

``train`` writes ``model.pt`` (config and weights), ``metrics.jsonl`` and, for a conditional
run, ``samples-guidance-W.png`` (a row per digit) for W in --guidance, raw and denoised.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.timing import machine, median_seconds  # noqa: E402
from models.data import load_dataset, one_hot  # noqa: E402
from models.tarflow import TarFlow  # noqa: E402
from models.training.batches import dequantize_levels  # noqa: E402
from models.training.evaluation import evaluate, evaluating  # noqa: E402
from models.training.optimization import build_optimizer, build_scheduler  # noqa: E402
from flows.transformer import FixedPoint  # noqa: E402

NUM_CLASSES = 10


def _context(labels: torch.Tensor | None, conditional: bool) -> torch.Tensor | None:
    return one_hot(labels, NUM_CLASSES) if conditional else None


def train(args: argparse.Namespace) -> None:
    """Fits TarFlow's digits preset; evaluates; draws samples; writes the run folder."""
    torch.manual_seed(args.seed)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_split, test_split = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    levels = train_split.num_levels
    sizes = {**TarFlow.PRESETS["digits"], "noise_std": args.noise_std, **json.loads(args.sizes)}
    model = TarFlow(train_split.shape, levels, context_features=NUM_CLASSES if args.conditional else 0, **sizes)
    optimizer = build_optimizer(model, args.lr)
    scheduler = build_scheduler(optimizer, args.warmup, args.steps, "cosine")
    data, context = train_split.data, _context(train_split.labels, args.conditional)
    dims = math.prod(train_split.shape)
    log = (out / "metrics.jsonl").open("w")
    print(f"machine: {machine()}\nTarFlow {model.config}, {sum(p.numel() for p in model.parameters()):,} parameters")
    start, step = time.perf_counter(), 0
    while step < args.steps:
        order = torch.randperm(len(data))
        for batch in order[: len(order) - len(order) % args.batch_size].split(args.batch_size):
            x = dequantize_levels(data[batch], levels)
            x, ctx = model.augment(x, None if context is None else context[batch])
            loss = -model.log_prob(x, ctx).mean() / (dims * math.log(2))  # bits/dim of the (noisy) batch
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            optimizer.step()
            scheduler.step()
            step += 1
            if step % args.log_every == 0 or step == args.steps:
                elapsed = time.perf_counter() - start
                record = {"step": step, "train_bits_per_dim": float(loss.detach()), "seconds": round(elapsed, 1),
                          "ms_per_step": round(1000 * elapsed / step, 1)}
                print(json.dumps(record), flush=True)
                log.write(json.dumps(record) + "\n")
            if step == args.steps:
                break
    torch.save({"config": model.config, "state_dict": model.state_dict()}, out / "model.pt")
    results = evaluate_all(model, test_split, args)
    print(json.dumps(results))
    log.write(json.dumps({"split": "test", "step": step, **results}) + "\n")
    if args.conditional:
        draw_samples(model, out, args)


def evaluate_all(model: TarFlow, test, args: argparse.Namespace) -> dict[str, float]:
    """Test bits/dim of dequantized data: of ``x`` (given the class and, through the null
    context, without it, for a conditional model) and, with noise, of the noisy ``x + sigma eps``."""
    levels, size = test.num_levels, len(test)
    results: dict[str, float] = {}
    contexts = {"": None}
    if args.conditional:
        contexts = {"given_class_": one_hot(test.labels, NUM_CLASSES), "null_context_": torch.zeros(size, NUM_CLASSES)}
    for name, context in contexts.items():
        result = evaluate(model, test.data, num_levels=levels, batch_size=300, seed=args.seed, context=context)
        results[f"{name}bits_per_dim"] = round(result.bits_per_dim, 4)
        results[f"{name}bits_per_dim_stderr"] = round(result.bits_per_dim_stderr, 4)
    if model.noise_std:
        # The density the loss trained: of v + sigma eps (not a bound on the discrete data's NLL).
        generator = torch.Generator().manual_seed(args.seed)
        noisy = dequantize_levels(test.data, levels, generator)
        noisy = noisy + model.noise_scale * torch.randn(noisy.shape, generator=generator)
        with evaluating(model), torch.no_grad():
            context = contexts.get("given_class_")
            nll = -model.log_prob(noisy, context) / (math.prod(test.shape) * math.log(2))
        results["noisy_bits_per_dim"] = round(float(nll.mean()), 4)
    return results


def draw_samples(model: TarFlow, out: pathlib.Path, args: argparse.Namespace) -> None:
    """A grid per guidance weight: row ``c`` holds ``--per-class`` samples of digit ``c``; raw and denoised."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = torch.arange(NUM_CLASSES).repeat_interleave(args.per_class)
    context = one_hot(labels, NUM_CLASSES)
    for guidance in args.guidance:
        torch.manual_seed(args.seed)  # the same latents for every weight
        with evaluating(model):
            raw = model.sample(context=context, temperature=args.temperature, guidance=guidance)
            cleaned = model.denoise(raw, context) if model.noise_std else raw
        for kind, x in (("raw", raw), ("denoised", cleaned)):
            if kind == "denoised" and not model.noise_std:
                continue
            grid = _grid(x, model.num_levels, args.per_class)
            path = out / f"samples-guidance-{guidance:g}-{kind}.png"
            plt.imsave(path, grid.numpy(), cmap="gray", vmin=0.0, vmax=1.0)
            print(f"wrote {path}")


def _grid(x: torch.Tensor, num_levels: int, cols: int, pad: int = 1) -> torch.Tensor:
    """``(N, 1, H, W)`` levels as one ``[0, 1]`` picture, ``cols`` per row, quantized as the data are."""
    images = x[:, 0].clamp(0, num_levels - 1e-3).floor() / (num_levels - 1)
    n, h, w = images.shape
    tiles = torch.nn.functional.pad(images, (pad, 0, pad, 0), value=1.0)  # (N, H + pad, W + pad)
    grid = tiles.view(n // cols, cols, h + pad, w + pad).permute(0, 2, 1, 3).reshape((n // cols) * (h + pad), -1)
    return torch.nn.functional.pad(grid, (0, pad, 0, pad), value=1.0)


def speed(args: argparse.Namespace) -> None:
    """Samples/s of the sequential (cached) inverse against fixed-point samplers, and their error."""
    print(f"machine: {machine()}\n")
    torch.manual_seed(0)
    cases = []
    if args.checkpoint:
        payload = torch.load(args.checkpoint, weights_only=True)
        digits = TarFlow(**payload["config"])
        digits.load_state_dict(payload["state_dict"])
        cases.append(("digits (trained)", digits))
    larger = TarFlow((3, 32, 32), 256, patch_size=4, hidden_features=256, num_steps=4, num_blocks=2)
    with torch.no_grad():
        for p in larger.parameters():  # off the identity initialization, so the blocks do real work
            p.add_(torch.randn_like(p) * 0.02)
    cases.append(("3x32x32, patch 4, 256 wide, 4x2 (random weights)", larger))
    samplers = {
        "sequential, KV cache": FixedPoint(),
        "Gauss-Seidel, blocks of 4": FixedPoint(block_size=4, tolerance=args.tolerance),
        "Jacobi, all patches": FixedPoint(block_size=None, tolerance=args.tolerance),
    }
    print(f"batch {args.batch}; tolerance {args.tolerance} (largest change per iteration, in the flow's [-1, 1] units)")
    print("| model | sampler | samples/s | transformer passes | max abs error (levels) | pixels off by a level |")
    print("|---|---|---|---|---|---|")
    for name, model in cases:
        model.eval()
        context = one_hot(torch.arange(args.batch) % NUM_CLASSES, NUM_CLASSES) if model.config["context_features"] else None
        z = torch.randn(args.batch, *model.in_shape)
        with torch.no_grad():
            exact = model.invert(z, context).x
            for label, fixed_point in samplers.items():
                solution = model.invert(z, context, fixed_point)
                seconds = median_seconds(lambda: model.invert(z, context, fixed_point), repeats=args.repeats)
                error = (solution.x - exact).abs().max()
                levels = model.num_levels
                off = (solution.x.clamp(0, levels - 1).floor() != exact.clamp(0, levels - 1).floor()).double().mean()
                print(f"| {name} | {label} | {args.batch / seconds:,.1f} | {solution.passes} | {float(error):.2e} | "
                      f"{float(off):.2%} |", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads; 1 on a shared machine (2 threads on 2 busy cores ran 10x slower)")
    commands = parser.add_subparsers(dest="command", required=True)
    fit = commands.add_parser("train", help="train on the digits, evaluate, draw samples")
    fit.add_argument("--steps", type=int, default=6000)
    fit.add_argument("--batch-size", type=int, default=128)
    fit.add_argument("--lr", type=float, default=1e-3)
    fit.add_argument("--warmup", type=int, default=200)
    fit.add_argument("--clip", type=float, default=100.0)
    fit.add_argument("--conditional", action="store_true", help="p(x | class), trained with context dropout")
    fit.add_argument("--noise-std", type=float, default=0.0, help="TarFlow's sigma, in [-1, 1] units")
    fit.add_argument("--sizes", default="{}", help="JSON overrides of the digits preset, e.g. '{\"num_steps\": 6}'")
    fit.add_argument("--guidance", type=float, nargs="+", default=[0.0, 1.0, 3.0])
    fit.add_argument("--per-class", type=int, default=12)
    fit.add_argument("--temperature", type=float, default=1.0)
    fit.add_argument("--log-every", type=int, default=100)
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--out", default="runs/tarflow-digits")
    fast = commands.add_parser("speed", help="sampling speed of the samplers")
    fast.add_argument("--checkpoint", default=None, help="a model.pt of `train` (the digits model)")
    fast.add_argument("--batch", type=int, default=100)
    fast.add_argument("--tolerance", type=float, default=1e-3)
    fast.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    train(args) if args.command == "train" else speed(args)


if __name__ == "__main__":
    main()
