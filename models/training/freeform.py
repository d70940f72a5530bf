"""What a run's numbers are when a model's log-det is free-form (residual and continuous flows).

A free-form layer computes its log-det in a named mode (``flows.freeform``): ``"exact"``,
an unbiased ``"estimate"``, or ``"gradient"``, a surrogate whose gradient is unbiased but
whose value is no log-det. Training runs in the model's mode (:func:`set_logdet_mode`
changes it); :func:`loss_kind` says what the training loss then is, and the loop labels
it so (an estimate of the NLL, or a surrogate that is never called bits/dim).

Evaluation never reports a surrogate: :func:`evaluation_logdet` picks exact log-dets for
data of at most :data:`EXACT_MAX_DIMS` dimensions (the residual layer's exact log-det
costs ~D^3 per sample, FFJORD's exact trace D vector-Jacobian products per evaluation),
else estimates, averaged over several independent passes over the test set with their
standard error over the passes (:func:`models.training.evaluation.evaluate`). Within one
batch all samples share a Russian-roulette draw, so only whole passes are independent.
"""

from __future__ import annotations

from torch import nn

from flows.freeform import FreeFormFlow, logdet_is_exact, logdet_is_likelihood, logdet_modes_in

__all__ = ["EXACT_MAX_DIMS", "EVAL_LOGDETS", "set_logdet_mode", "loss_kind", "evaluation_logdet", "loss_note"]

EXACT_MAX_DIMS = 64  # evaluation's "auto": exact log-dets up to this many dimensions, estimates above
EVAL_LOGDETS = ("auto", "exact", "estimate")


def set_logdet_mode(model: nn.Module, mode: str | None, name: str) -> None:
    """Puts every free-form layer of ``model`` in ``mode`` for training (``None``: leaves the model's own).

    Raises ``ValueError`` for a model without free-form layers, or a mode its layers lack.
    """
    if mode is None:
        return
    layers = [m for m in model.modules() if isinstance(m, FreeFormFlow)]
    if not layers:
        raise ValueError(f"--logdet-mode expected a model with free-form log-dets (residual, ffjord), got {name}, "
                         "whose log-dets are exact by their structure; leave out --logdet-mode")
    for layer in layers:
        if mode not in layer.supported_modes:
            raise ValueError(f"--logdet-mode expected one of {', '.join(layer.supported_modes)} for {name} "
                             f"({type(layer).__name__} layers), got {mode!r}")
        layer.logdet_mode = mode


def loss_kind(model: nn.Module) -> str:
    """What the training loss of ``model`` is: ``"exact"`` (the NLL), ``"estimate"`` (an unbiased
    estimate of it) or ``"gradient"`` (a surrogate whose value is no likelihood)."""
    if not logdet_is_likelihood(model):
        return "gradient"
    return "exact" if logdet_is_exact(model) else "estimate"


def evaluation_logdet(model: nn.Module, dims: int, choice: str = "auto") -> str | None:
    """How evaluation computes the log-dets of ``model`` on data of ``dims`` dimensions:
    ``None`` for a model without free-form layers (exact by structure), else ``"exact"`` or
    ``"estimate"`` (``choice``; ``"auto"``: exact up to :data:`EXACT_MAX_DIMS`)."""
    if choice not in EVAL_LOGDETS:
        raise ValueError(f"--eval-logdet expected one of {', '.join(EVAL_LOGDETS)}, got {choice!r}")
    if not logdet_modes_in(model):
        return None
    if choice == "auto":
        return "exact" if dims <= EXACT_MAX_DIMS else "estimate"
    return choice


def loss_note(kind: str, evaluation: str | None, passes: int) -> str | None:
    """The one note a run prints about what its numbers are (``None`` when all are exact)."""
    test = {"exact": "exact log-dets", "estimate": f"log-det estimates averaged over {passes} passes, with their "
            "standard error over the passes", None: "exact log-dets"}[evaluation]
    if kind == "gradient":
        return ("note: --logdet-mode gradient trains on a surrogate whose gradient is unbiased but whose value is no "
                "likelihood: it is logged as surrogate_loss, never as bits/dim or a log-p / log-det split; test "
                f"log-likelihoods use {test}")
    if kind == "estimate" or evaluation == "estimate":
        what = "an unbiased estimate (logdet_mode estimate in metrics.jsonl)" if kind == "estimate" else "exact"
        return f"note: the training NLL is {what}; test log-likelihoods use {test}"
    return None
