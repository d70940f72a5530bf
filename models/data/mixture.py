"""A Gaussian mixture in ``D`` dimensions whose density is known exactly, and its data set.

For KL-gap experiments: a flow trained on its samples has test NLL ``E[-log q(X)]``,
and ``NLL - H(p) = KL(p || q) >= 0`` where ``H(p)`` is the mixture's entropy, which
:meth:`GaussianMixture.entropy` estimates by Monte Carlo with a standard error.
:func:`load_mixture` is the ``mixture10d`` set of the registry.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .known import KnownDensity
from .split import SPLITS, DataRequest, DataSplit, check_split

__all__ = ["GaussianMixture", "load_mixture"]

MIXTURE_SIZES = {"train": 50_000, "validation": 10_000, "test": 10_000}


class GaussianMixture(KnownDensity):
    """``p(x) = sum_k w_k N(x; mu_k, Sigma_k)`` with full covariances, drawn once from a seed.

    Means are ``N(0, spread^2 I)``; each covariance is ``A A^T / D + diag(u)`` with ``A``
    standard normal and ``u ~ U(0.1, 0.5)``; weights are a softmax of standard normals.
    The same seed gives the same density. ``log_prob`` is exact (a log-sum-exp over the
    components of Cholesky-based Gaussian log-densities, in float64); ``entropy`` is the
    Monte Carlo estimate of :class:`~models.data.known.KnownDensity` (100,000 fixed-seed samples),
    returned with its standard error. Unlike the 2D toy densities, points are ``(N, D)``
    and the components (the classes of :meth:`sample_labeled`) are weighted unequally.

    Args:
        dim: ``D``.
        num_components: ``K``.
        spread: standard deviation of the component means.
        seed: seed of the means, covariances and weights.

    Example:
        >>> mixture = GaussianMixture(dim=10, num_components=4)
        >>> x = mixture.sample(3)
        >>> x.shape, mixture.log_prob(x).shape
        (torch.Size([3, 10]), torch.Size([3]))
    """

    def __init__(self, dim: int = 10, num_components: int = 5, spread: float = 2.0, seed: int = 0) -> None:
        if dim < 1 or num_components < 1 or spread < 0:
            raise ValueError(
                f"GaussianMixture expected dim >= 1, num_components >= 1 and spread >= 0, "
                f"got {dim}, {num_components} and {spread}"
            )
        self.dim, self.num_components, self.num_classes = dim, num_components, num_components
        g = torch.Generator().manual_seed(seed)
        f64 = torch.float64
        self.means = spread * torch.randn(num_components, dim, generator=g, dtype=f64)  # (K, D)
        factors = torch.randn(num_components, dim, dim, generator=g, dtype=f64)
        diagonal = 0.1 + 0.4 * torch.rand(num_components, dim, generator=g, dtype=f64)
        covariances = factors @ factors.mT / dim + torch.diag_embed(diagonal)  # (K, D, D)
        self.scale_tril = torch.linalg.cholesky(covariances)
        self.log_weights = torch.log_softmax(torch.randn(num_components, generator=g, dtype=f64), 0)
        std = covariances.diagonal(dim1=1, dim2=2).sqrt()  # (K, D)
        low = (self.means - 8 * std).amin(0)
        high = (self.means + 8 * std).amax(0)
        self.bounds = tuple((float(a), float(b)) for a, b in zip(low, high))  # 8 std per axis

    def _sample(self, n: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        k = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, 1, generator=generator, dtype=torch.float64)
        return self.means[k] + (self.scale_tril[k] @ noise).squeeze(-1), k  # (n, D), (n,)

    def _component_log_probs(self, x: Tensor) -> Tensor:
        """``log N(x; mu_k, Sigma_k)`` of every component, ``(K, N)``, in float64."""
        wide = x.to(torch.float64)
        diff = (wide[None] - self.means[:, None]).mT  # (K, D, N)
        white = torch.linalg.solve_triangular(self.scale_tril, diff, upper=False)  # L^-1 (x - mu)
        log_det = self.scale_tril.diagonal(dim1=1, dim2=2).log().sum(1)  # (K,) = log|L_k|
        return -0.5 * white.square().sum(1) - log_det[:, None] - 0.5 * self.dim * math.log(2 * math.pi)

    def log_prob(self, x: Tensor) -> Tensor:
        """The exact log-density at each of the ``(N, D)`` points, shape ``(N,)``."""
        self._check_points(x)
        return torch.logsumexp(self._component_log_probs(x) + self.log_weights[:, None], dim=0).to(x.dtype)

    def _log_prob_given(self, x: Tensor, labels: Tensor) -> Tensor:
        return self._component_log_probs(x).gather(0, labels[None]).squeeze(0).to(x.dtype)

    def _check_points(self, x: Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(
                f"GaussianMixture.log_prob: expected points of shape (N, {self.dim}), got {tuple(x.shape)}"
            )


def load_mixture(request: DataRequest) -> DataSplit:
    """``mixture10d``: a fixed-seed sample of :class:`GaussianMixture` (10-D, 5 components),
    labeled by component; 50,000 train and 10,000 validation / test points by default;
    ``density`` is exact."""
    check_split(request.split, "mixture10d")
    density = GaussianMixture(dim=10, num_components=5)
    n = request.num_samples or MIXTURE_SIZES[request.split]
    generator = torch.Generator().manual_seed(3 * request.seed + SPLITS.index(request.split))
    points, labels = density.sample_labeled(n, generator)  # labels: the component of each point
    return DataSplit("mixture10d", points.float(), "vector", labels=labels, density=density,
                     num_classes=density.num_classes)
