"""Train a normalizing flow by maximum likelihood, evaluate it, and draw samples.

Commands::

    # Default: RealNVP's small "digits" preset on the embedded 8x8 digits, CPU, ~3 minutes.
    python train.py

    # A preset: model sizes and run settings of a named recipe (GPU advised for these).
    python train.py --model glow --preset mnist --download
    python train.py --model realnvp --preset toy2d --dataset two_moons
    python train.py --model nsf --preset power --data-dir data   # NSF's run settings for POWER

    # Class-conditional: the one-hot label is every conditioner's context; density.png per class.
    python train.py --model nsf --preset toy2d --dataset rings --conditional

    # Your own vectors: a .npy or .csv file of shape (N, D) (rows shuffled with seed 0; the
    # last 10% is the test split, the rest train; standardized by the train split).
    python train.py --model nsf --preset small --dataset path/to/points.csv

    # Resume an interrupted run (flags not given come from the checkpoint); --steps N extends it.
    # --model, --preset, --dataset, --conditional, --seed and --batch-size stay the checkpoint's;
    # other flags given (--lr, --steps, ...) apply from there on and are recorded:
    python train.py --resume runs/realnvp-digits/checkpoint.pt

    # Evaluate a checkpoint and draw colder samples, without training:
    python train.py --resume runs/realnvp-digits/checkpoint.pt --eval-only --temperature 0.7

    # Free-form log-dets (residual flows, FFJORD): trained in the preset's --logdet-mode; test
    # log-likelihoods exact up to D = 64, else estimates with their standard error. RNODE for FFJORD:
    python train.py --model residual --preset toy2d --dataset checkerboard
    python train.py --model ffjord --preset toy2d --dataset eight_gaussians --kinetic-energy 0.01 --jacobian-norm 0.01

    # TarFlow given the class, its samples with classifier-free guidance; Glow with memory flat in depth:
    python train.py --model tarflow --conditional --guidance 2
    python train.py --model glow --invertible-backprop

    # Several GPUs (or, with --device cpu, processes) on one machine:
    torchrun --standalone --nproc_per_node 4 train.py --model glow --preset cifar10 --download

A run writes under ``--out`` (default ``runs/<model>-<dataset>``): ``config.json``,
``metrics.jsonl`` (one JSON record per log step and evaluation), ``checkpoint.pt``,
``samples.png``, ``loss.png``, and for 2D data ``density.png`` (learned beside true; a
column per class with ``--conditional``).
SIGINT / SIGTERM write a checkpoint and exit (status 130 / 143); ``--resume`` continues exactly.
One run writes to a folder at a time (it holds ``<out>/.lock``), and never into another run's.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import random
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from itertools import chain
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist

from models import MODELS, build_model
from models.data import DATASETS, DataSplit
from models.training import (
    EXACT_MAX_DIMS, EvalResult, LoopSettings, MetricsLog, Monitor, Processes, RunDir, TrainState, apply_schedule,
    augmented, build_optimizer, build_parser, build_scheduler, changed_settings, check_compatible, check_resume,
    check_resume_flags, claim_run_dir, configure_continuous, data_fingerprint, evaluate, evaluation_logdet, fit, kl_gap,
    load_checkpoint, load_splits, loss_kind, loss_note, make_scaler, make_train_loader, monitors_for, option,
    prepare_model, restore, reuse_freed_memory, rnode_penalty, save_run_pictures, set_logdet_mode, setup_processes,
    start_run_files, teardown_processes, train_batches, use_invertible_backprop,
)

# The configuration


@dataclass(frozen=True)
class Config:
    """Everything a run depends on; saved in ``config.json`` and in every checkpoint.

    Frozen and checked when made (:func:`check_config`), so a Config is never changed
    after it was checked: a new value (the steps of ``--epochs``) makes a new Config.
    """

    model: str = option("realnvp", "model family: nice, realnvp, glow, maf, nsf, residual, ffjord or tarflow")
    preset: str = option("digits", "model sizes, see the model's PRESETS; also run settings for the presets below")
    dataset: str = option("digits", "data set: digits (embedded), a 2D toy (two_moons, checkerboard, ...), mixture10d, "
                                    "mnist, cifar10, a tabular set (power, gas, hepmass, miniboone, bsds300), or your "
                                    "own file of vectors (N, D): path/to/file.npy or .csv (a tenth held out as test)")
    data_dir: str = option("data", "folder holding downloadable data sets")
    download: bool = option(False, "download a missing data set into --data-dir")
    conditional: bool = option(False, "model p(x | class): the one-hot label is the context (2D toys, mixture10d, "
                                      "digits, mnist, cifar10)")
    steps: int = option(6000, "optimization steps in all; a resumed run continues up to this")
    epochs: float | None = option(None, "train for this many passes over the training set instead of --steps")
    batch_size: int = option(128, "samples per step, per process")
    lr: float = option(1e-3, "Adam's learning rate after warm-up")
    warmup: int = option(200, "steps of linear learning-rate warm-up from 0")
    schedule: Literal["constant", "cosine"] = option("cosine", "learning rate after warm-up: constant, or cosine to 0")
    clip: float = option(100.0, "clip the gradient norm to this (0: no clipping)")
    device: Literal["auto", "cpu", "cuda"] = option("auto", "auto: CUDA when available, else CPU")
    amp: Literal["none", "bf16", "fp16"] = option("none", "mixed precision (autocast dtype); fp16 adds grad scaling")
    compile: bool = option(False, "torch.compile the model's forward pass")
    seed: int = option(0, "seed of the initialization, shuffling and dequantization noise")
    resume: str | None = option(None, "checkpoint to continue from; flags not given default to its config")
    eval_only: bool = option(False, "with --resume: only evaluate the checkpoint and draw samples")
    temperature: float = option(1.0, "sampling temperature of samples.png (below 1: smoother samples)")
    num_samples: int = option(64, "samples drawn for samples.png")
    out: str | None = option(None, "run directory; default runs/<model>-<dataset>, on resume the checkpoint's")
    overwrite: bool = option(False, "start afresh in a run directory that holds another run, deleting its files")
    allow_new_world_size: bool = option(False, "with --resume: continue with another process count than the "
                                               "checkpoint's (the global batch changes)")
    log_every: int = option(50, "steps between metric records and progress-bar updates")
    ckpt_every: int = option(1000, "steps between checkpoints (0: only at the end)")
    eval_every: int = option(0, "steps between test evaluations (0: only at the end)")
    nonfinite: Literal["stop", "skip"] = option("stop", "on a NaN/inf loss: stop with an error, or skip the batch")
    invertible_backprop: bool = option(False, "rebuild each step's input through its inverse in the backward pass "
                                              "instead of storing it: memory flat in depth (closed-form inverses only)")
    logdet_mode: Literal["exact", "estimate", "gradient"] | None = option(
        None, "residual, ffjord: log-dets in training (default: the preset's); gradient's loss is a surrogate, "
              "logged as surrogate_loss, never as bits/dim")
    eval_logdet: Literal["auto", "exact", "estimate"] = option(
        "auto", f"residual, ffjord: test log-dets exact, or estimated over --eval-passes passes with their standard "
                f"error; auto: exact for data of at most {EXACT_MAX_DIMS} dimensions")
    eval_passes: int = option(8, "residual, ffjord: passes over the test set when evaluation estimates log-dets")
    kinetic_energy: float = option(0.0, "ffjord: RNODE's weight of the kinetic energy ∫|f|² dt in the loss (0: off)")
    jacobian_norm: float = option(0.0, "ffjord: RNODE's weight of the Jacobian norm ∫|df/dz|² dt in the loss (0: off)")
    adjoint: bool = option(False, "ffjord: gradients by the adjoint method (memory flat in the solver's steps)")
    guidance: float = option(0.0, "tarflow, with --conditional: classifier-free guidance weight of samples.png")

    def __post_init__(self) -> None:
        check_config(self)


def check_config(config: Config) -> None:
    """Raises ``ValueError`` for names and numbers no run can use."""
    if config.model not in MODELS:
        raise ValueError(f"--model expected one of {', '.join(MODELS)}, got {config.model!r}")
    presets = MODELS[config.model].PRESETS
    if config.preset not in presets:
        raise ValueError(f"--preset expected one of {', '.join(presets)} for {config.model}, got {config.preset!r}")
    if config.dataset not in DATASETS and not config.dataset.endswith((".npy", ".csv")):
        raise ValueError(f"--dataset expected one of {', '.join(DATASETS)}, or a .npy or .csv file of vectors, "
                         f"got {config.dataset!r}")
    for name in ("steps", "batch_size", "log_every", "num_samples"):
        if getattr(config, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} expected a positive integer, got {getattr(config, name)}")
    for name in ("warmup", "ckpt_every", "eval_every", "clip", "kinetic_energy", "jacobian_norm", "guidance"):
        if getattr(config, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} expected a number >= 0, got {getattr(config, name)}")
    for name in ("lr", "temperature") + (("epochs",) if config.epochs is not None else ()):
        if not getattr(config, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} expected a positive number, got {getattr(config, name)}")
    if config.eval_only and not config.resume:
        raise ValueError("--eval-only expected a checkpoint to evaluate (--resume PATH), got none")
    if config.eval_passes < 2:
        raise ValueError(f"--eval-passes expected at least 2 (a standard error over passes), got {config.eval_passes}")
    guided = "guidance" in inspect.signature(MODELS[config.model].sample).parameters
    if config.guidance and not (guided and config.conditional):
        raise ValueError(f"--guidance expected a class-conditional tarflow (--model tarflow --conditional: it "
                         f"contrasts the class with the null context), got --model {config.model}"
                         + " --conditional" * config.conditional)


# Presets: --preset NAME applies these run settings (under flags given explicitly) and the
# model's own PRESETS[NAME] sizes.

# The tabular benchmarks: batch size, learning rate and steps from Durkan et al. 2019, "Neural
# Spline Flows", arXiv:1906.04032, appendix B, table of per-data-set hyperparameters (the
# preset's model sizes, dropout included, are in models/nsf.py; MAF's presets train with them too).
TABULAR_RUNS: dict[str, dict[str, Any]] = {
    "power": dict(batch_size=512, lr=5e-4, steps=400_000),
    "gas": dict(batch_size=512, lr=5e-4, steps=400_000),
    "hepmass": dict(batch_size=256, lr=5e-4, steps=400_000),
    "miniboone": dict(batch_size=128, lr=3e-4, steps=200_000),
    "bsds300": dict(batch_size=512, lr=5e-4, steps=400_000),
}
PRESETS: dict[str, dict[str, Any]] = {
    "digits": dict(dataset="digits", steps=6000, batch_size=128, lr=1e-3, warmup=200, schedule="cosine"),
    "toy2d": dict(dataset="two_moons", steps=5000, batch_size=256, lr=1e-3, warmup=200, schedule="cosine"),
    "mnist": dict(dataset="mnist", steps=50_000, batch_size=64, lr=1e-3, warmup=2000, schedule="constant",
                  ckpt_every=2000, eval_every=5000),
    "cifar10": dict(dataset="cifar10", steps=200_000, batch_size=64, lr=1e-3, warmup=5000, schedule="constant",
                    ckpt_every=5000, eval_every=10_000),
    **{name: dict(dataset=name, **run) for name, run in TABULAR_RUNS.items()},
}
# Fields that belong to one invocation, never taken from a checkpoint's config.
PER_INVOCATION = {"resume", "eval_only", "overwrite", "download", "out", "allow_new_world_size"}


# Flags


def resolve_config(argv: list[str] | None) -> tuple[Config, dict[str, Any] | None]:
    """Defaults, then the preset's run settings, then a resumed checkpoint's config, then the flags given
    (one flag per Config field, its help from the field: models/training/flags.py).

    Returns the checked config and the loaded checkpoint (``None`` without ``--resume``).
    """
    presets = "; ".join(f"{name}: " + ", ".join(f"{k}={v}" for k, v in s.items()) for name, s in PRESETS.items())
    given = vars(build_parser(Config, __doc__, f"Run settings of the presets: {presets}.").parse_args(argv))
    if "steps" in given and "epochs" in given:
        raise ValueError(
            f"expected --steps or --epochs, got both (--steps {given['steps']} --epochs {given['epochs']})"
        )
    payload = load_checkpoint(given["resume"]) if given.get("resume") else None
    defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    saved = {k: v for k, v in (payload or {}).get("config", {}).items() if k in defaults and k not in PER_INVOCATION}
    if payload is not None:
        check_resume_flags(given, saved, given["resume"])
    preset = given.get("preset", saved.get("preset", defaults["preset"]))
    values = {**defaults, **PRESETS.get(preset, {}), **saved, **given}
    if "steps" in given:
        values["epochs"] = None
    if values["out"] is None:
        name = f"{values['model']}-{Path(values['dataset']).stem}" + ("-conditional" if values["conditional"] else "")
        values["out"] = str(Path(values["resume"]).parent if values["resume"] else Path("runs") / name)
    return Config(**values), payload


def with_epochs_as_steps(config: Config, train_size: int, world_size: int) -> Config:
    """``config`` with ``steps`` = ``epochs`` passes over ``train_size`` samples, if ``--epochs`` was given."""
    if config.epochs is None:
        return config
    batches_per_epoch = train_size // (config.batch_size * world_size)
    if batches_per_epoch == 0:
        raise ValueError(
            f"--epochs expected an epoch of at least one batch, got {train_size} training samples for batches of "
            f"{config.batch_size} x {world_size} process(es); lower --batch-size"
        )
    return dataclasses.replace(config, steps=math.ceil(config.epochs * batches_per_epoch))


# The run

EXIT_STATUS = {"interrupted": 128 + 2, "terminated": 128 + 15}  # after SIGINT, SIGTERM (the shells' convention)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def context_of(config: Config, data: DataSplit) -> torch.Tensor | None:
    """The model's context for each sample: its one-hot class with ``--conditional``, else None."""
    return data.class_context() if config.conditional else None


