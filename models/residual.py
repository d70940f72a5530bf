"""Residual Flows: invertible residual blocks ``x + g(x)``, ``Lip(g) < 1``, between ActNorms."""

from __future__ import annotations

from typing import Any, ClassVar

import flows
from flows.lipschitz import LipschitzConvNet, LipschitzMLP
from flows.residual import Residual

from .density import DensityModel, check_in_shape, preprocessing
from .multiscale import multiscale

__all__ = ["ResidualFlow"]


class ResidualFlow(DensityModel):
    """Residual Flow: ``num_steps`` of (``flows.Residual`` block, ActNorm) after an ActNorm.

    Each block is ``y = x + g(x)`` with ``g`` spectrally normalized to ``Lip(g) <
    coefficient ** (num_blocks + 2)`` and ``logdet = log det(I + J_g)`` in ``logdet_mode``
    (``"exact"``, ``"estimate"``: unbiased, or ``"gradient"``: a surrogate whose value is no
    likelihood; see ``flows.Residual``). Switch every block for a while with
    ``flows.logdet_mode(model, "exact")``, e.g. to evaluate with exact log-likelihoods.

    Vectors ``(B, D)``: ``g`` is an MLP of ``num_blocks + 1`` hidden LipSwish layers
    (``flows.lipschitz.LipschitzMLP``). Images ``(B, C, H, W)``, dequantized levels in
    ``[0, K)`` when ``num_levels=K``, are preprocessed by ``x / K`` and
    ``logit(alpha + (1 - 2 alpha) x)``, then go through ``num_scales`` levels, each a
    squeeze, ``num_steps`` blocks whose ``g`` is conv ``3x3``, LipSwish, ``num_blocks``
    conv ``1x1``, LipSwish, conv ``3x3`` (``flows.lipschitz.LipschitzConvNet``), and (but
    the last) factoring out half of the channels with a standard normal prior. ``H`` and
    ``W`` must be divisible by ``2 ** num_scales``. The latent has the input's shape.

    Departures from the paper: its images use Poisson roulette and mixed induced norms
    (here geometric roulette and the spectral norm); its CIFAR model adds fully connected
    blocks at the end.

    Args:
        in_shape: one sample's shape, ``(D,)`` or ``(C, H, W)``.
        num_levels: quantization levels ``K``; ``None`` for continuous data (no preprocessing).
        num_scales: levels of the image architecture.
        num_steps: residual blocks (per level for images).
        hidden_features: units (vectors) or channels (images) of each ``g``.
        num_blocks: hidden blocks of each ``g`` (see ``LipschitzMLP`` / ``LipschitzConvNet``).
        context_features: size of a ``(B, K)`` context fed to every ``g``; 0 for none.
        coefficient: each linear map's spectral-norm bound, in ``(0, 1)``.
        logdet_mode: ``"exact"``, ``"estimate"`` or ``"gradient"``.
        num_exact_terms: the estimators' always-computed power-series terms.
        roulette_p: the estimators' geometric parameter.
        alpha: the logit margin for images.

    References:
        Chen, Behrmann, Duvenaud & Jacobsen, "Residual Flows for Invertible Generative
        Modeling", NeurIPS 2019, arXiv:1906.02735; Behrmann et al., "Invertible Residual
        Networks", ICML 2019, arXiv:1811.00995.

    Example:
        >>> import torch
        >>> model = ResidualFlow((2,), num_steps=2, hidden_features=8)
        >>> model.log_prob(torch.randn(4, 2)).shape, model.sample(3).shape
        (torch.Size([4]), torch.Size([3, 2]))
    """

    name: ClassVar[str] = "residual"
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # jacflow: 2D toys. rtqichen/residual-flows' train_toy.py runs 100 blocks of
        # 128-128-128-128 (coefficient 0.9, batch 500, Adam 1e-3, exact log-det in 2D at test
        # time); here fewer, narrower blocks fit a CPU minute budget. In 2D the exact log-det
        # (2 vector-Jacobian products) is cheaper than the estimator and exact.
        "toy2d": dict(num_steps=10, hidden_features=64, num_blocks=1, coefficient=0.97, logdet_mode="exact"),
        # jacflow's choice for the tabular sets (neither paper reports them): the MAF sizes of
        # each set (arXiv:1705.07057's code), the unbiased estimator for training.
        "power": dict(num_steps=10, hidden_features=128, num_blocks=1, logdet_mode="estimate"),
        "gas": dict(num_steps=10, hidden_features=128, num_blocks=1, logdet_mode="estimate"),
        "hepmass": dict(num_steps=10, hidden_features=512, num_blocks=1, logdet_mode="estimate"),
        "miniboone": dict(num_steps=10, hidden_features=512, num_blocks=1, logdet_mode="estimate"),
        "bsds300": dict(num_steps=10, hidden_features=512, num_blocks=1, logdet_mode="estimate"),
        # jacflow: 8x8 digits (1x8x8, K=17) on a 2-core CPU in minutes.
        "digits": dict(num_scales=2, num_steps=4, hidden_features=32, logdet_mode="estimate"),
    }

    def __init__(
        self,
        in_shape: tuple[int, ...],
        num_levels: int | None = None,
        num_scales: int = 2,
        num_steps: int = 8,
        hidden_features: int = 128,
        num_blocks: int = 1,
        context_features: int = 0,
        coefficient: float = 0.97,
        logdet_mode: str = "estimate",
        num_exact_terms: int = 3,
        roulette_p: float = 0.5,
        alpha: float = 0.05,
    ) -> None:
        if num_scales < 1 or num_steps < 1:
            raise ValueError(
                f"ResidualFlow expected num_scales >= 1 and num_steps >= 1, got {num_scales} and {num_steps}"
            )
        in_shape = check_in_shape("ResidualFlow", in_shape, downscale=2**num_scales)
        options = dict(logdet_mode=logdet_mode, num_exact_terms=num_exact_terms, roulette_p=roulette_p)
        sizes = dict(num_blocks=num_blocks, context_features=context_features, coefficient=coefficient)

        def blocks(features: int, net) -> list[flows.Flow]:
            layers: list[flows.Flow] = [flows.ActNorm(features)]
            for _ in range(num_steps):
                layers += [Residual(net(), **options), flows.ActNorm(features)]
            return layers

        if len(in_shape) == 1:
            body = flows.Sequential(*blocks(in_shape[0], lambda: LipschitzMLP(in_shape[0], hidden_features, **sizes)))
        else:
            channels, height, width = in_shape

            def level(wide: int) -> list[flows.Flow]:
                # After s squeezes (and s - 1 halvings) there are 4C 2^(s-1) channels at H / 2^s.
                scale = (wide // (4 * channels)).bit_length()
                size = (height >> scale, width >> scale)
                return blocks(wide, lambda: LipschitzConvNet(wide, hidden_features, size, **sizes))

            body = multiscale(channels, num_scales, level)
        transform = flows.Sequential(*preprocessing(num_levels, "logit", alpha), body)
        config = dict(
            in_shape=in_shape, num_levels=num_levels, num_scales=num_scales, num_steps=num_steps,
            hidden_features=hidden_features, num_blocks=num_blocks, context_features=context_features,
            coefficient=coefficient, logdet_mode=logdet_mode, num_exact_terms=num_exact_terms,
            roulette_p=roulette_p, alpha=alpha,
        )
        super().__init__(transform, in_shape, num_levels, config)
