"""Flows with a free-form Jacobian (residual and continuous flows) and their log-det modes.

Where the Jacobian has no structure, ``log|det J|`` is the whole problem. Such a layer
says how it computes it by a named mode, never silently:

- ``"exact"``: the per-sample Jacobian through ``torch.func``, then ``slogdet`` (or the
  exact trace): exact, costs grow with ``D``; for small ``D`` and for tests.
- ``"estimate"``: an unbiased stochastic estimate of ``log|det J|`` from Jacobian-vector
  products (Hutchinson probes, Russian-roulette series); its cost does not grow with ``D``.
- ``"gradient"``: a surrogate whose *gradient* is an unbiased estimate of the log-det's
  gradient, but whose value is not the log-det: never report it as a likelihood.

``FreeFormFlow`` holds the mode; :func:`logdet_mode` switches every free-form layer in a
module for a block (e.g. exact log-dets for evaluation); :func:`logdet_is_exact` and
:func:`logdet_is_likelihood` tell a training loop what its numbers are.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from flows.base import Flow

__all__ = [
    "LOGDET_MODES", "FreeFormFlow", "logdet_mode", "logdet_modes_in", "logdet_is_exact",
    "logdet_is_likelihood", "probe",
]

LOGDET_MODES = ("exact", "estimate", "gradient")


class FreeFormFlow(Flow):
    """Base of the layers whose log-det is computed exactly or estimated, by a named mode.

    Subclasses read ``self.logdet_mode`` in ``forward`` and support the modes in their
    ``supported_modes``. The mode applies to ``forward`` (the density direction); an
    ``inverse`` reports the exact value or the same kind of estimate, as it documents.

    Args:
        logdet_mode: one of ``supported_modes``.
    """

    supported_modes: tuple[str, ...] = LOGDET_MODES

    def __init__(self, logdet_mode: str = "exact") -> None:
        super().__init__()
        self.logdet_mode = logdet_mode

    @property
    def logdet_mode(self) -> str:
        return self._logdet_mode

    @logdet_mode.setter
    def logdet_mode(self, mode: str) -> None:
        if mode not in self.supported_modes:
            raise ValueError(
                f"{type(self).__name__} logdet_mode must be one of {self.supported_modes}, got {mode!r}"
            )
        self._logdet_mode = mode


def logdet_modes_in(module: nn.Module) -> set[str]:
    """The modes of the free-form layers inside ``module`` (empty when it has none)."""
    return {m.logdet_mode for m in module.modules() if isinstance(m, FreeFormFlow)}


def logdet_is_exact(module: nn.Module) -> bool:
    """``True`` when every log-det ``module`` computes is exact (always, without free-form layers)."""
    return logdet_modes_in(module) <= {"exact"}


def logdet_is_likelihood(module: nn.Module) -> bool:
    """``False`` when some layer is in ``"gradient"`` mode: its values are then no likelihood."""
    return "gradient" not in logdet_modes_in(module)


@contextlib.contextmanager
def logdet_mode(module: nn.Module, mode: str) -> Iterator[nn.Module]:
    """Puts every free-form layer inside ``module`` in ``mode`` for the block, then restores.

    Example:
        >>> import torch, flows
        >>> with flows.logdet_mode(flows.ActNorm(2), "exact"):  # no free-form layer: nothing to do
        ...     pass
    """
    if mode not in LOGDET_MODES:
        raise ValueError(f"logdet_mode expects one of {LOGDET_MODES}, got {mode!r}")
    layers = [m for m in module.modules() if isinstance(m, FreeFormFlow)]
    previous = [m.logdet_mode for m in layers]
    try:
        for m in layers:
            m.logdet_mode = mode
        yield module
    finally:
        for m, old in zip(layers, previous):
            m.logdet_mode = old


def probe(like: Tensor, kind: str = "rademacher") -> Tensor:
    """A Hutchinson probe shaped like ``like``: entries with mean 0 and variance 1.

    ``E[v^T A v] = tr(A)`` for such ``v``. ``"rademacher"`` (±1, the lower-variance
    choice) or ``"gaussian"`` (standard normal).
    """
    if kind == "rademacher":
        return torch.randint(0, 2, like.shape, device=like.device).to(like.dtype) * 2 - 1
    if kind == "gaussian":
        return torch.randn_like(like)
    raise ValueError(f"probe kind must be 'rademacher' or 'gaussian', got {kind!r}")
