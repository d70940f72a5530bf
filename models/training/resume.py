"""What a resumed run may change, and the checks that it continues the same run.

A resumed run continues one training run. The settings that define the model, its data
and the sequence of batches (:data:`FIXED_ON_RESUME`) are taken from the checkpoint; one
given with another value is refused. Every other setting given is applied from the
checkpoint's step on (the learning rate and its schedule through :func:`apply_schedule`)
and recorded: ``config.json`` and every later checkpoint hold the effective config, and
what changed goes into the metrics log as ``{"split": "resume", "step": N, "changed": ...}``
(:func:`changed_settings`), so the log is the history of what ran when.

The checkpoint also keeps the data's fingerprint and the process count:
:func:`check_resume` refuses other data, a process count that would change the global
batch (unless allowed), and ``steps`` below the checkpoint's step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .state import TrainState

__all__ = ["FIXED_ON_RESUME", "check_resume_flags", "check_resume", "changed_settings", "apply_schedule"]

# Settings a resumed run keeps: the model and its sizes, the data, and the batches (seed, batch size).
FIXED_ON_RESUME = ("model", "preset", "dataset", "conditional", "seed", "batch_size")
DATA_FILES = (".npy", ".csv")


def check_resume_flags(given: dict[str, Any], saved: dict[str, Any], path: str | Path) -> None:
    """Raises ``ValueError`` for a flag of :data:`FIXED_ON_RESUME` given with a value other than the checkpoint's.

    A file of vectors may have moved: its path may differ (its fingerprint is checked instead).

    Example:
        >>> check_resume_flags({"lr": 0.1, "seed": 0}, {"lr": 0.001, "seed": 0}, "c.pt")
        >>> check_resume_flags({"seed": 1}, {"seed": 0}, "c.pt")
        Traceback (most recent call last):
        ...
        ValueError: --seed 1 differs from the checkpoint's 0 (c.pt): a resumed run keeps its ...
    """
    for name in FIXED_ON_RESUME:
        if name not in given or name not in saved or given[name] == saved[name]:
            continue
        if name == "dataset" and all(str(v).endswith(DATA_FILES) for v in (given[name], saved[name])):
            continue
        flag = "--" + name.replace("_", "-")
        raise ValueError(
            f"{flag} {given[name]} differs from the checkpoint's {saved[name]} ({path}): a resumed run keeps its "
            f"model, data and batches ({', '.join('--' + n.replace('_', '-') for n in FIXED_ON_RESUME)}); leave "
            f"out {flag}, or start a new run with another --out"
        )


def check_resume(payload: dict[str, Any], path: str | Path, *, fingerprint: dict[str, Any], steps: int,
                 world_size: int, allow_new_world_size: bool = False, eval_only: bool = False) -> None:
    """Raises ``ValueError`` unless the checkpoint continues on these data, processes and steps."""
    saved = payload.get("data")
    if saved is not None and saved != fingerprint:
        diff = {k: (saved.get(k), fingerprint.get(k)) for k in fingerprint if saved.get(k) != fingerprint.get(k)}
        what = "; ".join(f"{k}: {a} in the checkpoint, {b} now" for k, (a, b) in diff.items())
        same = "" if set(diff) - {"sha256"} else " (the same sizes and shape, other values)"
        raise ValueError(
            f"resume expected the data set the checkpoint was trained on, got other data{same} ({what}) for "
            f"{path}; pass the same --dataset and --data-dir, with the same files"
        )
    before = payload.get("world_size", len(payload["rng"]))
    if before != world_size and not allow_new_world_size and not eval_only:
        raise ValueError(
            f"resume expected the checkpoint's process count ({before}), got {world_size} for {path}: the global "
            f"batch would change from {before} to {world_size} times --batch-size; run with {before} processes, "
            "or pass --allow-new-world-size to continue with the new global batch"
        )
    step = payload["step"]
    if steps < step and not eval_only:
        raise ValueError(
            f"--steps {steps} is below the checkpoint's step {step} ({path}): that run is past it already; pass "
            f"--steps above {step} to train on, or --eval-only to evaluate the checkpoint"
        )


def changed_settings(saved: dict[str, Any], now: dict[str, Any], ignore: set[str],
                     defaults: dict[str, Any] | None = None) -> dict[str, list[Any]]:
    """``{name: [checkpoint's value, value now]}`` for every setting that differs, ``ignore`` aside.

    A setting the checkpoint lacks (one added to train.py since) had its value in ``defaults``.

    Example:
        >>> changed_settings({"lr": 0.001, "out": "a"}, {"lr": 0.0005, "out": "b", "new": 0}, {"out"}, {"new": 0})
        {'lr': [0.001, 0.0005]}
    """
    saved = {**(defaults or {}), **saved}
    return {k: [saved.get(k), v] for k, v in now.items() if k not in ignore and saved.get(k) != v}


def apply_schedule(state: TrainState, lr: float) -> None:
    """After a restore: base learning rate ``lr`` and the schedule that ``state.scheduler`` was built
    with (the config that runs) from the current step on, in the optimizer and the scheduler.

    With the checkpoint's own settings this reproduces its learning rates exactly
    (``lr * factor(step)`` is the scheduler's own product).
    """
    scheduler, groups = state.scheduler, state.optimizer.param_groups
    scheduler.base_lrs = [lr] * len(groups)
    for group, factor in zip(groups, scheduler.lr_lambdas, strict=True):
        group["initial_lr"] = lr
        group["lr"] = lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in groups]  # what get_last_lr() reports
