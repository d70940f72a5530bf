"""Train a normalizing flow by maximum likelihood, evaluate it, and draw samples.

Commands::

    # Default: RealNVP's small "digits" preset on the embedded 8x8 digits, CPU, ~3 minutes.
    python train.py

    # A preset: model sizes and run settings of a named recipe (GPU advised for these).
    python train.py --model glow --preset mnist --download
    python train.py --model realnvp --preset toy2d --dataset two_moons

    # Class-conditional: the one-hot label is every conditioner's context; density.png per class.
    python train.py --model nsf --preset toy2d --dataset rings --conditional

    # Resume an interrupted run (flags not given come from the checkpoint); --steps N extends it:
    python train.py --resume runs/realnvp-digits/checkpoint.pt

    # Evaluate a checkpoint and draw colder samples, without training:
    python train.py --resume runs/realnvp-digits/checkpoint.pt --eval-only --temperature 0.7

    # Several GPUs (or, with --device cpu, processes) on one machine:
    torchrun --standalone --nproc_per_node 4 train.py --model glow --preset cifar10 --download

A run writes under ``--out`` (default ``runs/<model>-<dataset>``): ``config.json``,
``metrics.jsonl`` (one JSON record per log step and evaluation), ``checkpoint.pt``,
``samples.png``, ``loss.png``, and for 2D data ``density.png`` (learned beside true; a
column per class with ``--conditional``).
SIGINT / SIGTERM write a checkpoint and exit; ``--resume`` continues exactly.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import random
import re
import sys
import typing
from dataclasses import asdict, dataclass
from functools import partial
from itertools import chain
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist

import models
from models import checkpoints, metrics_log, plots, training
from models.allocator import reuse_freed_memory
from models.data import DATASETS, Dataset, load_dataset
from models.training import LoopSettings, Processes, RunDir, TrainState


@dataclass
class Config:
    """Everything a run depends on; saved in ``config.json`` and in every checkpoint."""

    model: str = "realnvp"  # model family: nice, realnvp, glow, maf or nsf
    preset: str = "digits"  # model sizes, see the model's PRESETS; also run settings for the presets below
    dataset: str = "digits"  # data set: digits (embedded), a 2D toy (two_moons, checkerboard, ...), mixture10d, mnist, cifar10, or a tabular set (power, gas, hepmass, miniboone, bsds300)
    data_dir: str = "data"  # folder holding downloadable data sets
    download: bool = False  # download a missing data set into --data-dir
    conditional: bool = False  # model p(x | class): the one-hot label is the context (2D toys, mixture10d, digits, mnist, cifar10)
    steps: int = 6000  # optimisation steps in all; a resumed run continues up to this
    epochs: float | None = None  # train for this many passes over the training set instead of --steps
    batch_size: int = 128  # samples per step, per process
    lr: float = 1e-3  # Adam's learning rate after warm-up
    warmup: int = 200  # steps of linear learning-rate warm-up from 0
    schedule: Literal["constant", "cosine"] = "cosine"  # learning rate after warm-up: constant, or cosine to 0
    clip: float = 100.0  # clip the gradient norm to this (0: no clipping)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when available, else CPU
    amp: Literal["none", "bf16", "fp16"] = "none"  # mixed precision (autocast dtype); fp16 adds a gradient scaler
    compile: bool = False  # torch.compile the model's forward pass
    seed: int = 0  # seed of the initialisation, shuffling and dequantisation noise
    resume: str | None = None  # checkpoint to continue from; flags not given default to its config
    eval_only: bool = False  # with --resume: only evaluate the checkpoint and draw samples
    temperature: float = 1.0  # sampling temperature of samples.png (below 1: smoother samples)
    num_samples: int = 64  # samples drawn for samples.png
    out: str | None = None  # run directory; default runs/<model>-<dataset>, on resume the checkpoint's
    overwrite: bool = False  # start afresh in a run directory that already holds a checkpoint
    log_every: int = 50  # steps between metric records and progress-bar updates
    ckpt_every: int = 1000  # steps between checkpoints (0: only at the end)
    eval_every: int = 0  # steps between test evaluations (0: only at the end)
    nonfinite: Literal["stop", "skip"] = "stop"  # on a NaN/inf loss: stop with an error, or skip the batch


# Named recipes: --preset NAME applies these run settings (under flags given explicitly)
# and the model's own PRESETS[NAME] sizes.
PRESETS: dict[str, dict[str, Any]] = {
    "digits": dict(dataset="digits", steps=6000, batch_size=128, lr=1e-3, warmup=200, schedule="cosine"),
    "toy2d": dict(dataset="two_moons", steps=5000, batch_size=256, lr=1e-3, warmup=200, schedule="cosine"),
    "mnist": dict(dataset="mnist", steps=50_000, batch_size=64, lr=1e-3, warmup=2000, schedule="constant",
                  ckpt_every=2000, eval_every=5000),
    "cifar10": dict(dataset="cifar10", steps=200_000, batch_size=64, lr=1e-3, warmup=5000, schedule="constant",
                    ckpt_every=5000, eval_every=10_000),
    # The tabular benchmarks: the preset picks the data set (and MAF's / NSF's sizes for it);
    # the run settings stay train.py's defaults, since the papers' could not be checked here.
    **{name: dict(dataset=name) for name in ("power", "gas", "hepmass", "miniboone", "bsds300")},
}
# Fields that belong to one invocation, never taken from a checkpoint's config.
PER_INVOCATION = {"resume", "eval_only", "overwrite", "download", "out"}


# Flags


def _field_help() -> dict[str, str]:
    """Each Config field's one-line comment, which is its flag's help."""
    return dict(re.findall(r"^\s+(\w+): [^=]+= .*?  # (.+)$", inspect.getsource(Config), re.M))


def _flag_type(hint: Any) -> tuple[type, list[str] | None]:
    """The argparse type (and choices) of a field's type hint."""
    if typing.get_origin(hint) is Literal:
        return str, list(typing.get_args(hint))
    options = [a for a in typing.get_args(hint) if a is not type(None)]  # X | None -> X
    return _flag_type(options[0]) if options else (hint, None)