def source_of(config: Config) -> Path | None:
    """The folder of the checkpoint a resumed run continues; ``None`` for a fresh run."""
    return Path(config.resume).parent if config.resume else None


def make_state(config: Config, model: torch.nn.Module, data: dict[str, Any], monitors: list[Monitor]) -> TrainState:
    optimizer = build_optimizer(model, config.lr)
    scheduler = build_scheduler(optimizer, config.warmup, config.steps, config.schedule)
    scaler = make_scaler(config.amp, next(model.parameters()).device)
    return TrainState(model, optimizer, scheduler, scaler, asdict(config), data=data, monitors=monitors)


def eval_logdets(config: Config, model: torch.nn.Module, data: DataSplit) -> str | None:
    """How evaluation computes a free-form model's log-dets (exact for small D, else estimates); None: structured."""
    return evaluation_logdet(model, math.prod(data.shape), config.eval_logdet)


def describe(config: Config, model: torch.nn.Module, train: DataSplit, test: DataSplit, device: torch.device,
             procs: Processes) -> str:
    size = sum(p.numel() for p in model.parameters())
    levels = f", {train.num_levels} levels" if train.num_levels else ""
    scale = f" x {procs.world_size} processes" if procs.distributed else ""
    given = f" given the class ({train.num_classes} classes)" if config.conditional else ""
    return (f"{config.model} ({config.preset} preset, {size:,} parameters) on {config.dataset}{given} "
            f"({len(train)} train / {len(test)} test, shape {train.shape}{levels}); {config.steps} steps of "
            f"{config.batch_size}{scale} on {device}, amp {config.amp} -> {config.out}")


