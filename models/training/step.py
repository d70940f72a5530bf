"""One training step: the data-dependent initialization, the wrapped model, forward and backward.

The loss is the negative log-likelihood in nats per dimension, averaged over the batch,
so bits/dim is ``loss / ln 2``. The step never waits on the host.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from flows import ActNorm

from .batches import Batch
from .optimization import autocast
from .processes import Processes

__all__ = ["LogProbParts", "needs_data_init", "prepare_model", "StepOutput", "train_step", "apply_update"]


class LogProbParts(nn.Module):
    """``forward(x, context) -> (log p_base(z), logdet)`` of a model: the entry DDP and compile wrap."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.model.log_prob_parts(x, context)


def needs_data_init(model: nn.Module) -> bool:
    """Whether some ActNorm still waits for its data-dependent initialization."""
    return any(isinstance(m, ActNorm) and not m.is_initialized for m in model.modules())


def prepare_model(
    model: nn.Module, first_batch: Batch, procs: Processes, device: torch.device, compile: bool = False
) -> nn.Module:
    """Runs the data-dependent initialization on ``first_batch``, then wraps the model for training.

    The initializing forward runs on every rank before DDP wraps the model (ActNorm
    averages its statistics over the ranks), so all ranks start identical. Returns a
    module computing :class:`LogProbParts`, wrapped in DDP and ``torch.compile`` as asked.
    """
    model.train()
    if needs_data_init(model):
        with torch.no_grad():
            model.log_prob_parts(*first_batch)
    net: nn.Module = LogProbParts(model)
    if procs.distributed:
        # Buffers (ActNorm's flag, fixed permutations) agree on all ranks: synced once at
        # wrapping, never per step (the flag's name changed in torch 2.13).
        ids = [device.index] if device.type == "cuda" else None
        no_sync = "forward_sync_buffers" if "forward_sync_buffers" in _ddp_arguments() else "broadcast_buffers"
        net = DistributedDataParallel(net, device_ids=ids, **{no_sync: False})
    return torch.compile(net) if compile else net


def _ddp_arguments() -> set[str]:
    return set(inspect.signature(DistributedDataParallel.__init__).parameters)


@dataclass
class StepOutput:
    """Per-step values, detached 0-dim tensors on the device (nats per dimension, batch means)."""

    loss: Tensor
    log_p: Tensor
    logdet: Tensor
    grad_norm: Tensor
    penalty: Tensor | None = None  # a term added to the loss for the gradient only (RNODE's), if any

    def stacked(self) -> Tensor:
        return torch.stack([self.loss, self.log_p, self.logdet, self.grad_norm.to(self.loss.dtype)])


def train_step(
    net: nn.Module,
    x: Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    amp: str = "none",
    clip: float = 0.0,
    context: Tensor | None = None,
    penalty: Callable[[], Tensor | None] | None = None,
) -> StepOutput:
    """Forward and backward of one batch (with its ``context``, if the model takes one); the
    gradients are left for :func:`apply_update`.

    The loss is ``-(log p_base(z) + logdet)`` per dimension, averaged over the batch, with
    both terms summed in float32 (or the model's wider dtype) whatever the autocast dtype.
    ``penalty``, called after the forward pass, gives a term that is differentiated with the
    loss but not reported in it (``None``: none). Gradients are unscaled and clipped to norm
    ``clip`` (0: not clipped, norm still reported). No host sync.
    """
    optimizer.zero_grad(set_to_none=True)
    with autocast(amp, x.device):
        log_p, logdet = net(x, context)
    wide = torch.promote_types(log_p.dtype, torch.float32)
    dims = x[0].numel()
    log_p, logdet = log_p.to(wide).mean() / dims, logdet.to(wide).mean() / dims
    loss = -(log_p + logdet)
    extra = penalty() if penalty is not None else None
    scaler.scale(loss if extra is None else loss + extra.to(wide)).backward()
    scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf)
    return StepOutput(loss.detach(), log_p.detach(), logdet.detach(), grad_norm.detach(),
                      None if extra is None else extra.detach())


def apply_update(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
    """The optimizer step through the scaler (which skips steps with inf gradients under fp16)."""
    scaler.step(optimizer)
    scaler.update()