def _metavar(name: str, kind: type) -> str:
    return {"resume": "PATH", "out": "DIR", "data_dir": "DIR"}.get(name) or {int: "N", float: "X"}.get(kind, "NAME")


def build_parser() -> argparse.ArgumentParser:
    """One flag per Config field; only flags given appear in the parsed namespace."""
    presets = "; ".join(f"{name}: " + ", ".join(f"{k}={v}" for k, v in s.items()) for name, s in PRESETS.items())
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS, epilog=f"Run settings of the presets: {presets}.",
    )
    helps, hints = _field_help(), typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        flag, text = "--" + f.name.replace("_", "-"), f"{helps[f.name]} (default: {f.default})"
        kind, choices = _flag_type(hints[f.name])
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=text)
        else:
            parser.add_argument(flag, type=kind, choices=choices, help=text,
                                metavar=None if choices else _metavar(f.name, kind))
    return parser


def resolve_config(argv: list[str] | None) -> tuple[Config, dict[str, Any] | None]:
    """Defaults, then the preset's run settings, then a resumed checkpoint's config, then the flags given.

    Returns the checked config and the loaded checkpoint (``None`` without ``--resume``).
    """
    given = vars(build_parser().parse_args(argv))
    if "steps" in given and "epochs" in given:
        raise ValueError(
            f"expected --steps or --epochs, got both (--steps {given['steps']} --epochs {given['epochs']})"
        )
    payload = checkpoints.load_checkpoint(given["resume"]) if given.get("resume") else None
    saved = {k: v for k, v in (payload or {}).get("config", {}).items()
             if k in {f.name for f in dataclasses.fields(Config)} and k not in PER_INVOCATION}
    preset = given.get("preset", saved.get("preset", Config.preset))
    values = {**PRESETS.get(preset, {}), **saved, **given}
    if "steps" in given:
        values["epochs"] = None
    config = Config(**values)
    if config.out is None:
        name = f"{config.model}-{config.dataset}" + ("-conditional" if config.conditional else "")
        config.out = str(Path(config.resume).parent if config.resume else Path("runs") / name)
    check_config(config)
    return config, payload


