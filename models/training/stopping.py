"""Why a run stops early: a non-finite batch or loss, or a stop signal.

Non-finite values are caught by the loop, never by the layers: a device-side flag
records the first bad step and is read at the logging and checkpoint steps, so the step
itself never waits on the host. SIGINT / SIGTERM become a flag the loop polls, so the
run can write a checkpoint before it exits.
"""

from __future__ import annotations

import contextlib
import signal
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .processes import Processes, all_reduce
from .step import StepOutput

__all__ = ["NonFiniteWatch", "StopSignals"]


class NonFiniteWatch:
    """The first step whose batch or loss was not finite, kept on the device until read."""

    NONE = 2**62

    def __init__(self, device: torch.device) -> None:
        self.first = torch.full((2,), self.NONE, dtype=torch.int64, device=device)  # (batch, loss)

    def observe(self, step: int, x: Tensor, out: StepOutput, loss: bool = True) -> None:
        """Records ``step`` if ``x`` (or, with ``loss``, the loss) is not finite (no host sync)."""
        finite = torch.stack([torch.isfinite(x).all(), torch.isfinite(out.loss) | (not loss)])
        self.first = torch.minimum(self.first, torch.where(finite, self.NONE, step))

    def raise_if_seen(self, procs: Processes, last_good: str) -> None:
        """Raises ``ValueError`` (bad batch) or ``FloatingPointError`` (bad loss) if any rank saw one."""
        batch, loss = all_reduce(self.first.clone(), procs, dist.ReduceOp.MIN).tolist()
        if batch < self.NONE and batch <= loss:
            raise ValueError(
                f"training batch expected finite values, got NaN or inf in the batch of step {batch}; "
                f"check the data set. {last_good}"
            )
        if loss < self.NONE:
            raise FloatingPointError(
                f"training stopped: the loss is NaN or inf at step {loss}. {last_good}. "
                "Lower --lr, raise --warmup, set --clip, or pass --nonfinite skip to skip such batches."
            )


class StopSignals:
    """Turns SIGINT / SIGTERM into a flag the loop polls; a second signal interrupts at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> StopSignals:
        with contextlib.suppress(ValueError):  # not the main thread: no handlers, no flag
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def requested(self, procs: Processes, sync_point: bool) -> bool:
        """Whether to stop now; across processes only at sync points, so all ranks stop at one step
        (and take the highest signal number any rank got as ``signum``)."""
        if not procs.distributed:
            return self.signum is not None
        if not sync_point:
            return False
        flag = torch.tensor([float(self.signum or 0)])
        if dist.get_backend() == "nccl":
            flag = flag.cuda()
        signum = int(all_reduce(flag, procs, dist.ReduceOp.MAX).item())
        if signum:
            self.signum = signum
        return bool(signum)
