"""RealNVP: affine couplings in a multi-scale architecture (images) or a stack (vectors)."""

from __future__ import annotations

from functools import partial
from typing import Any, ClassVar

import flows
from flows.coupling import SubnetFactory
from flows.nets import MLP, GlowConvNet
from .density import DensityModel, check_in_shape, preprocessing
from .multiscale import multiscale

__all__ = ["RealNVP"]


def _couplings(
    count: int, channels: int, mask: str, subnet: SubnetFactory, context: int, actnorm: bool
) -> list[flows.Flow]:
    """``count`` affine couplings of alternating parity, each followed by an ActNorm
    (standing in for RealNVP's batch normalization) when ``actnorm``."""
    layers: list[flows.Flow] = []
    for i in range(count):
        layers.append(flows.AffineCoupling(channels, subnet, mask, i % 2, context))
        if actnorm:
            layers.append(flows.ActNorm(channels))
    return layers


class RealNVP(DensityModel):
    """RealNVP: affine couplings ``y_b = x_b * exp(s(x_a)) + t(x_a)``, ``logdet = sum s``.

    Images ``(B, C, H, W)``, dequantized levels in ``[0, K)`` when ``num_levels=K``, are
    preprocessed by ``x / K`` and ``logit(alpha + (1 - 2 alpha) x)``, then pass through
    ``num_scales`` scales: each but the last has 3 checkerboard couplings, a squeeze,
    3 channel couplings and factors out half of the channels (with no learned prior,
    as in the paper); the last has 4 checkerboard couplings. ``H`` and ``W`` must be
    divisible by ``2 ** (num_scales - 1)``. The latent has the input's shape.

    Vectors ``(B, D)``: ``num_steps`` affine couplings on alternating features (each with
    an ActNorm when ``actnorm``), MLP conditioners.

    Departures from the paper: the conditioners are Glow's 3-layer conv net
    (``flows.nets.GlowConvNet``) instead of residual networks, the scale is a soft-clamped
    ``exp``, and ``flows.ActNorm`` after each coupling stands in for batch normalization.

    Args:
        in_shape: one sample's shape, ``(D,)`` or ``(C, H, W)``.
        num_levels: quantization levels ``K``; ``None`` for continuous data (no preprocessing).
        num_scales: scales of the image architecture (CIFAR-10: 2, i.e. one downscale).
        hidden_features: feature maps (images) or units (vectors) of each conditioner.
        num_steps: flow steps (couplings) for vectors.
        num_blocks: hidden blocks of each MLP conditioner (vectors; see ``flows.nets.MLP``).
        context_features: size of a ``(B, K)`` context fed to every coupling; 0 for none.
        alpha: the logit margin (0.05 in the paper for CIFAR-10, 1e-6 for MNIST-type data).
        actnorm: put an ActNorm after each coupling.

    References:
        Dinh, Sohl-Dickstein & Bengio, "Density estimation using Real NVP", ICLR 2017,
        arXiv:1605.08803.

    Example:
        >>> import torch
        >>> model = RealNVP((1, 4, 4), num_levels=17, hidden_features=4)
        >>> model.log_prob(torch.rand(2, 1, 4, 4) * 17).shape, model.sample(3).shape
        (torch.Size([2]), torch.Size([3, 1, 4, 4]))
    """

    name: ClassVar[str] = "realnvp"
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # arXiv:1605.08803 section 4.1: CIFAR-10 downscales once, 64 feature maps (the paper's
        # conditioners are 8 residual blocks; here Glow's conv net of that width).
        "cifar10": dict(num_scales=2, hidden_features=64, alpha=0.05),
        # jacflow: MNIST-type data (1x28x28 allows at most 3 scales), with the logit margin
        # 1e-6 used for MNIST by Papamakarios et al. (MAF, arXiv:1705.07057).
        "mnist": dict(num_scales=3, hidden_features=64, alpha=1e-6),
        # jacflow: 8x8 digits (1x8x8, K=17) on a 2-core CPU in minutes.
        "digits": dict(num_scales=2, hidden_features=32, alpha=0.05),
        # jacflow: 2D toy densities (cf. the paper's figure 1 two-moons-style toys).
        "toy2d": dict(num_steps=8, hidden_features=64, num_blocks=1),
    }

    def __init__(
        self,
        in_shape: tuple[int, ...],
        num_levels: int | None = None,
        num_scales: int = 2,
        hidden_features: int = 64,
        num_steps: int = 8,
        num_blocks: int = 1,
        context_features: int = 0,
        alpha: float = 0.05,
        actnorm: bool = True,
    ) -> None:
        if num_scales < 1 or num_steps < 1:
            raise ValueError(
                f"RealNVP expected num_scales >= 1 and num_steps >= 1, got {num_scales} and {num_steps}"
            )
        in_shape = check_in_shape("RealNVP", in_shape, downscale=2 ** (num_scales - 1))
        if len(in_shape) == 3:
            subnet = partial(GlowConvNet, hidden_features=hidden_features)
            couplings = partial(_couplings, subnet=subnet, context=context_features, actnorm=actnorm)
            # Each scale but the last: 3 checkerboard couplings, squeeze, 3 channel couplings,
            # factor out half; the last: 4 checkerboard couplings (arXiv:1605.08803, section 3.6).
            body = multiscale(
                in_shape[0], num_scales,
                squeezed=lambda c: couplings(3, c, mask="channel"),
                unsqueezed=lambda c, last: couplings(4 if last else 3, c, mask="checkerboard"),
                squeeze_last=False,
            )
        else:
            if in_shape[0] < 2:
                raise ValueError(f"RealNVP expected at least 2 features, got in_shape {in_shape}")
            subnet = partial(MLP, hidden_features=hidden_features, num_blocks=num_blocks)
            body = flows.Sequential(
                *_couplings(num_steps, in_shape[0], "checkerboard", subnet, context_features, actnorm)
            )
        transform = flows.Sequential(*preprocessing(num_levels, "logit", alpha), body)
        config = dict(
            in_shape=in_shape, num_levels=num_levels, num_scales=num_scales,
            hidden_features=hidden_features, num_steps=num_steps, num_blocks=num_blocks,
            context_features=context_features, alpha=alpha, actnorm=actnorm,
        )
        super().__init__(transform, in_shape, num_levels, config)

