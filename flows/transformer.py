"""Transformer autoregressive flows (TarFlow): image patches, an affine autoregressive map over
them whose parameters come from a causal transformer, and its inverse by fixed-point iteration.

Patch ``t`` is transformed by ``z_t = x_t * exp(s_t) + t_t`` with ``(t_t, s_t)`` computed from
the patches before it, so the Jacobian over the flattened sample, in patch order, is
block-triangular with a diagonal diagonal block: ``log|det| = sum s``. The density direction
(``forward``) is one transformer pass; the inverse solves for the patches one block at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from flows.attention import CausalTransformer, KVCache
from flows.base import Flow, sum_per_sample, zero_logdet
from flows.maps import AffineMap
from flows.validation import check_context, check_input

__all__ = ["Patchify", "FixedPoint", "Solution", "TransformerAutoregressive"]


class Patchify(Flow):
    """``(B, C, H, W) -> (B, T, P)``: non-overlapping ``p x p`` patches in raster order; ``logdet = 0``.

    ``T = (H/p)(W/p)`` patches of ``P = C p^2`` values, each ordered ``(channel, row, column)``.
    ``flows.Inverse(Patchify(...))`` puts the patches back.

    Args:
        shape: one image's shape ``(C, H, W)``; ``H`` and ``W`` divisible by ``patch_size``.
        patch_size: ``p``.

    Example:
        >>> import torch
        >>> Patchify((3, 4, 6), patch_size=2)(torch.randn(5, 3, 4, 6))[0].shape
        torch.Size([5, 6, 12])
    """

    def __init__(self, shape: tuple[int, int, int], patch_size: int) -> None:
        super().__init__()
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3 or not isinstance(patch_size, int) or patch_size < 1:
            raise ValueError(f"Patchify expects shape (C, H, W) and patch_size >= 1, got {shape} and {patch_size!r}")
        if shape[1] % patch_size or shape[2] % patch_size:
            raise ValueError(
                f"Patchify(patch_size={patch_size}) needs H and W divisible by {patch_size}, got image shape "
                f"{shape}; pad or crop the images, or pick another patch size"
            )
        self.shape = shape
        self.patch_size = patch_size
        channels, height, width = shape
        self.num_patches = (height // patch_size) * (width // patch_size)
        self.patch_features = channels * patch_size**2

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_input("Patchify", x, ranks=(4,))
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"Patchify expects images of shape (B, {', '.join(map(str, self.shape))}), got {tuple(x.shape)}")
        return self._patches(x), zero_logdet(x)

    def _patches(self, x: Tensor) -> Tensor:
        (c, h, w), p = self.shape, self.patch_size
        y = x.reshape(x.shape[0], c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)  # (B, H/p, W/p, C, p, p)
        return y.reshape(x.shape[0], self.num_patches, self.patch_features)  # (B, T, P)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_input("Patchify.inverse", y, ranks=(3,))
        if tuple(y.shape[1:]) != (self.num_patches, self.patch_features):
            raise ValueError(
                f"Patchify.inverse expects patches of shape (B, {self.num_patches}, {self.patch_features}), "
                f"got {tuple(y.shape)}"
            )
        (c, h, w), p = self.shape, self.patch_size
        x = y.reshape(y.shape[0], h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5)  # (B, C, H/p, p, W/p, p)
        return x.reshape(y.shape[0], c, h, w), zero_logdet(y)

    def jacobian_mask(self, shape: tuple[int, ...]) -> Tensor:
        """A permutation: output ``i`` is input ``source[i]``."""
        source = self._patches(torch.arange(math.prod(shape), dtype=torch.float64).view(1, *shape)).flatten().long()
        mask = torch.zeros(source.numel(), source.numel(), dtype=torch.bool)
        mask[torch.arange(source.numel()), source] = True
        return mask


@dataclass(frozen=True)
class FixedPoint:
    """How :meth:`TransformerAutoregressive.solve` inverts: Gauss-Seidel over blocks of
    ``block_size`` patches, Jacobi iterations inside a block.

    Each iteration recomputes the parameters of a block's patches from the current guess
    (one transformer pass over the block, the earlier blocks read from the key/value cache)
    and inverts the affine map. Patch ``j`` of a block is exact after ``j + 1`` iterations,
    so ``block_size`` iterations invert exactly; fewer are an approximation.

    - ``FixedPoint()`` (``block_size=1``): the exact sequential inverse, one patch per pass.
    - ``FixedPoint(block_size=None, tolerance=1e-4)``: Jacobi over all patches at once,
      stopped when no entry moves by more than ``tolerance``.

    Args:
        block_size: patches solved together; ``None``: all of them.
        max_iterations: iterations per block at most; ``None``: the block's size (exact).
        tolerance: stop a block once its largest change is at most this; 0 never stops early
            (this check costs one host synchronization per iteration, so 0 costs none).
    """

    block_size: int | None = 1
    max_iterations: int | None = None
    tolerance: float = 0.0

    def __post_init__(self) -> None:
        for name in ("block_size", "max_iterations"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"FixedPoint {name} must be an integer >= 1 or None, got {value!r}")
        if not self.tolerance >= 0:
            raise ValueError(f"FixedPoint tolerance must be >= 0, got {self.tolerance!r}")


@dataclass(frozen=True)
class Solution:
    """What :meth:`TransformerAutoregressive.solve` returns.

    Attributes:
        x: ``(B, T, P)``, the inverse.
        logdet: ``(B,)``, ``log|det dx/dz|`` of the map applied.
        passes: transformer passes run (the iterations, over all blocks).
    """

    x: Tensor
    logdet: Tensor
    passes: int


class TransformerAutoregressive(Flow):
    """TarFlow's flow block: an affine autoregressive map over patches, conditioned by a causal transformer.

    ``z_t = x_t * exp(s_t) + m_t`` for each patch ``t`` of ``(B, T, P)`` patches, with
    ``(m_t, s_t) = f(x_<t, context)`` from a :class:`flows.attention.CausalTransformer`
    (:class:`flows.maps.AffineMap`: ``s`` soft-clamped). The transformer reads the sequence
    shifted by one, ``(0, x_0, ..., x_{T-2})``: the first patch's parameters come from a
    learned start token (the position-0 embedding of a zero patch, plus the context), so
    it too is transformed, given the context only. ``logdet = sum_t sum_p s_t``. The paper's
    ``z = (x - mu) exp(-alpha)`` is the same map with ``alpha = -s``, ``mu = -m exp(-s)``.

    ``order="reversed"`` runs the autoregression from the last patch to the first (TarFlow
    alternates it between blocks). ``forward`` (the density direction) is one transformer
    pass; ``inverse`` is the exact sequential inverse with a key/value cache, one patch per
    pass (``T`` passes of one position); :meth:`solve` also offers Jacobi / Gauss-Seidel
    fixed-point iterations and classifier-free guidance. Accepts ``(B, T, P)``; use
    :class:`Patchify` for images. A new layer is the identity (the transformer's output
    layer is zero-initialized).

    Args:
        features: ``P``, values per patch.
        num_patches: ``T``.
        hidden_features: the transformer's width (TarFlow's "channels").
        num_blocks: transformer layers (TarFlow's "layers per block").
        num_heads: attention heads; ``None``: ``hidden_features // 64`` (heads of 64, as in
            TarFlow), at least 1.
        context_features: size ``K`` of a ``(B, K)`` context (e.g. a one-hot class); 0 for none.
        order: ``"natural"`` (patch 0 first) or ``"reversed"``.
        clamp: bound of ``s`` (TarFlow has none; the soft clamp keeps early training stable).

    References:
        Zhai et al., "Normalizing Flows are Capable Generative Models", ICML 2025,
        arXiv:2412.06329. Papamakarios et al., "Masked Autoregressive Flow for Density
        Estimation", NeurIPS 2017, arXiv:1705.07057.

    Example:
        >>> import torch
        >>> layer = TransformerAutoregressive(4, num_patches=6, hidden_features=16, num_blocks=1)
        >>> x = torch.randn(3, 6, 4)
        >>> z, logdet = layer(x)
        >>> torch.allclose(layer.inverse(z)[0], x, atol=1e-5), logdet.shape
        (True, torch.Size([3]))
    """

    #: ``inverse`` takes ``T`` sequential transformer passes.
    iterative_inverse = True

    def __init__(
        self,
        features: int,
        num_patches: int,
        hidden_features: int = 768,
        num_blocks: int = 8,
        num_heads: int | None = None,
        context_features: int = 0,
        order: str = "natural",
        clamp: float = 4.0,
    ) -> None:
        super().__init__()
        if order not in ("natural", "reversed"):
            raise ValueError(f"TransformerAutoregressive order must be 'natural' or 'reversed', got {order!r}")
        num_heads = max(1, hidden_features // 64) if num_heads is None else num_heads
        self.features = features
        self.num_patches = num_patches
        self.context_features = context_features
        self.order = order
        self.elementwise = AffineMap("exp", clamp)
        self.conditioner = CausalTransformer(
            features, 2 * features, num_patches, hidden_features, num_blocks, num_heads, context_features
        )

    def _validate(self, x: Tensor, context: Tensor | None) -> None:
        name = type(self).__name__
        check_input(name, x, ranks=(3,))
        if tuple(x.shape[1:]) != (self.num_patches, self.features):
            raise ValueError(
                f"{name} expects input of shape (B, {self.num_patches}, {self.features}) (batch, patches, "
                f"values per patch), got {tuple(x.shape)}; use flows.Patchify to turn images into patches"
            )
        check_context(name, context, self.context_features, x.shape[0])

    def _ordered(self, x: Tensor) -> Tensor:
        """``x`` in autoregressive order (an involution: also takes it back)."""
        return x.flip(1) if self.order == "reversed" else x

    def _params(self, inputs: Tensor, context: Tensor | None, cache: KVCache | None = None) -> Tensor:
        """``(B, L, P, 2)`` affine parameters of the positions after ``inputs``' (shift, raw log-scale)."""
        out = self.conditioner(inputs, context, cache)  # (B, L, 2P), unit 2p + k
        return out.view(*inputs.shape, 2)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._validate(x, context)
        sequence = self._ordered(x)
        # Shift by one: the transformer's output t, which sees inputs <= t, parametrizes patch t.
        inputs = torch.cat([sequence.new_zeros(x.shape[0], 1, self.features), sequence[:, :-1]], 1)
        z, log_scale = self.elementwise.forward(sequence, self._params(inputs, context))
        return self._ordered(z), sum_per_sample(log_scale)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The exact inverse: one patch per transformer pass, earlier patches from the cache."""
        solution = self.solve(y, context)
        return solution.x, solution.logdet

    def solve(
        self, y: Tensor, context: Tensor | None = None, fixed_point: FixedPoint = FixedPoint(), guidance: float = 0.0
    ) -> Solution:
        """Inverts by fixed-point iteration (:class:`FixedPoint`), optionally with guidance.

        With ``guidance = w != 0`` (TarFlow's classifier-free guidance) every
        step also computes the parameters under the null context (zeros) and extrapolates
        the paper's mean and log-scale, ``mu = mu_c + w (mu_c - mu_u)`` and ``alpha =
        alpha_c + w (alpha_c - alpha_u)``, then takes ``x = z exp(alpha) + mu``: a different
        map, no longer the inverse of ``forward``; ``logdet = sum alpha`` is its own.
        The null context is what a model trained with context dropout (rows zeroed) learned
        as "no condition".

        Args:
            y: ``(B, T, P)`` latent.
            context: ``(B, K)``; required for guidance.
            fixed_point: block size, iterations and tolerance; the default is exact.
            guidance: the weight ``w``; 0 for none.
        """
        self._validate(y, context)
        if guidance and context is None:
            raise ValueError(f"{type(self).__name__}.solve needs a context for guidance={guidance}, got context=None")
        if guidance:
            context = torch.cat([context, torch.zeros_like(context)])  # conditional rows, then null rows
        sequence = self._ordered(y)
        block_size = fixed_point.block_size or self.num_patches
        cache = KVCache(len(self.conditioner.layers))
        previous = sequence.new_zeros(y.shape[0], 1, self.features)  # input of position 0: the start
        solved, log_scales, passes = [], [], 0
        for start in range(0, self.num_patches, block_size):
            target = sequence[:, start : start + block_size]  # (B, L, P)
            x, log_scale, iterations = self._solve_block(target, previous, context, cache, fixed_point, guidance)
            solved.append(x)
            log_scales.append(log_scale)
            passes += iterations
            previous = x[:, -1:]
        x = self._ordered(torch.cat(solved, 1))
        return Solution(x, sum_per_sample(torch.cat(log_scales, 1)), passes)

    def _solve_block(
        self, target: Tensor, previous: Tensor, context: Tensor | None, cache: KVCache, fixed_point: FixedPoint,
        guidance: float,
    ) -> tuple[Tensor, Tensor, int]:
        """Jacobi iterations on one block of ``L`` patches after the cached ones; commits its keys and values.

        Returns the block's ``x``, its ``log|dx/dz|`` per entry and the iterations run.
        """
        length = target.shape[1]
        current = target  # first guess: the latent itself
        iterations = min(fixed_point.max_iterations or length, length)
        for iteration in range(1, iterations + 1):
            inputs = torch.cat([previous, current[:, :-1]], 1)  # shifted by one, as in forward
            params = self._params(torch.cat([inputs, inputs]) if guidance else inputs, context, cache)
            update, log_scale = self._invert(target, params, guidance)
            converged = fixed_point.tolerance > 0 and bool((update - current).abs().amax() <= fixed_point.tolerance)
            current = update
            if converged:
                break
        # The last pass read the block's inputs from the guess before its update: exact after L
        # iterations (input j is patch j - 1, exact after j), within the tolerance otherwise.
        cache.commit(length)
        return current, log_scale, iteration

    def _invert(self, z: Tensor, params: Tensor, guidance: float) -> tuple[Tensor, Tensor]:
        """``(x, log|dx/dz|)`` of one iteration; ``params`` holds the null rows after the conditional ones when guided."""
        if not guidance:
            return self.elementwise.inverse(z, params)
        shift, log_scale = self.elementwise.shift_and_log_scale(params)
        alpha = -log_scale  # x = z exp(alpha) + mu, the paper's parametrization
        mu = -shift * torch.exp(alpha)
        (alpha_c, alpha_u), (mu_c, mu_u) = alpha.chunk(2), mu.chunk(2)
        alpha = alpha_c + guidance * (alpha_c - alpha_u)
        mu = mu_c + guidance * (mu_c - mu_u)
        return z * alpha.exp() + mu, alpha

    def jacobian_mask(self, shape: tuple[int, ...]) -> Tensor:
        """``dz_i/dx_j`` may be non-zero iff ``i == j`` or ``j``'s patch comes before ``i``'s in the order."""
        if tuple(shape) != (self.num_patches, self.features):
            raise ValueError(
                f"{type(self).__name__} has {self.num_patches} patches of {self.features}, got sample shape {tuple(shape)}"
            )
        patch = torch.arange(self.num_patches).repeat_interleave(self.features)
        step = patch if self.order == "natural" else self.num_patches - 1 - patch
        return torch.eye(patch.numel(), dtype=torch.bool) | (step[None, :] < step[:, None])

    def extra_repr(self) -> str:
        return f"features={self.features}, num_patches={self.num_patches}, order={self.order!r}"