def finish(config: Config, model: torch.nn.Module, train: DataSplit, test: DataSplit, run: RunDir,
           procs: Processes, log: MetricsLog, step: int, evaluator: Callable[[], EvalResult]) -> None:
    """Final test evaluation and pictures (rank 0 writes them)."""
    result = evaluator()
    record = {"split": "test", "step": step, **result.as_dict()}
    procs.report(f"test: {result}")
    if test.density is not None:
        values, text = kl_gap(result, test.density, math.prod(test.shape), config.conditional)
        record.update(values)
        procs.report(text)
    log.write(record)
    if procs.is_main:
        # TarFlow: guided (given the class) and denoised samples.
        options = {"guidance": config.guidance, "denoise": model.noise_std > 0} if hasattr(model, "denoise") else None
        written = save_run_pictures(model, run, train, test, conditional=config.conditional,
                                    num_samples=config.num_samples, temperature=config.temperature, seed=config.seed,
                                    logdet_mode=eval_logdets(config, model, test), sample_options=options)
        procs.report(f"wrote {run.root}/: " + ", ".join(p.name for p in [run.config, run.metrics, run.checkpoint,
                                                                        *written] if p.exists()))


def run(config: Config, payload: dict[str, Any] | None, procs: Processes, device: torch.device) -> int:
    """Everything after the flags: data, model and every check, then, holding the run folder, training
    (or evaluation only); returns the exit status."""
    train, test = load_splits(config.dataset, config.data_dir, config.download, procs)
    train_context = context_of(config, train)  # raises here, before any file is written, for unlabeled data
    config = with_epochs_as_steps(config, len(train), procs.world_size)
    seed_everything(config.seed)  # the same initialization on every rank
    context_features = 0 if train_context is None else train_context.shape[1]
    model = build_model(config.model, config.preset, train.shape, num_levels=train.num_levels,
                        context_features=context_features).to(device)
    set_logdet_mode(model, config.logdet_mode, config.model)  # training settings; raise before any file is written
    configure_continuous(model, config.model, config.kinetic_energy, config.jacobian_norm, config.adjoint)
    drift = use_invertible_backprop(model, config.model) if config.invertible_backprop else None
    fingerprint = data_fingerprint(train, test)
    if payload is not None:
        check_compatible(payload, model, config.resume)
        check_resume(payload, config.resume, fingerprint=fingerprint, steps=config.steps, world_size=procs.world_size,
                     allow_new_world_size=config.allow_new_world_size, eval_only=config.eval_only)
    run_dir = RunDir(Path(config.out))
    with claim_run_dir(run_dir, procs, source_of(config), config.overwrite):
        seed_everything(config.seed + procs.rank)  # noise and sampling differ between ranks
        state = make_state(config, model, fingerprint, monitors_for(model, drift))
        if payload is not None:
            restore(state, payload, procs)
            apply_schedule(state, config.lr)  # a new --lr, --warmup, --schedule or --steps applies from here
            state.last_checkpoint = (config.resume, state.step)
        evaluator = partial(evaluate, model, test.data, num_levels=test.num_levels, batch_size=4 * config.batch_size,
                            procs=procs, seed=config.seed, context=context_of(config, test),
                            logdet_mode=eval_logdets(config, model, test), passes=config.eval_passes)
        if config.eval_only:
            finish(config, model, train, test, run_dir, procs, MetricsLog(None), state.step, evaluator)
            return 0
        return train_run(config, payload, state, train, test, run_dir, procs, device, evaluator)