def check_config(config: Config) -> None:
    """Raises ``ValueError`` for names and numbers no run can use."""
    if config.model not in models.MODELS:
        raise ValueError(f"--model expected one of {', '.join(models.MODELS)}, got {config.model!r}")
    presets = models.MODELS[config.model].PRESETS
    if config.preset not in presets:
        raise ValueError(f"--preset expected one of {', '.join(presets)} for {config.model}, got {config.preset!r}")
    if config.dataset not in DATASETS:
        raise ValueError(f"--dataset expected one of {', '.join(DATASETS)}, got {config.dataset!r}")
    for name in ("steps", "batch_size", "log_every", "num_samples"):
        if getattr(config, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} expected a positive integer, got {getattr(config, name)}")
    for name in ("warmup", "ckpt_every", "eval_every", "clip"):
        if getattr(config, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} expected a number >= 0, got {getattr(config, name)}")
    for name in ("lr", "temperature") + (("epochs",) if config.epochs is not None else ()):
        if not getattr(config, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} expected a positive number, got {getattr(config, name)}")
    if config.eval_only and not config.resume:
        raise ValueError("--eval-only expected a checkpoint to evaluate (--resume PATH), got none")


# The run


def load_data(config: Config, procs: Processes) -> tuple[Dataset, Dataset]:
    """The train and test splits; under torchrun rank 0 downloads first while the others wait."""
    def load(split: str, download: bool) -> Dataset:
        ds = load_dataset(config.dataset, config.data_dir, split, download=download)
        training.check_finite(ds.data, f"{config.dataset} {split} data")
        return ds

    if procs.is_main:
        splits = load("train", config.download), load("test", config.download)
    if procs.distributed:
        dist.barrier()
    if not procs.is_main:
        splits = load("train", False), load("test", False)
    return splits


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def make_state(config: Config, model: torch.nn.Module, steps: int) -> TrainState:
    optimizer = training.build_optimizer(model, config.lr)
    scheduler = training.build_scheduler(optimizer, config.warmup, steps, config.schedule)
    scaler = training.make_scaler(config.amp, next(model.parameters()).device)
    return TrainState(model, optimizer, scheduler, scaler, asdict(config))


def check_run_dir(config: Config, run: RunDir) -> None:
    """A fresh run never silently replaces another run's checkpoint."""
    if not config.resume and not config.overwrite and run.checkpoint.exists():
        raise FileExistsError(
            f"--out expected a directory without a checkpoint, got {str(run.root)!r} holding one; pass "
            f"--resume {run.checkpoint} to continue it, --overwrite to start afresh, or another --out"
        )


def report(procs: Processes, text: str) -> None:
    """User-facing output, from rank 0 only."""
    if procs.is_main:
        print(text, flush=True)


def describe(config: Config, model: torch.nn.Module, train: Dataset, test: Dataset, device: torch.device,
             procs: Processes) -> str:
    size = sum(p.numel() for p in model.parameters())
    levels = f", {train.num_levels} levels" if train.num_levels else ""
    scale = f" x {procs.world_size} processes" if procs.distributed else ""
    given = f" given the class ({train.num_classes} classes)" if config.conditional else ""
    return (f"{config.model} ({config.preset} preset, {size:,} parameters) on {config.dataset}{given} "
            f"({len(train)} train / {len(test)} test, shape {train.shape}{levels}); {config.steps} steps of "
            f"{config.batch_size}{scale} on {device}, amp {config.amp} -> {config.out}")


def context_of(config: Config, ds: Dataset) -> torch.Tensor | None:
    """The model's context for each sample of ``ds``: its one-hot class with ``--conditional``, else None."""
    return ds.class_context() if config.conditional else None


