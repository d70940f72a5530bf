"""NSF: rational-quadratic spline couplings or autoregressive layers between LU linear maps."""

from __future__ import annotations

from functools import partial
from typing import Any, ClassVar

import flows
from flows.autoregressive import RQSplineAutoregressive
from flows.nets import MLP, GlowConvNet, ZeroConv
from .density import DensityModel, check_in_shape, preprocessing
from .multiscale import multiscale

__all__ = ["NSF"]

VARIANTS = ("coupling", "autoregressive")


def _spline_layer(
    variant: str, features: int, parity: int, hidden_features: int, num_blocks: int, residual: bool,
    dropout: float, num_bins: int, tail_bound: float, context: int, image: bool,
) -> flows.Flow:
    """RQ-NSF (C): a spline coupling (MLP conditioner on alternating features for vectors,
    conv net on a channel split for images); RQ-NSF (AR): an autoregressive spline layer
    with a MADE (residual: the paper's ResMADE)."""
    if variant == "autoregressive":
        return RQSplineAutoregressive(
            features, hidden_features, num_bins, tail_bound, num_blocks, residual=residual,
            context_features=context, dropout=dropout,
        )
    if image:
        subnet, mask = partial(GlowConvNet, hidden_features=hidden_features), "channel"
    else:
        subnet = partial(MLP, hidden_features=hidden_features, num_blocks=num_blocks, residual=residual, dropout=dropout)
        mask = "checkerboard"
    return flows.RQSplineCoupling(
        features, subnet, mask, parity, context, num_bins=num_bins, tail_bound=tail_bound
    )


def _steps(features: int, num_steps: int, actnorm: bool, lu: bool, spline) -> list[flows.Flow]:
    """``num_steps`` of (ActNorm if ``actnorm``, InvConv1x1, spline layer of alternating parity)."""
    layers: list[flows.Flow] = []
    for i in range(num_steps):
        layers += [flows.ActNorm(features)] if actnorm else []
        layers += [flows.InvConv1x1(features, lu=lu), spline(features, i % 2)]
    return layers


