"""What a run holds: its training state (what a checkpoint restores) and its directory."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["TrainState", "RunDir"]


@dataclass
class TrainState:
    """What a checkpoint restores: the model, its optimization state and where the loop stands."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    config: dict[str, Any]  # the run's configuration, saved with every checkpoint
    step: int = 0
    skipped: int = 0  # batches skipped for a non-finite loss
    sums: Tensor | None = None  # running (loss, log_p, logdet, grad_norm) sums since the last record
    count: int = 0  # steps in ``sums``
    last_checkpoint: tuple[str, int] | None = None  # (path, step) of the last good checkpoint
    data: dict[str, Any] | None = None  # the fingerprint of the data set (a resumed run must have the same)
    monitors: list[Any] = field(default_factory=list)  # what the log records besides the loss (monitors.Monitor)

    def describe_last_checkpoint(self) -> str:
        if self.last_checkpoint is None:
            return "No checkpoint was written yet"
        path, step = self.last_checkpoint
        return f"Last good checkpoint: {path} (step {step}), left in place"


@dataclass(frozen=True)
class RunDir:
    """The files of a run under one directory."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint.pt"

    @property
    def samples(self) -> Path:
        return self.root / "samples.png"

    @property
    def loss(self) -> Path:
        return self.root / "loss.png"

    @property
    def density(self) -> Path:
        return self.root / "density.png"

    @property
    def lock(self) -> Path:
        """Held (``flock``) by the one run writing here; holds that run's pid."""
        return self.root / ".lock"

    def run_files(self) -> list[Path]:
        """The files a run writes here (the lock file aside) that exist."""
        paths = (self.config, self.metrics, self.checkpoint, self.samples, self.loss, self.density)
        return [path for path in paths if path.exists()]
