"""Glow: steps of ActNorm, invertible 1x1 convolution and coupling, in a multi-scale stack."""

from __future__ import annotations

from functools import partial
from typing import Any, ClassVar

import flows
from flows.coupling import SubnetFactory
from flows.nets import MLP, GlowConvNet, ZeroConv

from .density import DensityModel, check_in_shape, preprocessing
from .multiscale import multiscale

__all__ = ["Glow"]


def _steps(
    channels: int, num_steps: int, subnet: SubnetFactory, coupling: str, scale: str, lu: bool, context: int
) -> list[flows.Flow]:
    """``num_steps`` of (ActNorm, InvConv1x1, coupling on a channel mask)."""
    layers: list[flows.Flow] = []
    for _ in range(num_steps):
        if coupling == "affine":
            couple = flows.AffineCoupling(channels, subnet, "channel", 0, context, scale=scale)
        else:
            couple = flows.AdditiveCoupling(channels, subnet, "channel", 0, context)
        layers += [flows.ActNorm(channels), flows.InvConv1x1(channels, lu=lu), couple]
    return layers


class Glow(DensityModel):
    """Glow: ``num_scales`` levels of ``num_steps`` steps (ActNorm, 1x1 conv, coupling).

    Each step is ``y = coupling(W (x + b) * s)`` with ``logdet = H*W * (sum log|s| +
    log|det W|) + sum log scale``. Images ``(B, C, H, W)``, dequantized levels in
    ``[0, K)`` when ``num_levels=K``, are scaled by ``1/K`` and centered to
    ``[-0.5, 0.5)``; each level squeezes, runs its steps and (but the last) factors out
    half of the channels, whose prior ``N(mu(x1), sigma(x1)^2)`` is learned from the kept
    half by a zero-initialized 3x3 conv, as the affine flow ``flows.Split``. ``H`` and
    ``W`` must be divisible by ``2 ** num_scales``. The latent has the input's shape.

    Vectors ``(B, D)``: ``num_steps`` steps of ActNorm, InvConv1x1 (a linear layer) and
    a coupling with MLP conditioners; no squeeze or split.

    Not included: openai/glow's learned top prior (``--learntop``); the base is N(0, I).

    Args:
        in_shape: one sample's shape, ``(D,)`` or ``(C, H, W)``.
        num_levels: quantization levels ``K``; ``None`` for continuous data (no preprocessing).
        num_scales: levels ``L`` of the multi-scale architecture.
        num_steps: steps per level (the paper's depth ``K``).
        hidden_features: channels (images) or units (vectors) of each coupling's net.
        num_blocks: hidden blocks of each MLP conditioner (vectors; see ``flows.nets.MLP``).
        context_features: size of a ``(B, K)`` context fed to every coupling; 0 for none.
        lu: LU-parametrized 1x1 convolutions.
        coupling: ``"affine"`` or ``"additive"``.
        scale: the affine coupling's scale, ``"sigmoid"`` (Glow) or ``"exp"``.

    References:
        Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions",
        NeurIPS 2018, arXiv:1807.03039.

    Example:
        >>> import torch
        >>> model = Glow((1, 4, 4), num_levels=17, num_scales=2, num_steps=1, hidden_features=4)
        >>> model.log_prob(torch.rand(2, 1, 4, 4) * 17).shape, model.sample(3).shape
        (torch.Size([2]), torch.Size([3, 1, 4, 4]))
    """

    name: ClassVar[str] = "glow"
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # arXiv:1807.03039 and openai/glow's README: CIFAR-10, L=3, K=32, 512 channels.
        "cifar10": dict(num_scales=3, num_steps=32, hidden_features=512),
        # openai/glow's README: ImageNet 32x32, L=3, K=48.
        "imagenet32": dict(num_scales=3, num_steps=48, hidden_features=512),
        # openai/glow's README: ImageNet 64x64, L=4, K=48.
        "imagenet64": dict(num_scales=4, num_steps=48, hidden_features=512),
        # openai/glow's README: CelebA-HQ 256x256 (5-bit), L=6, K=32, additive coupling.
        "celeba": dict(num_scales=6, num_steps=32, hidden_features=512, coupling="additive"),
        # jacflow: MNIST at 28x28 allows 2 levels (openai/glow pads it to 32x32 for 3);
        # K=32, 512 channels as in openai/glow's defaults.
        "mnist": dict(num_scales=2, num_steps=32, hidden_features=512),
        # jacflow: 8x8 digits (1x8x8, K=17) on a 2-core CPU in minutes.
        "digits": dict(num_scales=2, num_steps=4, hidden_features=32),
        # jacflow: 2D toy densities.
        "toy2d": dict(num_steps=8, hidden_features=64, num_blocks=1),
    }

    def __init__(
        self,
        in_shape: tuple[int, ...],
        num_levels: int | None = None,
        num_scales: int = 3,
        num_steps: int = 32,
        hidden_features: int = 512,
        num_blocks: int = 1,
        context_features: int = 0,
        lu: bool = True,
        coupling: str = "affine",
        scale: str = "sigmoid",
    ) -> None:
        if num_scales < 1 or num_steps < 1:
            raise ValueError(
                f"Glow expected num_scales >= 1 and num_steps >= 1, got {num_scales} and {num_steps}"
            )
        if coupling not in ("affine", "additive"):
            raise ValueError(f"Glow expected coupling 'affine' or 'additive', got {coupling!r}")
        in_shape = check_in_shape("Glow", in_shape, downscale=2**num_scales)
        image = len(in_shape) == 3
        if image:
            subnet = partial(GlowConvNet, hidden_features=hidden_features)
        elif in_shape[0] < 2:
            raise ValueError(f"Glow expected at least 2 features, got in_shape {in_shape}")
        else:
            subnet = partial(MLP, hidden_features=hidden_features, num_blocks=num_blocks)
        steps = partial(
            _steps, num_steps=num_steps, subnet=subnet, coupling=coupling, scale=scale, lu=lu,
            context=context_features,
        )
        if image:
            body = multiscale(in_shape[0], num_scales, steps, prior_net=ZeroConv)
        else:
            body = flows.Sequential(*steps(in_shape[0]))
        transform = flows.Sequential(*preprocessing(num_levels, "center"), body)
        config = dict(
            in_shape=in_shape, num_levels=num_levels, num_scales=num_scales, num_steps=num_steps,
            hidden_features=hidden_features, num_blocks=num_blocks,
            context_features=context_features, lu=lu, coupling=coupling, scale=scale,
        )
        super().__init__(transform, in_shape, num_levels, config)
