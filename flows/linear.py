"""Invertible linear maps on dim 1: Glow's 1x1 convolution and fixed permutations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flows.base import Flow, constant_logdet, inside_function_transform, spatial_size, zero_logdet
from flows.validation import check_input

__all__ = ["InvConv1x1", "Permutation", "Reverse"]


def _apply_channel_matrix(weight: Tensor, x: Tensor) -> Tensor:
    """``y[:, i] = sum_j weight[i, j] x[:, j]`` for ``(B, C)`` or ``(B, C, H, W)`` inputs."""
    if x.dim() == 2:
        return F.linear(x, weight)
    b, c = x.shape[:2]
    # bmm against the weight expanded (stride 0) over the batch reads x in place; a plain
    # matmul folds (C, C) @ (B, C, H*W) into one mm through transposed copies, and a 1x1
    # conv2d is slower still: forward + backward 1.6-2.4x faster than either on CPU at
    # Glow's channel counts (measured for C = 12, 24, 48, batch 32).
    return torch.bmm(weight.expand(b, c, c), x.reshape(b, c, -1)).view(x.shape)


class _WeightCache:
    """Holds tensors derived from weights alone, valid while the weights are unchanged.

    The key records each parameter's in-place version counter and storage, so an
    optimizer step, ``load_state_dict`` or ``.to()`` invalidates it without a host sync.
    """

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.value: tuple[Tensor, Tensor] | None = None

    @staticmethod
    def make_key(params: list[Tensor]) -> tuple:
        return tuple((p._version, p.data_ptr(), p.dtype, p.device) for p in params) + (
            torch.is_inference_mode_enabled(),
        )


class InvConv1x1(Flow):
    """Invertible 1x1 convolution (Glow), or an invertible linear layer on vectors.

    ``y[:, :, h, w] = W x[:, :, h, w]``; ``logdet = H*W * log|det W|`` (``H*W = 1`` for vectors).

    With ``lu=True`` the weight is ``W = P L (U + diag(sign * exp(log_s)))`` with ``P`` a
    fixed permutation, ``L`` unit lower-triangular and ``U`` strictly upper-triangular, so
    ``log|det W| = sum(log_s)`` costs ``O(C)`` and the inverse comes from two triangular
    solves. With ``lu=False`` ``W`` is a full matrix and ``log|det W|`` is its ``slogdet``.
    Initialized to a random rotation. In eval mode the weight and its inverse are cached
    (detached from autograd) until a parameter changes; train mode and ``torch.func``
    transforms recompute them (the inverse only when ``inverse`` is called).

    Args:
        features: ``C`` (the size of dim 1); inputs are ``(B, C)`` or ``(B, C, H, W)``.
        lu: use the LU parametrization.
        seed: seed of the random rotation (``None``: the global generator).

    References:
        Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions",
        NeurIPS 2018, arXiv:1807.03039.

    Example:
        >>> import torch, flows
        >>> conv = flows.InvConv1x1(4, seed=0)
        >>> x = torch.randn(2, 4, 3, 3)
        >>> z, logdet = conv(x)
        >>> torch.allclose(conv.inverse(z)[0], x, atol=1e-5)
        True
    """

    def __init__(self, features: int, lu: bool = True, seed: int | None = None) -> None:
        super().__init__()
        if features < 1:
            raise ValueError(f"InvConv1x1 needs features >= 1, got {features}")
        self.features = features
        self.lu = lu
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        rotation, _ = torch.linalg.qr(torch.randn(features, features, generator=generator))
        if lu:
            self._init_lu(rotation)
        else:
            self.weight = nn.Parameter(rotation)
        self._caches = {False: _WeightCache(), True: _WeightCache()}  # forward, inverse

    def _init_lu(self, rotation: Tensor) -> None:
        permutation, lower, upper = torch.linalg.lu(rotation)
        diagonal = torch.diagonal(upper)
        # P as an index: row i of P @ A is row permutation_index[i] of A.
        self.register_buffer("permutation_index", permutation.argmax(1))
        self.register_buffer("sign_s", torch.sign(diagonal))
        self.register_buffer("lower_mask", torch.tril(torch.ones_like(rotation), -1))
        self.lower = nn.Parameter(lower * self.lower_mask)
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_s = nn.Parameter(torch.log(diagonal.abs()))

    def _factors(self) -> tuple[Tensor, Tensor]:
        """Unit lower ``L`` and upper ``U + diag(sign * exp(log_s))``."""
        eye = torch.eye(self.features, dtype=self.lower.dtype, device=self.lower.device)
        lower = self.lower * self.lower_mask + eye
        upper = torch.triu(self.upper, 1) + torch.diag(self.sign_s * self.log_s.exp())
        return lower, upper

    def _compute(self, inverse: bool) -> tuple[Tensor, Tensor]:
        """``(W, log|det W|)``, or ``(W^-1, log|det W|)`` when ``inverse``, from the parameters."""
        if not self.lu:
            _, log_abs_det = torch.linalg.slogdet(self.weight)
            return (torch.linalg.inv(self.weight) if inverse else self.weight), log_abs_det
        lower, upper = self._factors()
        if not inverse:
            # P L U with P a permutation matrix: permuting rows, no matmul needed.
            return (lower @ upper)[self.permutation_index], self.log_s.sum()
        eye = torch.eye(self.features, dtype=lower.dtype, device=lower.device)
        # W^-1 = U^-1 L^-1 P^T by two triangular solves: O(C^3 / 3) each, no dense inverse.
        lower_inv = torch.linalg.solve_triangular(lower, eye, upper=False, unitriangular=True)
        inverse_weight = torch.linalg.solve_triangular(upper, lower_inv, upper=True)
        return inverse_weight[:, self.permutation_index], self.log_s.sum()  # (U^-1 L^-1) P^T

    def _weights(self, inverse: bool) -> tuple[Tensor, Tensor]:
        if self.training or inside_function_transform():
            return self._compute(inverse)
        cache = self._caches[inverse]
        key = _WeightCache.make_key(list(self.parameters()))
        if cache.key != key:
            with torch.no_grad():
                cache.value = self._compute(inverse)
            cache.key = key
        return cache.value

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_input("InvConv1x1", x, self.features)
        weight, log_abs_det = self._weights(inverse=False)
        return _apply_channel_matrix(weight, x), self._logdet(log_abs_det, x)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_input("InvConv1x1", y, self.features)
        inverse_weight, log_abs_det = self._weights(inverse=True)
        return _apply_channel_matrix(inverse_weight, y), -self._logdet(log_abs_det, y)

    @staticmethod
    def _logdet(log_abs_det: Tensor, x: Tensor) -> Tensor:
        return constant_logdet(log_abs_det * spatial_size(x), x)


class Permutation(Flow):
    """A fixed permutation of dim 1: ``y[:, i] = x[:, perm[i]]``; ``logdet = 0``.

    Args:
        features: size of dim 1; inputs ``(B, D)`` or ``(B, C, H, W)``.
        seed: seed of the random permutation (``None``: the global generator).

    Example:
        >>> import torch, flows
        >>> p = flows.Permutation(5, seed=0)
        >>> x = torch.randn(2, 5)
        >>> torch.equal(p.inverse(p(x)[0])[0], x)
        True
    """

    def __init__(self, features: int, seed: int | None = None) -> None:
        super().__init__()
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        permutation = torch.randperm(features, generator=generator)
        self.features = features
        self.register_buffer("permutation", permutation)
        self.register_buffer("inverse_permutation", torch.argsort(permutation))

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_input("Permutation", x, self.features)
        return x[:, self.permutation], zero_logdet(x)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_input("Permutation", y, self.features)
        return y[:, self.inverse_permutation], zero_logdet(y)


class Reverse(Flow):
    """Reverses the order of dim 1 (NICE / RealNVP's alternation); ``logdet = 0``.

    The size of dim 1 is taken from the first input when not given.

    Example:
        >>> import torch, flows
        >>> flows.Reverse()(torch.tensor([[1., 2., 3.]]))[0]
        tensor([[3., 2., 1.]])
    """

    def __init__(self, features: int | None = None) -> None:
        super().__init__()
        self.features = features

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_input("Reverse", x, self.features)
        return x.flip(1), zero_logdet(x)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.forward(y, context)