def finish(config: Config, model: torch.nn.Module, train: Dataset, test: Dataset, run: RunDir,
           procs: Processes, log: metrics_log.MetricsLog, step: int) -> None:
    """Final test evaluation and pictures (rank 0 writes them)."""
    result = training.evaluate(model, test.data, test.num_levels, 4 * config.batch_size, procs, config.seed,
                               context_of(config, test))
    record = {"split": "test", "step": step, **result.as_dict()}
    report(procs, f"test: {result}")
    if test.density is not None:
        # Known density: test NLL minus the true entropy is the KL gap, KL(p || model) per dim
        # (given the class, H(X | class) is the floor and the gap is the expected KL per class).
        dims = math.prod(test.shape)
        entropy, stderr = test.density.conditional_entropy() if config.conditional else test.density.entropy()
        record.update(entropy_per_dim=entropy / dims, kl_gap_per_dim=result.nats_per_dim - entropy / dims)
        what = "H(X | class)" if config.conditional else "entropy"
        report(procs, f"true density: {entropy / dims:.4f} ± {stderr / dims:.4f} nats/dim ({what}), the best "
                      f"a model can reach; KL gap {record['kl_gap_per_dim']:.4f} nats/dim")
    log.write(record)
    if not procs.is_main:
        return
    classes = train.num_classes if config.conditional else None
    plots.save_samples(model, run.samples, config.num_samples, config.temperature, config.seed, train.data,
                       num_classes=classes, labels=train.labels)
    written = [run.samples]
    if train.kind == "toy2d" and classes:
        plots.save_class_densities(model, run.density, train.data, classes, test.density.log_prob_given)
        written.append(run.density)
    elif train.kind == "toy2d":
        plots.save_density(model, run.density, train.data, test.density.log_prob)
        written.append(run.density)
    if run.metrics.exists():
        plots.save_loss_curve(metrics_log.read_metrics(run.metrics), run.loss)
        written.append(run.loss)
    report(procs, f"wrote {run.root}/: " + ", ".join(p.name for p in [run.config, run.metrics, run.checkpoint, *written]
                                                      if p.exists()))


def run(config: Config, payload: dict[str, Any] | None, procs: Processes, device: torch.device) -> int:
    """Everything after the flags: data, model, checks, then training (or evaluation only)."""
    train, test = load_data(config, procs)
    train_context = context_of(config, train)  # raises here, before any file is written, for unlabelled data
    if config.epochs is not None:
        config.steps = math.ceil(config.epochs * (len(train) // (config.batch_size * procs.world_size)))
    seed_everything(config.seed)  # the same initialisation on every rank
    context_features = 0 if train_context is None else train_context.shape[1]
    model = models.build_model(config.model, config.preset, train.shape, num_levels=train.num_levels,
                               context_features=context_features).to(device)
    if payload is not None:
        checkpoints.check_compatible(payload, model, config.resume)
    run_dir = RunDir(Path(config.out))
    check_run_dir(config, run_dir)
    seed_everything(config.seed + procs.rank)  # noise and sampling differ between ranks
    state = make_state(config, model, config.steps)
    log = metrics_log.MetricsLog(run_dir.metrics if procs.is_main else None)
    if payload is not None:
        checkpoints.restore(state, payload, procs)
        state.last_checkpoint = (config.resume, state.step)
    if config.eval_only:
        finish(config, model, train, test, run_dir, procs, metrics_log.MetricsLog(None), state.step)
        return 0
    # From here on files are written: every input has been checked.
    if procs.is_main:
        run_dir.root.mkdir(parents=True, exist_ok=True)
        run_dir.config.write_text(json.dumps(asdict(config), indent=2) + "\n")
        if payload is None:
            run_dir.metrics.unlink(missing_ok=True)
        log.truncate_after(state.step)
    report(procs, describe(config, model, train, test, device, procs))
    loader = training.make_train_loader(train.data, config.batch_size, config.seed, procs, device.type == "cuda",
                                        train_context)
    batches = training.train_batches(loader, state.step, device, next(model.parameters()).dtype, train.num_levels)
    first = next(batches)
    net = training.prepare_model(model, first, procs, device, config.compile)
    settings = LoopSettings(config.steps, config.log_every, config.ckpt_every, config.eval_every, config.clip,
                            config.amp, config.nonfinite)
    evaluator = partial(training.evaluate, model, test.data, test.num_levels, 4 * config.batch_size, procs, config.seed,
                        context_of(config, test))
    outcome = training.fit(state, net, chain([first], batches), settings, procs, run_dir, evaluator)
    if outcome == "interrupted":
        report(procs, f"interrupted at step {state.step}: checkpoint written to {run_dir.checkpoint}; continue "
                      f"with: python train.py --resume {run_dir.checkpoint}")
        return 130
    finish(config, model, train, test, run_dir, procs, log, state.step)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parses the flags, checks every input, then trains; returns the exit status."""
    reuse_freed_memory()  # CPU steps run faster without page faults (models/allocator.py)
    config, payload = resolve_config(argv)
    procs, device = training.setup_processes(config.device)
    try:
        status = run(config, payload, procs, device)
    except BaseException:
        training.teardown_processes(wait=False)
        raise
    training.teardown_processes()
    return status


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        sys.exit(2)
