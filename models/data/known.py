"""Densities known exactly: the base of the 2D toys and the 10-D Gaussian mixture.

A :class:`KnownDensity` samples exactly, evaluates its normalized ``log_prob``, and knows
its differential entropy ``H = E[-log p(X)]``: the floor of the test NLL in nats that a
perfect model reaches, so a run on its samples reports the KL gap ``NLL - H``. Each is a
mixture of ``num_classes`` parts and a sample's label names its part, so the same sets
serve class-conditional density estimation: ``log_prob_given(x, labels)`` is the exact
``log p(x | class)`` and ``conditional_entropy()`` its floor ``H(X | class)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..metrics import nats_mean_and_stderr

__all__ = ["KnownDensity", "ENTROPY_SAMPLES", "ENTROPY_SEED"]

ENTROPY_SAMPLES = 100_000  # Monte Carlo entropy: standard errors of ~3e-3 nats
ENTROPY_SEED = 0


class KnownDensity:
    """Base class: a density with exact sampling, ``log_prob`` and entropy.

    ``bounds`` is a box per axis holding all of the mass but a negligible tail (< 1e-12),
    for plots and for the normalization tests. Points are ``(N, D)``: ``D = 2`` for the toys.
    Samples are drawn on the CPU in float64 (so a seed gives the same points whatever the
    default dtype) and returned in the default dtype; ``log_prob`` computes in float64 on
    ``x``'s device and returns ``x``'s dtype.

    Subclasses set ``num_classes`` and implement ``_sample(n, generator)`` (float64
    points and their int64 labels), ``log_prob`` and ``_log_prob_given``; those without
    closed-form entropies inherit the Monte Carlo :meth:`entropy` and
    :meth:`conditional_entropy`.
    """

    bounds: tuple[tuple[float, float], ...]
    num_classes: int
    _entropy: tuple[float, float] | None = None
    _conditional_entropy: tuple[float, float] | None = None

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Draws ``n`` independent points, shape ``(n, D)``, in the default dtype."""
        return self.sample_labeled(n, generator)[0]

    def sample_labeled(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Draws ``n`` points ``(n, D)`` (default dtype) with the label of each one's class, ``(n,)`` int64.

        The same draws as :meth:`sample` with the same generator: the labels come free.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{type(self).__name__}.sample: expected n >= 1, got {n!r}")
        points, labels = self._sample(n, generator)
        return points.to(torch.get_default_dtype()), labels

    def log_prob(self, x: Tensor) -> Tensor:
        """The exact log-density at each of the ``(N, D)`` points, shape ``(N,)``."""
        raise NotImplementedError

    def log_prob_given(self, x: Tensor, labels: Tensor) -> Tensor:
        """The exact ``log p(x | class)`` of ``(N, D)`` points given ``(N,)`` labels, shape ``(N,)``.

        For an equal mixture ``log_prob(x) = logsumexp_k(log_prob_given(x, k)) - log num_classes``.
        """
        self._check_points(x)
        if labels.shape != x.shape[:1] or labels.dtype != torch.int64:
            raise ValueError(
                f"{type(self).__name__}.log_prob_given: expected int64 labels of shape ({x.shape[0]},), got "
                f"{labels.dtype} {tuple(labels.shape)}"
            )
        if bool(((labels < 0) | (labels >= self.num_classes)).any()):
            raise ValueError(
                f"{type(self).__name__}.log_prob_given: expected labels in 0..{self.num_classes - 1}, got "
                f"{sorted(set(labels[(labels < 0) | (labels >= self.num_classes)].tolist()))[:5]}"
            )
        return self._log_prob_given(x, labels.to(x.device))

    def _log_prob_given(self, x: Tensor, labels: Tensor) -> Tensor:
        raise NotImplementedError

    def conditional_entropy(self) -> tuple[float, float]:
        """``H(X | class)`` in nats and its standard error: the floor of a class-conditional model's NLL.

        Monte Carlo over ``ENTROPY_SAMPLES`` labeled points drawn with ``ENTROPY_SEED``. Cached.
        """
        if self._conditional_entropy is None:
            generator = torch.Generator().manual_seed(ENTROPY_SEED)
            points, labels = self._sample(ENTROPY_SAMPLES, generator)
            self._conditional_entropy = nats_mean_and_stderr(-self._log_prob_given(points, labels))
        return self._conditional_entropy

    def entropy(self) -> tuple[float, float]:
        """Differential entropy in nats and its standard error.

        Monte Carlo: the mean of ``-log p`` over ``ENTROPY_SAMPLES`` points drawn with
        the fixed seed ``ENTROPY_SEED``, so the value is reproducible. Cached.
        """
        if self._entropy is None:
            generator = torch.Generator().manual_seed(ENTROPY_SEED)
            points, _ = self._sample(ENTROPY_SAMPLES, generator)
            self._entropy = nats_mean_and_stderr(-self.log_prob(points))
        return self._entropy

    def _sample(self, n: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _check_points(self, x: Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != 2:
            raise ValueError(
                f"{type(self).__name__}.log_prob: expected points of shape (N, 2), "
                f"got {tuple(x.shape)}"
            )
