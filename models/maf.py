"""MAF: a stack of masked autoregressive affine layers with reversed orderings."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import flows
from flows.autoregressive import MaskedAffineAutoregressive
from .density import DensityModel, check_in_shape, preprocessing

__all__ = ["MAF"]


class MAF(DensityModel):
    """Masked autoregressive flow: ``num_steps`` MADE-conditioned affine layers.

    Layer ``k`` maps ``z_i = x_i * exp(s_i(x_<i)) + t_i(x_<i)`` with ``logdet = sum_i s_i``
    (the paper's ``(x_i - mu_i) exp(-alpha_i)`` reparametrized; one MADE pass for the
    density, ``D`` passes to sample).
    The ordering of the features is reversed from one layer to the next (natural,
    reversed, natural, ...), as in the paper's code, and each layer is followed by a
    ``flows.ActNorm`` standing in for the paper's batch normalization between layers
    (ActNorm is initialized from the first batch and then trained, so ``log_prob`` does
    not depend on batch statistics).

    Accepts ``(B, D)`` vectors or ``(B, C, H, W)`` images; images are preprocessed (with
    ``num_levels=K``: ``x / K`` then ``logit(alpha + (1 - 2 alpha) x)``) and flattened, as
    in the paper's MNIST and CIFAR-10 experiments. The latent has the input's shape.

    Not included: the paper's MADE-of-Gaussians base ("MAF MoG") and its tanh conditioner
    for GAS (``flows.MADE`` uses ReLU here); the base is N(0, I).

    Args:
        in_shape: one sample's shape, ``(D,)`` or ``(C, H, W)``.
        num_levels: quantization levels ``K``; ``None`` for continuous data (no preprocessing).
        num_steps: autoregressive layers (the paper's MAF (5) and MAF (10)).
        hidden_features: units of each MADE hidden layer.
        num_blocks: hidden blocks of each MADE (``num_blocks + 1`` hidden layers when plain).
        context_features: size of a ``(B, K)`` context fed to every MADE; 0 for none.
        alpha: the logit margin for images (1e-6 for MNIST, 0.05 for CIFAR-10 in the paper).
        actnorm: put an ActNorm after each autoregressive layer.
        residual: use residual MADE blocks (ResMADE) instead of plain ones.

    References:
        Papamakarios, Pavlakou & Murray, "Masked Autoregressive Flow for Density
        Estimation", NeurIPS 2017, arXiv:1705.07057.

    Example:
        >>> import torch
        >>> model = MAF((3,), num_steps=2, hidden_features=8)
        >>> model.log_prob(torch.randn(4, 3)).shape, model.sample(2).shape
        (torch.Size([4]), torch.Size([2, 3]))
    """

    name: ClassVar[str] = "maf"
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # arXiv:1705.07057 with the sizes of its code (github.com/gpapamak/maf,
        # run_experiments.py): MAF (5), MADEs of 1 or 2 hidden layers (2 here, i.e.
        # num_blocks=1) of 100 units for POWER and GAS, 512 for HEPMASS and MINIBOONE,
        # 512 or 1024 for BSDS300 (512 here).
        "power": dict(num_steps=5, hidden_features=100, num_blocks=1),
        "gas": dict(num_steps=5, hidden_features=100, num_blocks=1),
        "hepmass": dict(num_steps=5, hidden_features=512, num_blocks=1),
        "miniboone": dict(num_steps=5, hidden_features=512, num_blocks=1),
        "bsds300": dict(num_steps=5, hidden_features=512, num_blocks=1),
        # Ibid.: MNIST, MAF (5) with 2 hidden layers of 1024 units, logit margin 1e-6.
        "mnist": dict(num_steps=5, hidden_features=1024, num_blocks=1, alpha=1e-6),
        # Ibid.: CIFAR-10, MAF (5) with 2 hidden layers of 2048 units (also 1024), margin 0.05.
        "cifar10": dict(num_steps=5, hidden_features=2048, num_blocks=1, alpha=0.05),
        # jacflow: 8x8 digits (1x8x8, K=17) on a 2-core CPU in minutes.
        "digits": dict(num_steps=5, hidden_features=256, num_blocks=1, alpha=0.05),
        # jacflow: 2D toy densities.
        "toy2d": dict(num_steps=5, hidden_features=64, num_blocks=1),
        # jacflow: a quick model for any vector data set.
        "small": dict(num_steps=3, hidden_features=64, num_blocks=1),
    }

    def __init__(
        self,
        in_shape: tuple[int, ...],
        num_levels: int | None = None,
        num_steps: int = 5,
        hidden_features: int = 512,
        num_blocks: int = 1,
        context_features: int = 0,
        alpha: float = 0.05,
        actnorm: bool = True,
        residual: bool = False,
    ) -> None:
        in_shape = check_in_shape("MAF", in_shape)
        if num_steps < 1:
            raise ValueError(f"MAF expected num_steps >= 1, got {num_steps}")
        features = math.prod(in_shape)
        layers: list[flows.Flow] = []
        for i in range(num_steps):
            # Reversing the order between layers lets every feature be conditioned on
            # every other one somewhere in the stack (gpapamak/maf, mafs.py).
            order = "natural" if i % 2 == 0 else "reversed"
            layers.append(MaskedAffineAutoregressive(
                features, hidden_features, num_blocks, order, residual=residual,
                context_features=context_features,
            ))
            if actnorm:
                layers.append(flows.ActNorm(features))  # the paper's batch normalization
        image = len(in_shape) == 3
        transform = flows.Sequential(
            *preprocessing(num_levels, "logit", alpha),
            *([flows.Flatten(in_shape)] if image else []),  # (B, C, H, W) -> (B, C*H*W)
            *layers,
            *([flows.Inverse(flows.Flatten(in_shape))] if image else []),  # back to (B, C, H, W)
        )
        config = dict(
            in_shape=in_shape, num_levels=num_levels, num_steps=num_steps,
            hidden_features=hidden_features, num_blocks=num_blocks, context_features=context_features,
            alpha=alpha, actnorm=actnorm, residual=residual,
        )
        super().__init__(transform, in_shape, num_levels, config)
