"""Optimization: Adam, the learning-rate schedule, the gradient scaler and autocast."""

from __future__ import annotations

import contextlib
import math
from functools import partial

import torch
from torch import nn

__all__ = ["AMP_DTYPES", "build_optimizer", "lr_factor", "build_scheduler", "make_scaler", "autocast"]

AMP_DTYPES: dict[str, torch.dtype | None] = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_optimizer(model: nn.Module | list[nn.Parameter], lr: float) -> torch.optim.Adam:
    """Adam over the model's parameters (or a list of parameters), fused where torch offers it.

    The fused update is one kernel over all parameters instead of ~10 ops per parameter
    tensor: 5x faster on CPU for Glow's ~270 tensors (measured 2.2 ms against 10.8 ms;
    torch >= 2.4 on CPU). Its state dict is the same, so checkpoints move freely.
    """
    params = list(model.parameters()) if isinstance(model, nn.Module) else list(model)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, ValueError):  # no fused kernel for these devices or dtypes in this torch
        return torch.optim.Adam(params, lr=lr)


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """The learning rate at ``step`` over the base rate: linear warm-up, then constant or cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, warmup: int, total: int, schedule: str = "constant"
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step schedule of :func:`lr_factor` (``schedule`` is ``"constant"`` or ``"cosine"``)."""
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule expected 'constant' or 'cosine', got {schedule!r}")
    factor = partial(lr_factor, warmup=warmup, total=total, schedule=schedule)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_scaler(amp: str, device: torch.device) -> torch.amp.GradScaler:
    """A gradient scaler, enabled for ``amp="fp16"`` only (bf16 has float32's range)."""
    return torch.amp.GradScaler(device.type, enabled=amp == "fp16")


def autocast(amp: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The one autocast context of a step: ``"none"``, ``"bf16"`` or ``"fp16"``."""
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp expected one of {sorted(AMP_DTYPES)}, got {amp!r}")
    dtype = AMP_DTYPES[amp]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)
