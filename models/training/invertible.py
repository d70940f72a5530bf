"""Training with memory that does not grow with depth: ``--invertible-backprop``.

:func:`use_invertible_backprop` rewrites a model with :func:`flows.reversible.invertible_backprop`:
the backward pass rebuilds each step's input through its ``inverse`` instead of keeping
it, so the gradients are ordinary backpropagation's up to the round-off of the rebuilt
inputs, which a :class:`flows.reversible.DriftMonitor` records (read at the logging
interval: :class:`models.training.monitors.Drift`). The layers, parameters and
``state_dict`` keys are the model's own, so a checkpoint holds the plain model's state and
resumes with or without it. ActNorm's data-dependent initialization runs first, on the
first batch and without gradients (:func:`models.training.step.prepare_model`); until
then a run of steps computes ordinarily.
"""

from __future__ import annotations

from torch import nn

from flows.freeform import logdet_modes_in
from flows.reversible import DriftMonitor, invertible_backprop

__all__ = ["use_invertible_backprop"]


def use_invertible_backprop(model: nn.Module, name: str) -> DriftMonitor:
    """Rewrites ``model`` (a ready model) in place for memory-saving backpropagation; returns its drift monitor.

    Raises ``ValueError`` (one line, before anything is written) for a model with a layer
    whose input cannot be rebuilt in one closed-form pass: no inverse, an autoregressive
    one (a pass per feature: MAF, NSF's autoregressive variant, TarFlow), or a free-form
    layer whose inverse is a fixed-point iteration or an ODE solve, exact only to a
    tolerance (residual, ffjord; FFJORD's own memory saver is the adjoint method).
    """
    if logdet_modes_in(model):
        raise ValueError(f"--invertible-backprop expected a model whose layers have closed-form inverses, got {name}, "
                         "whose inverses are iterative solves (exact only to their tolerance); leave it out")
    monitor = DriftMonitor()
    try:
        invertible_backprop(model, monitor=monitor)
    except TypeError as error:  # the library refuses a layer without a one-pass inverse, naming it
        reason = str(error).split("; pass allow_iterative_inverse")[0]  # an opt-in train.py does not offer
        raise ValueError(f"--invertible-backprop cannot train {name}: {reason}") from None
    return monitor
