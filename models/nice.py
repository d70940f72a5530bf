"""NICE: additive couplings on the flattened input and a final diagonal scaling."""

from __future__ import annotations

import math
from functools import partial
from typing import Any, ClassVar

import flows
from flows.nets import MLP
from .density import DensityModel, check_in_shape, preprocessing

__all__ = ["NICE"]


class NICE(DensityModel):
    """NICE: ``num_steps`` additive couplings, then a learned diagonal scaling.

    ``z = S * (g_L ∘ ... ∘ g_1)(pre(x))`` with ``g_i`` additive couplings
    ``y_b = x_b + m(x_a)`` (``logdet = 0``) that alternate between the odd and even
    features, and ``S`` NICE's diagonal scaling layer (here ``flows.ActNorm``, so it is
    initialized from the first batch); ``logdet = sum log S`` plus the preprocessing's.
    Images are flattened (after preprocessing) and treated as vectors, as in the paper.
    The prior is a standard normal (the paper also used a logistic prior).

    Accepts ``(B, D)`` vectors or ``(B, C, H, W)`` images; with ``num_levels=K`` the
    input is dequantized levels in ``[0, K)``, preprocessed by ``x / K`` then RealNVP's
    ``logit(alpha + (1 - 2 alpha) x)``.

    Args:
        in_shape: one sample's shape, ``(D,)`` or ``(C, H, W)``.
        num_levels: quantization levels ``K``; ``None`` for continuous data (no preprocessing).
        num_steps: additive coupling layers (4 in the paper).
        hidden_features: width of each coupling's MLP.
        num_blocks: hidden blocks of each coupling's MLP (``num_blocks + 1`` hidden
            layers; see ``flows.nets.MLP``).
        context_features: size of a ``(B, K)`` context fed to every coupling; 0 for none.
        alpha: the logit margin (1e-6 for MNIST-type data, 0.05 otherwise).

    References:
        Dinh, Krueger & Bengio, "NICE: Non-linear Independent Components Estimation",
        ICLR 2015 workshop, arXiv:1410.8516.

    Example:
        >>> import torch
        >>> model = NICE((1, 4, 4), num_levels=17, hidden_features=8, num_blocks=0)
        >>> model.log_prob(torch.rand(2, 1, 4, 4) * 17).shape, model.sample(3).shape
        (torch.Size([2]), torch.Size([3, 1, 4, 4]))
    """

    name: ClassVar[str] = "nice"
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # arXiv:1410.8516 section 5.1: MNIST, 4 coupling layers of 5 hidden layers x 1000 ReLU.
        "mnist": dict(num_steps=4, hidden_features=1000, num_blocks=4, alpha=1e-6),
        # Ibid.: CIFAR-10 (and SVHN), 4 coupling layers of 4 hidden layers x 2000.
        "cifar10": dict(num_steps=4, hidden_features=2000, num_blocks=3, alpha=0.05),
        # jacflow: 8x8 digits (1x8x8, K=17) on a 2-core CPU in minutes.
        "digits": dict(num_steps=4, hidden_features=256, num_blocks=2, alpha=0.05),
        # jacflow: 2D toy densities; more layers since each is only a shear.
        "toy2d": dict(num_steps=8, hidden_features=64, num_blocks=1),
    }

    def __init__(
        self,
        in_shape: tuple[int, ...],
        num_levels: int | None = None,
        num_steps: int = 4,
        hidden_features: int = 1000,
        num_blocks: int = 4,
        context_features: int = 0,
        alpha: float = 0.05,
    ) -> None:
        in_shape = check_in_shape("NICE", in_shape)
        features = math.prod(in_shape)
        if features < 2 or num_steps < 1:
            raise ValueError(
                f"NICE expected at least 2 features and num_steps >= 1, got in_shape {in_shape}, "
                f"num_steps={num_steps}"
            )
        subnet = partial(MLP, hidden_features=hidden_features, num_blocks=num_blocks)
        image = len(in_shape) == 3
        couplings = [
            flows.AdditiveCoupling(features, subnet, "checkerboard", i % 2, context_features)
            for i in range(num_steps)
        ]
        transform = flows.Sequential(
            *preprocessing(num_levels, "logit", alpha),
            *([flows.Flatten(in_shape)] if image else []),  # (B, C, H, W) -> (B, C*H*W)
            *couplings,
            flows.ActNorm(features),  # NICE's diagonal scaling layer
            *([flows.Inverse(flows.Flatten(in_shape))] if image else []),  # back to (B, C, H, W)
        )
        config = dict(
            in_shape=in_shape, num_levels=num_levels, num_steps=num_steps,
            hidden_features=hidden_features, num_blocks=num_blocks,
            context_features=context_features, alpha=alpha,
        )
        super().__init__(transform, in_shape, num_levels, config)