class NSF(DensityModel):
    """Neural spline flow: steps of (ActNorm?, LU linear map, spline layer).

    Each spline layer maps ``y_i = RQS(x_i; theta_i)``, a monotonic rational-quadratic
    spline of ``num_bins`` bins on ``[-tail_bound, tail_bound]`` and the identity outside,
    with ``logdet = sum_i log RQS'(x_i)``; ``theta_i`` comes from the other half of the
    features (``variant="coupling"``, RQ-NSF (C), one pass both ways) or from the
    features before ``i`` (``variant="autoregressive"``, RQ-NSF (AR), one pass for the
    density and ``D`` to sample). The invertible linear map is ``flows.InvConv1x1``,
    ``W = P L U`` with ``log|det W| = sum log|diag U|`` (the paper's "LU linear").

    Vectors ``(B, D)``: ``num_steps`` steps with MLP (coupling) or MADE (autoregressive)
    conditioners of ``num_blocks`` residual blocks (plain blocks with ``residual=False``),
    then a last linear map, as in the paper's tabular code. Standardize
    tabular data first, so that most of it falls inside the splines' interval.

    Images ``(B, C, H, W)`` (coupling only): Glow's multi-scale architecture (as
    :class:`models.Glow`, with Glow's preprocessing to ``[-0.5, 0.5)``) whose steps are
    ActNorm, 1x1 convolution and a spline coupling with a conv-net conditioner;
    ``num_steps`` steps per scale, ``H`` and ``W`` divisible by ``2 ** num_scales``.

    Departures from the paper: image conditioners are Glow's 3-layer conv net (the
    paper's are residual networks); linear maps start at a random
    rotation rather than a permutation with an identity LU; no unconditional splines on
    the identity half of a coupling; ``actnorm`` adds ActNorms to tabular steps (the
    paper's image models have them, its tabular ones do not).

    Args:
        in_shape: one sample's shape, ``(D,)`` or ``(C, H, W)``.
        num_levels: quantization levels ``K``; ``None`` for continuous data (no preprocessing).
        num_steps: flow steps (per scale for images).
        hidden_features: width (units or channels) of each conditioner.
        num_blocks: hidden blocks of each vector conditioner (MLP or MADE).
        residual: residual blocks in the vector conditioners (the paper's); plain when False.
        dropout: dropout probability inside the vector conditioners' blocks (training only).
        num_bins: bins ``K`` of each spline.
        tail_bound: ``B``; the splines act on ``[-B, B]``.
        variant: ``"coupling"`` or ``"autoregressive"`` (vectors only).
        context_features: size of a ``(B, K)`` context fed to every conditioner; 0 for none.
        num_scales: levels of the multi-scale image architecture.
        actnorm: start each vector step with an ActNorm (image steps always have one).
        lu: LU-parametrized linear maps (else full matrices with an O(D^3) slogdet).

    References:
        Durkan, Bekasov, Murray & Papamakarios, "Neural Spline Flows", NeurIPS 2019,
        arXiv:1906.04032.

    Example:
        >>> import torch
        >>> model = NSF((3,), num_steps=2, hidden_features=8, variant="autoregressive")
        >>> model.log_prob(torch.randn(4, 3)).shape, model.sample(2).shape
        (torch.Size([4]), torch.Size([2, 3]))
    """

    name: ClassVar[str] = "nsf"
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # Durkan et al. 2019 (arXiv:1906.04032), appendix B, the per-data-set table of the
        # tabular experiments: flow steps, residual blocks, hidden features, bins, dropout
        # (B = 3 throughout, section 5). The run settings of that table (batch size,
        # learning rate, steps) are train.py's presets of the same names.
        "power": dict(num_steps=10, num_blocks=2, hidden_features=256, num_bins=8, dropout=0.0),
        "gas": dict(num_steps=10, num_blocks=2, hidden_features=256, num_bins=8, dropout=0.1),
        "hepmass": dict(num_steps=20, num_blocks=1, hidden_features=128, num_bins=8, dropout=0.2),
        "miniboone": dict(num_steps=10, num_blocks=1, hidden_features=32, num_bins=4, dropout=0.2),
        "bsds300": dict(num_steps=20, num_blocks=1, hidden_features=128, num_bins=8, dropout=0.2),
        # bayesiains/nsf, image_configs/cifar-10-8bit.json: 3 levels of 7 steps, 96 hidden
        # channels, 4 bins, B = 3 (its conditioners are 3-block ResNets).
        "cifar10": dict(num_scales=3, num_steps=7, hidden_features=96, num_bins=4, tail_bound=3.0),
        # bayesiains/nsf, image_configs/imagenet-64-8bit.json: 4 levels of 7 steps, 96 channels, 8 bins.
        "imagenet64": dict(num_scales=4, num_steps=7, hidden_features=96, num_bins=8, tail_bound=3.0),
        # jacflow: 8x8 digits (1x8x8, K=17) on a 2-core CPU in minutes.
        "digits": dict(num_scales=2, num_steps=4, hidden_features=32, num_bins=8),
        # jacflow: 2D toy densities; ActNorm standardizes them onto the splines' interval.
        "toy2d": dict(num_steps=6, hidden_features=64, num_blocks=1, residual=False, num_bins=8, actnorm=True),
        # jacflow: a quick model for any vector data set.
        "small": dict(num_steps=3, hidden_features=64, num_blocks=1, residual=False, num_bins=8, actnorm=True),
    }

    def __init__(
        self,
        in_shape: tuple[int, ...],
        num_levels: int | None = None,
        num_steps: int = 10,
        hidden_features: int = 256,
        num_blocks: int = 2,
        residual: bool = True,
        dropout: float = 0.0,
        num_bins: int = 8,
        tail_bound: float = 3.0,
        variant: str = "coupling",
        context_features: int = 0,
        num_scales: int = 3,
        actnorm: bool = False,
        lu: bool = True,
    ) -> None:
        image = len(tuple(in_shape)) == 3
        in_shape = check_in_shape("NSF", in_shape, downscale=2**num_scales if image else 1)
        _check_args(variant, in_shape, num_steps, num_blocks, num_bins, tail_bound, num_scales)
        spline = partial(
            _spline_layer, variant, hidden_features=hidden_features, num_blocks=num_blocks, residual=residual,
            dropout=dropout, num_bins=num_bins, tail_bound=tail_bound, context=context_features, image=image,
        )
        if image:
            steps = partial(_steps, num_steps=num_steps, actnorm=True, lu=lu, spline=spline)
            body = multiscale(in_shape[0], num_scales, steps, prior_net=ZeroConv)
        else:
            features = in_shape[0]
            layers = _steps(features, num_steps, actnorm, lu, spline)
            body = flows.Sequential(*layers, flows.InvConv1x1(features, lu=lu))  # the final linear map
        transform = flows.Sequential(*preprocessing(num_levels, "center"), body)
        config = dict(
            in_shape=in_shape, num_levels=num_levels, num_steps=num_steps,
            hidden_features=hidden_features, num_blocks=num_blocks, residual=residual, dropout=dropout,
            num_bins=num_bins,
            tail_bound=tail_bound, variant=variant, context_features=context_features,
            num_scales=num_scales, actnorm=actnorm, lu=lu,
        )
        super().__init__(transform, in_shape, num_levels, config)


def _check_args(
    variant: str, in_shape: tuple[int, ...], num_steps: int, num_blocks: int, num_bins: int,
    tail_bound: float, num_scales: int,
) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"NSF expected variant 'coupling' or 'autoregressive', got {variant!r}")
    if len(in_shape) == 3 and variant != "coupling":
        raise ValueError(
            f"NSF expected variant 'coupling' for images, got {variant!r}; "
            "flatten the images to vectors for an autoregressive NSF"
        )
    if len(in_shape) == 1 and variant == "coupling" and in_shape[0] < 2:
        raise ValueError(
            f"NSF expected at least 2 features for variant 'coupling', got in_shape {in_shape}; "
            "use variant='autoregressive' for 1-D data"
        )
    if num_steps < 1 or num_blocks < 0 or num_scales < 1:
        raise ValueError(
            f"NSF expected num_steps >= 1, num_blocks >= 0 and num_scales >= 1, "
            f"got {num_steps}, {num_blocks} and {num_scales}"
        )
    if num_bins < 1 or tail_bound <= 0:
        raise ValueError(f"NSF expected num_bins >= 1 and tail_bound > 0, got {num_bins} and {tail_bound}")
