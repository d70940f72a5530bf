"""Fixed elementwise bijections used as preprocessing: scaling and RealNVP's logit.

Preprocessing that changes density is a flow layer, so a reported likelihood includes
its log-determinant and is a likelihood of the data as given.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from flows.base import Flow, constant_logdet, sum_per_sample
from flows.validation import check_input

__all__ = ["ScalarAffine", "Logit"]


class ScalarAffine(Flow):
    """``y = x * scale + shift`` elementwise; ``logdet = D * log|scale|``.

    For example ``ScalarAffine(1 / 256)`` maps dequantized 8-bit levels ``[0, 256)`` to
    ``[0, 1)``, so the model's likelihood is of the data in level units.

    Args:
        scale: a non-zero number.
        shift: a number.

    Example:
        >>> import torch
        >>> y, logdet = ScalarAffine(0.5)(torch.ones(1, 4))
        >>> y, logdet
        (tensor([[0.5000, 0.5000, 0.5000, 0.5000]]), tensor([-2.7726]))
    """

    def __init__(self, scale: float, shift: float = 0.0) -> None:
        super().__init__()
        if scale == 0 or not math.isfinite(scale):
            raise ValueError(f"ScalarAffine needs a finite non-zero scale, got {scale}")
        self.scale = float(scale)
        self.shift = float(shift)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_input("ScalarAffine", x, ranks=(2, 3, 4))
        return x * self.scale + self.shift, constant_logdet(math.log(abs(self.scale)) * math.prod(x.shape[1:]), x)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_input("ScalarAffine", y, ranks=(2, 3, 4))
        return (y - self.shift) / self.scale, constant_logdet(-math.log(abs(self.scale)) * math.prod(y.shape[1:]), y)

    def jacobian_mask(self, shape: tuple[int, ...]) -> Tensor:
        return torch.eye(torch.Size(shape).numel(), dtype=torch.bool)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, shift={self.shift}"


class Logit(Flow):
    """RealNVP's logit preprocessing: ``y = logit(alpha + (1 - 2 alpha) x)`` for ``x`` in [0, 1].

    ``logdet = sum log(1 - 2 alpha) - log(s) - log(1 - s)`` with ``s = alpha + (1 - 2 alpha) x``.
    ``alpha`` keeps ``s`` away from 0 and 1 (0.05 for CIFAR-10, 1e-6 for MNIST in the paper).

    Args:
        alpha: the margin, in ``[0, 0.5)``.

    References:
        Dinh, Sohl-Dickstein & Bengio, "Density estimation using Real NVP", ICLR 2017,
        arXiv:1605.08803, section 4.1.

    Example:
        >>> import torch
        >>> layer = Logit(0.05)
        >>> x = torch.rand(2, 3)
        >>> torch.allclose(layer.inverse(layer(x)[0])[0], x, atol=1e-6)
        True
    """

    def __init__(self, alpha: float = 0.05) -> None:
        super().__init__()
        if not 0 <= alpha < 0.5:
            raise ValueError(f"Logit needs 0 <= alpha < 0.5, got {alpha}")
        self.alpha = float(alpha)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_input("Logit", x, ranks=(2, 3, 4))
        s = self.alpha + (1 - 2 * self.alpha) * x
        y = torch.log(s) - torch.log1p(-s)
        # log ds/dx + log dy/ds, with log dy/ds = -log s - log(1 - s) = softplus(-y) + softplus(y).
        log_derivative = math.log(1 - 2 * self.alpha) + F.softplus(-y) + F.softplus(y)
        return y, sum_per_sample(log_derivative)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_input("Logit", y, ranks=(2, 3, 4))
        x = (torch.sigmoid(y) - self.alpha) / (1 - 2 * self.alpha)
        log_derivative = math.log(1 - 2 * self.alpha) + F.softplus(-y) + F.softplus(y)
        return x, -sum_per_sample(log_derivative)

    def jacobian_mask(self, shape: tuple[int, ...]) -> Tensor:
        return torch.eye(torch.Size(shape).numel(), dtype=torch.bool)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"
