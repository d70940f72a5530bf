"""Input validation shared by the layers: shape checks only, never a host sync."""

from __future__ import annotations

from torch import Tensor

_RANK_NAMES = {2: "(B, D)", 3: "(B, C, L)", 4: "(B, C, H, W)"}


def check_input(
    layer: str, x: Tensor, features: int | None = None, ranks: tuple[int, ...] = (2, 4)
) -> None:
    """Raises ``ValueError`` unless ``x`` has one of ``ranks`` and ``features`` on dim 1."""
    if x.dim() not in ranks:
        expected = " or ".join(f"rank {r} {_RANK_NAMES.get(r, '')}".strip() for r in ranks)
        raise ValueError(f"{layer} expects input of {expected}, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{layer} expects a floating-point tensor, got dtype {x.dtype}")
    if features is not None and x.shape[1] != features:
        raise ValueError(
            f"{layer} expects {features} features/channels on dim 1, got shape {tuple(x.shape)}"
        )


def check_context(layer: str, context: Tensor | None, features: int, batch: int) -> None:
    """Raises ``ValueError`` unless ``context`` is ``(batch, features)`` (or absent when 0)."""
    if features == 0:
        return
    if context is None:
        raise ValueError(f"{layer} was built with context_features={features} but got context=None")
    if context.dim() != 2 or context.shape != (batch, features):
        raise ValueError(
            f"{layer} expects context of shape ({batch}, {features}), got {tuple(context.shape)}"
        )
