"""Toy 2D densities whose true density is known, for checking what a flow learned.

Each density samples exactly, evaluates its normalised ``log_prob`` in vectorised torch,
and knows its differential entropy ``H = E[-log p(X)]``: the floor of the test NLL in
nats that a perfect model reaches. Each is an equal mixture of ``num_classes`` parts
(squares, Gaussians, rings, moons), and a sample's label names its part, so the same
sets serve class-conditional density estimation: ``log_prob_given(x, labels)`` is the
exact ``log p(x | class)`` and ``conditional_entropy()`` its floor ``H(X | class)``. ``bounds`` is a box holding all of the mass but a
negligible tail (< 1e-12), for plots and for the normalisation tests.

Samples are drawn on the CPU in float64 (so a seed gives the same points whatever the
default dtype) and returned in the default dtype; ``log_prob`` computes in float64 on
``x``'s device and returns ``x``'s dtype.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from models.metrics import nats_mean_and_stderr

__all__ = ["ToyDensity", "Checkerboard", "EightGaussians", "Rings", "TwoMoons", "TOY_DENSITIES"]

ENTROPY_SAMPLES = 100_000  # Monte Carlo entropy: standard errors of ~3e-3 nats
ENTROPY_SEED = 0
_CHUNK_ELEMENTS = 1 << 22  # (points x components) per chunk of a mixture's log_prob


class ToyDensity:
    """Base class: a 2D density with exact sampling, ``log_prob`` and entropy.

    Subclasses set ``num_classes`` and implement ``_sample(n, generator)`` (float64
    points and their int64 labels), ``log_prob`` and ``_log_prob_given``; those without
    closed-form entropies inherit the Monte Carlo :meth:`entropy` and
    :meth:`conditional_entropy`.
    """

    bounds: tuple[tuple[float, float], tuple[float, float]]
    num_classes: int
    _entropy: tuple[float, float] | None = None
    _conditional_entropy: tuple[float, float] | None = None

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Draws ``n`` independent points, shape ``(n, 2)``, in the default dtype."""
        return self.sample_labelled(n, generator)[0]

    def sample_labelled(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Draws ``n`` points ``(n, 2)`` (default dtype) with the label of each one's class, ``(n,)`` int64.

        The same draws as :meth:`sample` with the same generator: the labels come free.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{type(self).__name__}.sample: expected n >= 1, got {n!r}")
        points, labels = self._sample(n, generator)
        return points.to(torch.get_default_dtype()), labels

    def log_prob(self, x: Tensor) -> Tensor:
        """The exact log-density at each of the ``(N, 2)`` points, shape ``(N,)``."""
        raise NotImplementedError

    def log_prob_given(self, x: Tensor, labels: Tensor) -> Tensor:
        """The exact ``log p(x | class)`` of ``(N, 2)`` points given ``(N,)`` labels, shape ``(N,)``.

        For the equal mixtures here ``log_prob(x) = logsumexp_k(log_prob_given(x, k)) - log num_classes``.
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

        Monte Carlo over ``ENTROPY_SAMPLES`` labelled points drawn with ``ENTROPY_SEED``. Cached.
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

    def _sample(self, n: int, generator: torch.Generator | None) -> Tensor:
        raise NotImplementedError

    def _check_points(self, x: Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != 2:
            raise ValueError(
                f"{type(self).__name__}.log_prob: expected points of shape (N, 2), "
                f"got {tuple(x.shape)}"
            )


def _mixture_log_prob(x: Tensor, centres: Tensor, log_weights: Tensor, std: float) -> Tensor:
    """``log sum_k w_k N(x; c_k, std^2 I)`` for ``x`` (N, 2), in float64, chunked over points.

    The exponent ``log w_k - |x - c_k|^2 / (2 std^2)`` is expanded as
    ``(log w_k - |c_k|^2 / (2 std^2)) + x.c_k / std^2 - |x|^2 / (2 std^2)`` so one
    matrix product does the work; in float64 its cancellation costs ~1e-16 * |x|^2 / std^2.
    """
    var = std**2
    wide = x.to(torch.float64)
    centres, log_weights = centres.to(wide.device), log_weights.to(wide.device)
    offsets = log_weights - centres.square().sum(dim=1) / (2.0 * var)  # (K,)
    chunk = max(1, _CHUNK_ELEMENTS // centres.shape[0])
    parts = []
    for xs in wide.split(chunk):
        exponents = torch.addmm(offsets, xs, centres.T, alpha=1.0 / var)  # (n, K)
        parts.append(torch.logsumexp(exponents, dim=1))
    log_norm = -math.log(2.0 * math.pi * var)
    return (torch.cat(parts) - wide.square().sum(dim=1) / (2.0 * var) + log_norm).to(x.dtype)


class Checkerboard(ToyDensity):
    """Uniform on the 8 black squares of a 4x4 board on ``[-4, 4)^2``.

    Square ``(i, j)`` is ``[-4 + 2i, -2 + 2i) x [-4 + 2j, -2 + 2j)`` and black when
    ``i + j`` is even; ``p = 1/32`` there and 0 elsewhere, so ``H = log 32`` exactly.
    The class of black square ``(i, j)`` is ``2 i + j // 2``; given it, ``p = 1/4`` on
    that square, so ``H(X | class) = log 4``.

    Example:
        >>> board = Checkerboard()
        >>> board.log_prob(torch.tensor([[-3.0, -3.0], [-1.0, -3.0]]))
        tensor([-3.4657,    -inf])
    """

    bounds = ((-4.0, 4.0), (-4.0, 4.0))
    area = 32.0
    num_classes = 8

    def _sample(self, n: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        i = torch.randint(0, 4, (n,), generator=generator, dtype=torch.float64)
        half = torch.randint(0, 2, (n,), generator=generator, dtype=torch.float64)
        j = 2.0 * half + i % 2
        corner = torch.stack([i, j], dim=1) * 2.0 - 4.0
        points = corner + 2.0 * torch.rand(n, 2, generator=generator, dtype=torch.float64)
        return points, (2 * i + half).long()

    def _log_prob_given(self, x: Tensor, labels: Tensor) -> Tensor:
        cell, on_black = self._squares(x)
        mine = 2 * cell[:, 0] + torch.div(cell[:, 1], 2, rounding_mode="floor") == labels
        return self._uniform(on_black & mine, x, self.area / self.num_classes)

    def log_prob(self, x: Tensor) -> Tensor:
        self._check_points(x)
        return self._uniform(self._squares(x)[1], x, self.area)

    @staticmethod
    def _squares(x: Tensor) -> tuple[Tensor, Tensor]:
        """Each point's square indices ``(N, 2)`` and whether that square is a black one on the board."""
        cell = torch.floor((x + 4.0) / 2.0)
        on_black = ((cell >= 0) & (cell <= 3)).all(dim=1) & (cell.sum(dim=1) % 2 == 0)
        return cell, on_black

    @staticmethod
    def _uniform(support: Tensor, x: Tensor, area: float) -> Tensor:
        """``-log(area)`` where ``support`` holds, ``-inf`` elsewhere, in ``x``'s dtype."""
        full = torch.full_like(x[:, 0], -math.log(area))
        return torch.where(support, full, torch.full_like(full, -math.inf))

    def entropy(self) -> tuple[float, float]:
        """``log 32`` exactly, with standard error 0."""
        return math.log(self.area), 0.0

    def conditional_entropy(self) -> tuple[float, float]:
        """``log 4`` exactly, with standard error 0."""
        return math.log(self.area / self.num_classes), 0.0


class EightGaussians(ToyDensity):
    """Equal mixture of 8 isotropic Gaussians on a circle: ``c_k = r (cos, sin)(k pi/4)``.

    Class ``k`` is Gaussian ``k``, so ``H(X | class) = 1 + log(2 pi std^2)`` exactly.

    Args:
        radius: radius of the circle of means.
        std: standard deviation of each component.

    Example:
        >>> EightGaussians().sample(5).shape
        torch.Size([5, 2])
    """

    def __init__(self, radius: float = 2.0, std: float = 0.2) -> None:
        if radius <= 0 or std <= 0:
            raise ValueError(f"EightGaussians: expected radius > 0 and std > 0, got {radius}, {std}")
        self.radius, self.std = radius, std
        angles = torch.arange(8, dtype=torch.float64) * (math.pi / 4.0)
        self.centres = radius * torch.stack([angles.cos(), angles.sin()], dim=1)  # (8, 2)
        edge = radius + 8.0 * std  # 8 std: tail mass exp(-32) ~ 1e-14
        self.bounds = ((-edge, edge), (-edge, edge))

    num_classes = 8

    def _sample(self, n: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        k = torch.randint(0, 8, (n,), generator=generator)
        noise = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return self.centres[k] + self.std * noise, k

    def _log_prob_given(self, x: Tensor, labels: Tensor) -> Tensor:
        var = self.std**2
        sq = (x.to(torch.float64) - self.centres.to(x.device)[labels]).square().sum(dim=1)
        return (-sq / (2.0 * var) - math.log(2.0 * math.pi * var)).to(x.dtype)

    def conditional_entropy(self) -> tuple[float, float]:
        """The entropy of one 2D Gaussian, ``1 + log(2 pi std^2)``, exactly."""
        return 1.0 + math.log(2.0 * math.pi * self.std**2), 0.0

    def log_prob(self, x: Tensor) -> Tensor:
        self._check_points(x)
        log_weights = torch.full((8,), -math.log(8.0), dtype=torch.float64)
        return _mixture_log_prob(x, self.centres, log_weights, self.std)


class Rings(ToyDensity):
    """Equal mixture of rings: a uniform point on a circle of radius ``R_k`` plus noise.

    Each ring is the uniform distribution on its circle convolved with
    ``N(0, std^2 I)``, which integrates over the angle in closed form (a Bessel
    function): ``p_k(x) = exp(-(r^2 + R^2) / (2 std^2)) I0(r R / std^2) / (2 pi std^2)``
    with ``r = |x|``, evaluated stably as ``exp(-(r - R)^2 / (2 std^2)) i0e(r R / std^2)``.
    It is a proper density because it is a probability measure convolved with a Gaussian.
    Class ``k`` is ring ``k``.

    Args:
        radii: radius of each ring.
        std: standard deviation of the noise.

    Example:
        >>> Rings().sample(5).shape
        torch.Size([5, 2])
    """

    def __init__(self, radii: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0), std: float = 0.1) -> None:
        if not radii or min(radii) <= 0 or std <= 0:
            raise ValueError(f"Rings: expected positive radii and std > 0, got {radii}, {std}")
        self.radii = torch.tensor(radii, dtype=torch.float64)
        self.std = std
        self.num_classes = len(radii)
        edge = max(radii) + 8.0 * std  # 8 std: tail mass exp(-32) ~ 1e-14
        self.bounds = ((-edge, edge), (-edge, edge))

    def _sample(self, n: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        k = torch.randint(0, len(self.radii), (n,), generator=generator)
        angle = 2.0 * math.pi * torch.rand(n, generator=generator, dtype=torch.float64)
        circle = self.radii[k, None] * torch.stack([angle.cos(), angle.sin()], dim=1)
        return circle + self.std * torch.randn(n, 2, generator=generator, dtype=torch.float64), k

    def _log_rings(self, x: Tensor) -> Tensor:
        """``log p_k(x)`` of every ring, ``(N, K)``, in float64."""
        r = x.to(torch.float64).norm(dim=1, keepdim=True)  # (N, 1)
        radii = self.radii.to(r.device)
        var = self.std**2
        log_unnormalised = -(r - radii).pow(2) / (2 * var) + torch.special.i0e(r * radii / var).log()
        return log_unnormalised - math.log(2.0 * math.pi * var)

    def log_prob(self, x: Tensor) -> Tensor:
        self._check_points(x)
        return (torch.logsumexp(self._log_rings(x), dim=1) - math.log(len(self.radii))).to(x.dtype)

    def _log_prob_given(self, x: Tensor, labels: Tensor) -> Tensor:
        return self._log_rings(x).gather(1, labels[:, None]).squeeze(1).to(x.dtype)


class TwoMoons(ToyDensity):
    """Two interleaved half circles with Gaussian noise (the layout of sklearn's moons).

    A point is ``c_m(t) + std * eps`` with the moon ``m`` uniform in {0, 1}, ``t``
    uniform on ``[0, pi]``, ``c_0(t) = (cos t, sin t)`` and
    ``c_1(t) = (1 - cos t, 1/2 - sin t)``. The density
    ``p(x) = 1/(2 pi) sum_m int_0^pi N(x; c_m(t), std^2 I) dt`` is evaluated by
    composite Gauss-Legendre quadrature over ``t``: ``num_panels`` panels of 8 nodes
    each, i.e. a Gaussian mixture whose weights sum to 1, so the quadrature density
    is normalised whatever its accuracy. With the defaults each panel spans
    about one noise width of ``t`` and ``log_prob`` agrees with a 4x finer rule to
    ~1e-10 within ``bounds`` (tested). Class ``m`` is moon ``m``.

    Args:
        std: standard deviation of the noise.
        num_panels: number of quadrature panels over ``t``.

    Example:
        >>> TwoMoons().sample(5).shape
        torch.Size([5, 2])
    """

    def __init__(self, std: float = 0.1, num_panels: int = 64) -> None:
        if std <= 0 or num_panels < 1:
            raise ValueError(f"TwoMoons: expected std > 0 and num_panels >= 1, got {std}, {num_panels}")
        self.std = std
        t, w = _composite_gauss_legendre(0.0, math.pi, num_panels, order=8)
        self.centres = torch.cat([self._curve(t, 0), self._curve(t, 1)])  # (2 * nodes, 2)
        self.log_weights = (w / (2.0 * math.pi)).log().repeat(2)
        margin = 8.0 * std  # 8 std: tail mass exp(-32) ~ 1e-14
        self.bounds = ((-1.0 - margin, 2.0 + margin), (-0.5 - margin, 1.0 + margin))

    @staticmethod
    def _curve(t: Tensor, moon: int) -> Tensor:
        if moon == 0:
            return torch.stack([t.cos(), t.sin()], dim=1)
        return torch.stack([1.0 - t.cos(), 0.5 - t.sin()], dim=1)

    num_classes = 2

    def _sample(self, n: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        moon = torch.randint(0, 2, (n, 1), generator=generator)
        t = math.pi * torch.rand(n, generator=generator, dtype=torch.float64)
        centre = torch.where(moon == 0, self._curve(t, 0), self._curve(t, 1))
        return centre + self.std * torch.randn(n, 2, generator=generator, dtype=torch.float64), moon[:, 0]

    def log_prob(self, x: Tensor) -> Tensor:
        self._check_points(x)
        return _mixture_log_prob(x, self.centres, self.log_weights, self.std)

    def _log_prob_given(self, x: Tensor, labels: Tensor) -> Tensor:
        nodes = self.centres.shape[0] // 2  # the first half of the centres are moon 0's
        log_weights = self.log_weights[:nodes] + math.log(2.0)  # each moon's weights sum to 1
        per_moon = [_mixture_log_prob(x, self.centres[m * nodes : (m + 1) * nodes], log_weights, self.std)
                    for m in range(2)]
        return torch.where(labels == 0, per_moon[0], per_moon[1])


def _composite_gauss_legendre(
    a: float, b: float, num_panels: int, order: int
) -> tuple[Tensor, Tensor]:
    """Nodes and weights (float64) of ``order``-point Gauss-Legendre on equal panels."""
    nodes, weights = np.polynomial.legendre.leggauss(order)  # on [-1, 1]
    half = (b - a) / (2 * num_panels)
    mids = a + half * (2 * np.arange(num_panels) + 1)
    t = (mids[:, None] + half * nodes).reshape(-1)
    w = np.tile(half * weights, num_panels)
    return torch.from_numpy(t), torch.from_numpy(w)


TOY_DENSITIES: dict[str, type[ToyDensity]] = {
    "checkerboard": Checkerboard,
    "eight_gaussians": EightGaussians,
    "rings": Rings,
    "two_moons": TwoMoons,
}
