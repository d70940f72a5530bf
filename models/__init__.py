"""jacflow's ready density models and experiment kit.

Every model is a :class:`DensityModel`: a ``flows.FlowDistribution`` whose ``transform``
maps data (dequantized, in level units for images) to a latent of the same shape,
preprocessing included, so ``log_prob`` is the density of the data as given.

Build one by name and preset::

    model = build_model("glow", "digits", in_shape=(1, 8, 8), num_levels=17)

and rebuild it from a checkpoint with ``MODELS[name](**model.config)``.
"""

from __future__ import annotations

import inspect

from .continuous import FFJORD
from .density import DensityModel
from .glow import Glow
from .maf import MAF
from .nice import NICE
from .nsf import NSF
from .realnvp import RealNVP
from .residual import ResidualFlow
from .tarflow import TarFlow

__all__ = [
    "DensityModel", "NICE", "RealNVP", "Glow", "MAF", "NSF", "ResidualFlow", "FFJORD", "TarFlow",
    "MODELS", "build_model",
]

# Model name -> class. Each class has a ``PRESETS`` dict (preset name -> constructor
# keyword arguments). Add a model with one line here.
MODELS: dict[str, type[DensityModel]] = {
    "nice": NICE,
    "realnvp": RealNVP,
    "glow": Glow,
    "maf": MAF,
    "nsf": NSF,
    "residual": ResidualFlow,
    "ffjord": FFJORD,
    "tarflow": TarFlow,
}


def build_model(
    name: str,
    preset: str,
    in_shape: tuple[int, ...],
    num_levels: int | None = None,
    context_features: int = 0,
    **overrides,
) -> DensityModel:
    """Builds model ``name`` with the sizes of ``preset``, then ``overrides`` on top.

    Args:
        name: a key of :data:`MODELS` (``"nice"``, ``"realnvp"``, ``"glow"``, ...).
        preset: a key of the model's ``PRESETS`` (e.g. ``"cifar10"``, ``"digits"``, ``"toy2d"``).
        in_shape: one sample's shape, ``(D,)`` for vectors or ``(C, H, W)`` for images.
        num_levels: quantization levels ``K`` of image data (the model then expects
            dequantized values in ``[0, K)``); ``None`` for continuous data.
        context_features: size of a ``(B, K)`` conditioning context; 0 for none.
        **overrides: constructor arguments replacing the preset's.

    Raises:
        ValueError: for an unknown model, preset or override name.

    Example:
        >>> model = build_model("nice", "toy2d", in_shape=(2,), hidden_features=8)
        >>> model.sample(3).shape
        torch.Size([3, 2])
    """
    if name not in MODELS:
        raise ValueError(f"build_model expected a model name in {sorted(MODELS)}, got {name!r}")
    cls = MODELS[name]
    presets: dict[str, dict] = getattr(cls, "PRESETS", {})
    if preset not in presets:
        raise ValueError(f"build_model expected a {name} preset in {sorted(presets)}, got {preset!r}")
    accepted = set(inspect.signature(cls).parameters) - {"in_shape", "num_levels", "context_features"}
    unknown = sorted(set(overrides) - accepted)
    if unknown:
        raise ValueError(
            f"build_model expected {name} overrides among {sorted(accepted)}, got unknown {unknown}"
        )
    kwargs = {**presets[preset], **overrides}
    return cls(in_shape, num_levels=num_levels, context_features=context_features, **kwargs)
