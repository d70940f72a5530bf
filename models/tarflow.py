"""TarFlow: transformer autoregressive flow blocks over image patches, with TarFlow's
training recipe (Gaussian noise augmentation, context dropout) and sampling recipe
(fixed-point inversion, classifier-free guidance, score-based denoising)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Size, Tensor

import flows
from flows.base import accumulate, zero_logdet
from flows.derivatives import score
from flows.transformer import FixedPoint, Patchify, Solution, TransformerAutoregressive

from .density import DensityModel, check_in_shape

__all__ = ["TarFlow"]


class TarFlow(DensityModel):
    """TarFlow: ``num_steps`` transformer autoregressive flow blocks over ``p x p`` patches.

    Images ``(B, C, H, W)``, dequantized levels in ``[0, K)`` when ``num_levels=K``, are
    scaled to ``[-1, 1)`` (``x * 2/K - 1``, a flow layer with its log-det, as in TarFlow),
    cut into ``T = HW/p^2`` patches of ``P = C p^2`` values (:class:`flows.Patchify`), passed
    through ``num_steps`` :class:`flows.TransformerAutoregressive` blocks whose order
    alternates (natural, reversed, ...), and put back into an image: the latent has the
    input's shape, the base is ``N(0, I)``. Vectors ``(B, D)`` are ``D`` patches of one value.

    **The density reported.** ``log_prob(v)`` is the flow's density ``p(v)`` of ``v`` as
    given: for images, dequantized levels ``v = x + u``, ``u ~ U[0, 1)^D`` (done by the
    training and evaluation loops), so bits/dim ``= -log p(v) / (D ln 2)`` is the usual
    upper bound on the discrete data's, comparable with every other model here. With
    ``noise_std = sigma > 0`` the model is *trained* on ``v + sigma_v eps`` (:meth:`augment`,
    ``sigma_v = sigma K / 2``: ``sigma`` is in the ``[-1, 1]`` units of the paper), so it
    learns the density of the noisier variable; its ``log_prob`` of clean ``v`` is still a
    proper density, hence still an upper bound, only a looser one. TarFlow's likelihood
    runs use ``sigma = 0`` (uniform dequantization only) and its sample-quality runs
    ``sigma > 0``, followed by the denoising step (:meth:`denoise`).

    **Sampling.** :meth:`sample` draws ``z ~ N(0, T^2 I)`` and inverts block by block
    (:meth:`invert`): exactly, one patch per pass with a key/value cache, or by Jacobi /
    Gauss-Seidel fixed-point iterations (:class:`flows.transformer.FixedPoint`); with
    ``guidance=w`` by TarFlow's classifier-free guidance, which needs a model trained with
    ``context_dropout`` > 0; with ``denoise=True`` followed by the denoising step.

    Args:
        in_shape: one sample's shape, ``(D,)`` or ``(C, H, W)``.
        num_levels: quantization levels ``K``; ``None`` for continuous data (no scaling).
        patch_size: ``p`` (images); ``H`` and ``W`` must be divisible by it.
        hidden_features: the transformers' width (TarFlow's channels).
        num_steps: flow blocks (TarFlow's blocks ``T``).
        num_blocks: transformer layers per flow block (TarFlow's layers per block ``K``).
        num_heads: attention heads; ``None``: heads of 64 features.
        context_features: size of a ``(B, K)`` context (a one-hot class); 0 for none.
        noise_std: TarFlow's ``sigma`` in ``[-1, 1]`` units (data units for continuous data).
        context_dropout: fraction of context rows :meth:`augment` zeroes (TarFlow: 0.1).
        clamp: bound of each block's log-scale.

    References:
        Zhai et al., "Normalizing Flows are Capable Generative Models", ICML 2025,
        arXiv:2412.06329.

    Example:
        >>> import torch
        >>> model = TarFlow((1, 4, 4), num_levels=17, hidden_features=8, num_steps=2, num_blocks=1)
        >>> model.log_prob(torch.rand(2, 1, 4, 4) * 17).shape, model.sample(3).shape
        (torch.Size([2]), torch.Size([3, 1, 4, 4]))
    """

    name: ClassVar[str] = "tarflow"
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # The authors' ImageNet 64x64 likelihood run (2.99 bits/dim), "P-Ch-T-K" = 2-768-8-8 with
        # uniform dequantization only (apple/ml-tarflow README: --patch_size=2 --channels=768
        # --blocks=8 --layers_per_block=8 --noise_type=uniform; AdamW, lr 1e-4, batch 256, 100 epochs).
        "imagenet64": dict(patch_size=2, hidden_features=768, num_steps=8, num_blocks=8, noise_std=0.0),
        # The authors' ImageNet 64x64 sample-quality runs, 2-768-8-8-0.05 (arXiv:2412.06329 and
        # apple/ml-tarflow README: --noise_std=0.05, --drop_label=0.1 when class-conditional; lr 1e-4).
        "imagenet64-samples": dict(patch_size=2, hidden_features=768, num_steps=8, num_blocks=8, noise_std=0.05,
                                   context_dropout=0.1),
        # jacflow's choice, not from the paper (which reports no CIFAR-10 run): the ImageNet 64
        # likelihood setting at 32x32, 2-768-8-8 on 256 patches, uniform dequantization only.
        "cifar10": dict(patch_size=2, hidden_features=768, num_steps=8, num_blocks=8, noise_std=0.0),
        # jacflow: 8x8 digits (1x8x8, K=17) on a 2-core CPU: 16 patches of 2x2, 8 blocks of one
        # layer 32 wide, the cheapest step of the sizes timed (4x2 at 64 wide took 2-4x as long);
        # 6000 steps of 128 reach 2.14 test bits/dim (benchmarks/tarflow.py).
        "digits": dict(patch_size=2, hidden_features=32, num_steps=8, num_blocks=1, num_heads=2,
                       context_dropout=0.1),
        # jacflow: 2D toy densities, 2 patches of one value.
        "toy2d": dict(patch_size=1, hidden_features=64, num_steps=4, num_blocks=2, num_heads=2,
                      context_dropout=0.1),
    }

    def __init__(
        self,
        in_shape: tuple[int, ...],
        num_levels: int | None = None,
        patch_size: int = 2,
        hidden_features: int = 768,
        num_steps: int = 8,
        num_blocks: int = 8,
        num_heads: int | None = None,
        context_features: int = 0,
        noise_std: float = 0.0,
        context_dropout: float = 0.0,
        clamp: float = 4.0,
    ) -> None:
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"TarFlow expected num_steps >= 1, got {num_steps!r}")
        if not noise_std >= 0 or not 0 <= context_dropout < 1:
            raise ValueError(
                f"TarFlow expected noise_std >= 0 and context_dropout in [0, 1), got {noise_std} and {context_dropout}"
            )
        in_shape = check_in_shape("TarFlow", in_shape, downscale=patch_size)
        if len(in_shape) == 3:
            patches: flows.Flow = Patchify(in_shape, patch_size)
            num_patches, features = patches.num_patches, patches.patch_features
        else:
            patches = flows.Inverse(flows.Flatten((in_shape[0], 1)))  # (B, D) -> (B, D, 1)
            num_patches, features = in_shape[0], 1
        blocks = [
            TransformerAutoregressive(
                features, num_patches, hidden_features, num_blocks, num_heads, context_features,
                order=("natural", "reversed")[i % 2], clamp=clamp,
            )
            for i in range(num_steps)
        ]
        scaling = [] if num_levels is None else [flows.ScalarAffine(2.0 / num_levels, -1.0)]  # [0, K) -> [-1, 1)
        transform = flows.Sequential(*scaling, patches, *blocks, flows.Inverse(patches))
        config = dict(
            in_shape=in_shape, num_levels=num_levels, patch_size=patch_size, hidden_features=hidden_features,
            num_steps=num_steps, num_blocks=num_blocks, num_heads=num_heads, context_features=context_features,
            noise_std=noise_std, context_dropout=context_dropout, clamp=clamp,
        )
        super().__init__(transform, in_shape, num_levels, config)
        self.noise_std = float(noise_std)
        self.context_dropout = float(context_dropout)

    @property
    def noise_scale(self) -> float:
        """The augmentation noise's standard deviation in the units of ``x`` as given (levels for images)."""
        return self.noise_std * (1.0 if self.num_levels is None else self.num_levels / 2)

    def augment(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """TarFlow's training inputs: ``x + noise_scale * eps`` and the context with a
        ``context_dropout`` fraction of rows zeroed (the null context that guidance contrasts with).

        Call it on each training batch (after dequantization); no host synchronization.
        """
        if self.noise_std:
            x = x + self.noise_scale * torch.randn_like(x)
        if context is not None and self.context_dropout:
            keep = torch.rand(context.shape[:-1] + (1,), device=context.device) >= self.context_dropout
            context = context * keep.to(context.dtype)
        return x, context

    def denoise(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """TarFlow's denoising step: ``x + noise_scale^2 * grad_x log p(x | context)``.

        Tweedie's formula: for a model of ``y = x + sigma eps``, ``E[x | y] = y + sigma^2
        grad log p(y)``; the score is the model's own (:func:`flows.derivatives.score`),
        given the context (not the guided map). ``x`` is returned as is when ``noise_std`` is 0.
        """
        if not self.noise_std:
            return x
        return x + self.noise_scale**2 * score(self, x, context)

    def invert(
        self, z: Tensor, context: Tensor | None = None, fixed_point: FixedPoint = FixedPoint(), guidance: float = 0.0
    ) -> Solution:
        """``transform``'s inverse of ``(B, *in_shape)`` latents, every flow block solved by
        :meth:`flows.TransformerAutoregressive.solve`; ``passes`` sums the blocks' passes."""
        if guidance and not self.config["context_features"]:
            raise ValueError(
                f"TarFlow guidance={guidance} needs a class-conditional model (context_features > 0, trained with "
                "context_dropout > 0), got context_features=0"
            )
        x, total, passes = z, zero_logdet(z), 0
        for layer in reversed(self.transform):
            if isinstance(layer, TransformerAutoregressive):
                solution = layer.solve(x, context, fixed_point, guidance)
                x, logdet, passes = solution.x, solution.logdet, passes + solution.passes
            else:
                x, logdet = layer.inverse(x, context)
            total = accumulate(total, logdet)
        return Solution(x, total, passes)

    def sample(
        self,
        sample_shape: int | tuple[int, ...] | Size = Size(),
        context: Tensor | None = None,
        temperature: float = 1.0,
        *,
        guidance: float = 0.0,
        denoise: bool = False,
        fixed_point: FixedPoint = FixedPoint(),
    ) -> Tensor:
        """Samples ``sample_shape + context.shape[:-1] + in_shape``, as ``FlowDistribution.sample``.

        Args:
            sample_shape, context, temperature: as for any flow distribution.
            guidance: classifier-free guidance weight ``w`` (0: the model's own density).
            denoise: apply :meth:`denoise` (given the context) to the samples.
            fixed_point: how each block is inverted (default: exactly, one patch per pass).
        """
        with torch.no_grad():
            z = self.base.rsample(sample_shape, context, temperature)
            leading = z.shape[: z.dim() - len(self.event_shape)]
            if leading.numel() == 0:
                return z
            flat_context = self._flat_context(context, leading)
            x = self.invert(z.reshape(-1, *self.event_shape), flat_context, fixed_point, guidance).x
        if denoise:
            x = self.denoise(x, flat_context)
        return x.reshape(z.shape)
