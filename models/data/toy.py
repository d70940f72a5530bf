"""Toy 2D densities whose true density is known, for checking what a flow learned, and
their data sets.

Each is a :class:`~models.data.known.KnownDensity` (exact sampling, normalized
``log_prob``, entropy) and an equal mixture of ``num_classes`` parts (squares, Gaussians,
rings, moons) whose labels name the part, so the same sets serve class-conditional
density estimation. ``TOY`` maps each name to a loader: a fixed-seed sample of the true
density, 50,000 points for ``train`` and 10,000 for ``test`` by default;
``DataSplit.density`` is the density.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .known import KnownDensity
from .split import DataRequest, DataSplit, Loader, check_split

__all__ = ["Checkerboard", "EightGaussians", "Rings", "TwoMoons", "TOY_DENSITIES", "TOY"]

TOY_SIZES = {"train": 50_000, "test": 10_000}  # the splits of a toy set and their default sizes
_CHUNK_ELEMENTS = 1 << 22  # (points x components) per chunk of a mixture's log_prob


def _mixture_log_prob(x: Tensor, centers: Tensor, log_weights: Tensor, std: float) -> Tensor:
    """``log sum_k w_k N(x; c_k, std^2 I)`` for ``x`` (N, 2), in float64, chunked over points.

    The exponent ``log w_k - |x - c_k|^2 / (2 std^2)`` is expanded as
    ``(log w_k - |c_k|^2 / (2 std^2)) + x.c_k / std^2 - |x|^2 / (2 std^2)`` so one
    matrix product does the work; in float64 its cancellation costs ~1e-16 * |x|^2 / std^2.
    """
    var = std**2
    wide = x.to(torch.float64)
    centers, log_weights = centers.to(wide.device), log_weights.to(wide.device)
    offsets = log_weights - centers.square().sum(dim=1) / (2.0 * var)  # (K,)
    chunk = max(1, _CHUNK_ELEMENTS // centers.shape[0])
    parts = []
    for xs in wide.split(chunk):
        exponents = torch.addmm(offsets, xs, centers.T, alpha=1.0 / var)  # (n, K)
        parts.append(torch.logsumexp(exponents, dim=1))
    log_norm = -math.log(2.0 * math.pi * var)
    return (torch.cat(parts) - wide.square().sum(dim=1) / (2.0 * var) + log_norm).to(x.dtype)


class Checkerboard(KnownDensity):
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


class EightGaussians(KnownDensity):
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
        self.centers = radius * torch.stack([angles.cos(), angles.sin()], dim=1)  # (8, 2)
        edge = radius + 8.0 * std  # 8 std: tail mass exp(-32) ~ 1e-14
        self.bounds = ((-edge, edge), (-edge, edge))

    num_classes = 8

    def _sample(self, n: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        k = torch.randint(0, 8, (n,), generator=generator)
        noise = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return self.centers[k] + self.std * noise, k

    def _log_prob_given(self, x: Tensor, labels: Tensor) -> Tensor:
        var = self.std**2
        sq = (x.to(torch.float64) - self.centers.to(x.device)[labels]).square().sum(dim=1)
        return (-sq / (2.0 * var) - math.log(2.0 * math.pi * var)).to(x.dtype)

    def conditional_entropy(self) -> tuple[float, float]:
        """The entropy of one 2D Gaussian, ``1 + log(2 pi std^2)``, exactly."""
        return 1.0 + math.log(2.0 * math.pi * self.std**2), 0.0

    def log_prob(self, x: Tensor) -> Tensor:
        self._check_points(x)
        log_weights = torch.full((8,), -math.log(8.0), dtype=torch.float64)
        return _mixture_log_prob(x, self.centers, log_weights, self.std)


class Rings(KnownDensity):
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
        log_unnormalized = -(r - radii).pow(2) / (2 * var) + torch.special.i0e(r * radii / var).log()
        return log_unnormalized - math.log(2.0 * math.pi * var)

    def log_prob(self, x: Tensor) -> Tensor:
        self._check_points(x)
        return (torch.logsumexp(self._log_rings(x), dim=1) - math.log(len(self.radii))).to(x.dtype)

    def _log_prob_given(self, x: Tensor, labels: Tensor) -> Tensor:
        return self._log_rings(x).gather(1, labels[:, None]).squeeze(1).to(x.dtype)


class TwoMoons(KnownDensity):
    """Two interleaved half circles with Gaussian noise (the layout of sklearn's moons).

    A point is ``c_m(t) + std * eps`` with the moon ``m`` uniform in {0, 1}, ``t``
    uniform on ``[0, pi]``, ``c_0(t) = (cos t, sin t)`` and
    ``c_1(t) = (1 - cos t, 1/2 - sin t)``. The density
    ``p(x) = 1/(2 pi) sum_m int_0^pi N(x; c_m(t), std^2 I) dt`` is evaluated by
    composite Gauss-Legendre quadrature over ``t``: ``num_panels`` panels of 8 nodes
    each, i.e. a Gaussian mixture whose weights sum to 1, so the quadrature density
    is normalized whatever its accuracy. With the defaults each panel spans
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
        self.centers = torch.cat([self._curve(t, 0), self._curve(t, 1)])  # (2 * nodes, 2)
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
        center = torch.where(moon == 0, self._curve(t, 0), self._curve(t, 1))
        return center + self.std * torch.randn(n, 2, generator=generator, dtype=torch.float64), moon[:, 0]

    def log_prob(self, x: Tensor) -> Tensor:
        self._check_points(x)
        return _mixture_log_prob(x, self.centers, self.log_weights, self.std)

    def _log_prob_given(self, x: Tensor, labels: Tensor) -> Tensor:
        nodes = self.centers.shape[0] // 2  # the first half of the centers are moon 0's
        log_weights = self.log_weights[:nodes] + math.log(2.0)  # each moon's weights sum to 1
        per_moon = [_mixture_log_prob(x, self.centers[m * nodes : (m + 1) * nodes], log_weights, self.std)
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


TOY_DENSITIES: dict[str, type[KnownDensity]] = {
    "checkerboard": Checkerboard,
    "eight_gaussians": EightGaussians,
    "rings": Rings,
    "two_moons": TwoMoons,
}


def _toy_loader(name: str) -> Loader:
    """The loader of toy set ``name``: a fixed-seed sample of its true density."""

    def load(request: DataRequest) -> DataSplit:
        check_split(request.split, name, tuple(TOY_SIZES))
        density = TOY_DENSITIES[name]()
        n = request.num_samples or TOY_SIZES[request.split]
        # One stream per (seed, split), so train and test never share points.
        stream = 2 * request.seed + list(TOY_SIZES).index(request.split)
        generator = torch.Generator().manual_seed(stream)
        data, labels = density.sample_labeled(n, generator)  # drawn in float64
        return DataSplit(name, data.to(torch.float32), "toy2d", labels=labels, density=density,
                         num_classes=density.num_classes)

    return load


TOY: dict[str, Loader] = {name: _toy_loader(name) for name in TOY_DENSITIES}