def train_run(config: Config, payload: dict[str, Any] | None, state: TrainState, train: DataSplit, test: DataSplit,
              run_dir: RunDir, procs: Processes, device: torch.device, evaluator: Callable[[], EvalResult]) -> int:
    """Starts (or continues) the run's files, trains, then evaluates and draws; returns the exit status."""
    model = state.model
    log = start_run_files(run_dir, asdict(config), source_of(config), state.step) if procs.is_main \
        else MetricsLog(None)
    if payload is not None:
        changed = changed_settings(payload["config"], asdict(config), PER_INVOCATION, asdict(Config()))
        log.write({"split": "resume", "step": state.step, "changed": changed})
        what = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
        procs.report(f"resuming from step {state.step} of {config.steps} ({config.resume})"
                     + (f"; changed: {what}" if what else ""))
        if state.step >= config.steps:
            procs.report(f"the checkpoint is at step {state.step} = --steps: nothing to train, evaluating it "
                         f"(pass --steps above {state.step} to train on)")
    procs.report(describe(config, model, train, test, device, procs))
    note = loss_note(loss_kind(model), eval_logdets(config, model, test), config.eval_passes)
    if note:
        procs.report(note)
    loader = make_train_loader(train.data, config.batch_size, config.seed, procs, device.type == "cuda",
                               context_of(config, train))
    batches = train_batches(loader, state.step, device, next(model.parameters()).dtype, train.num_levels)
    first = next(batches)
    net = prepare_model(model, first, procs, device, config.compile)
    settings = LoopSettings(steps=config.steps, log_every=config.log_every, ckpt_every=config.ckpt_every,
                            eval_every=config.eval_every, clip=config.clip, amp=config.amp,
                            nonfinite=config.nonfinite, loss_kind=loss_kind(model))
    batches = augmented(chain([first], batches), getattr(model, "augment", None))  # TarFlow's noise, after dequantizing
    outcome = fit(state, net, batches, settings, procs, run_dir, evaluator, rnode_penalty(model))
    if outcome != "done":
        procs.report(f"{outcome} at step {state.step}: checkpoint written to {run_dir.checkpoint}; continue "
                     f"with: python train.py --resume {run_dir.checkpoint}")
        return EXIT_STATUS[outcome]
    finish(config, model, train, test, run_dir, procs, log, state.step, evaluator)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parses the flags, checks every input, then trains; returns the exit status."""
    reuse_freed_memory()  # CPU steps run faster without page faults (models/training/allocator.py)
    config, payload = resolve_config(argv)
    procs, device = setup_processes(config.device)
    try:
        status = run(config, payload, procs, device)
    except BaseException:
        teardown_processes(wait=False)
        raise
    teardown_processes()
    return status


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, OSError, FloatingPointError) as error:  # OSError: unreadable or unwritable files
        print(f"train.py: error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # a second SIGINT / SIGTERM while the first one's checkpoint was written
        print("train.py: interrupted twice: stopped without a checkpoint at this step", file=sys.stderr)
        sys.exit(130)
