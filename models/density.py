"""`DensityModel`: the common face of every ready model, and the shared preprocessing.

A ready model is a ``flows.FlowDistribution`` with a standard-normal base whose
``transform`` is one bijection from data to a latent of the data's shape. For image
data the transform starts with preprocessing flow layers that carry their exact
log-determinant, so ``log_prob`` is the density of the data as given (dequantized
values in level units, ``[0, K)``) and bits/dim is ``-log_prob / (D ln 2)``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from flows import FlowDistribution, Logit, ScalarAffine, StandardNormal
from flows.base import Flow

__all__ = ["DensityModel", "check_in_shape", "preprocessing"]


class DensityModel(FlowDistribution):
    """A flow density ``log p(x) = log N(z; 0, I) + log|det dz/dx|`` with ``z = transform(x)``.

    Subclasses build ``transform`` from ``flows`` layers and pass their constructor
    arguments as ``config``, so ``type(model)(**model.config)`` rebuilds the same
    architecture (a checkpoint stores ``config`` and the class's ``name``).

    A torch distribution (see ``flows.FlowDistribution`` for the shapes): ``log_prob(x,
    context=None)``, ``log_prob_parts(x, context=None)`` -> ``(log p_base(z), logdet)``,
    ``sample`` / ``rsample(sample_shape, context=None, temperature=1.0)``, which draw
    ``z ~ N(0, T^2 I)`` and invert (factored-out parts are thus drawn from their learned
    priors scaled by ``T``), and ``sample_and_log_prob``.

    Args:
        transform: the whole bijection, data -> latent, preprocessing included.
        in_shape: one sample's shape, ``(D,)`` or ``(C, H, W)``.
        num_levels: quantization levels ``K`` the model expects, ``None`` for continuous data.
        config: the constructor arguments of the subclass.
    """

    name: ClassVar[str] = ""
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}

    def __init__(
        self, transform: Flow, in_shape: tuple[int, ...], num_levels: int | None, config: dict[str, Any]
    ) -> None:
        super().__init__(transform, StandardNormal(in_shape))
        self.in_shape = tuple(in_shape)
        self.num_levels = num_levels
        self.config = dict(config)

    def extra_repr(self) -> str:
        return f"in_shape={self.in_shape}, num_levels={self.num_levels}"


def check_in_shape(model: str, in_shape: tuple[int, ...] | list[int], downscale: int = 1) -> tuple[int, ...]:
    """Validates one sample's shape: ``(D,)`` or ``(C, H, W)`` with ``H, W`` divisible by ``downscale``.

    Returns it as a tuple (a checkpoint's JSON config may hold a list).
    """
    shape = tuple(int(s) for s in in_shape)
    if len(shape) not in (1, 3) or min(shape, default=0) < 1:
        raise ValueError(f"{model} expected in_shape (D,) or (C, H, W) of positive sizes, got {shape}")
    if len(shape) == 3 and (shape[1] % downscale or shape[2] % downscale):
        raise ValueError(
            f"{model} expected H and W divisible by {downscale} (its squeezes), got in_shape {shape}; "
            "use fewer scales, or pad or crop the images"
        )
    return shape


def preprocessing(num_levels: int | None, kind: str, alpha: float = 0.05) -> list[Flow]:
    """Layers taking dequantized levels ``[0, K)`` to the flow's working range.

    ``ScalarAffine(1/K)`` to ``[0, 1)``, then ``kind="center"`` (Glow: ``x - 0.5``) or
    ``kind="logit"`` (RealNVP, section 4.1: ``logit(alpha + (1 - 2 alpha) x)``). No layers
    when ``num_levels`` is ``None`` (continuous data).
    """
    if num_levels is None:
        return []
    if num_levels < 2:
        raise ValueError(f"num_levels expected an integer >= 2 or None, got {num_levels}")
    if kind not in ("center", "logit"):
        raise ValueError(f"preprocessing kind expected 'center' or 'logit', got {kind!r}")
    to_unit = ScalarAffine(1.0 / num_levels)
    if kind == "center":
        return [to_unit, ScalarAffine(1.0, -0.5)]
    return [to_unit, Logit(alpha)]

