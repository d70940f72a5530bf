"""Input validation for layers, yours included: shape and dtype checks, never a host sync.

Call these once at the entry of ``forward`` and ``inverse``; they read shapes and dtypes
only, so they cost no synchronization with the device::

    def forward(self, x, context=None):
        flows.check_input("MyLayer", x, self.features)
        flows.check_context("MyLayer", context, self.context_features, x.shape[0])
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["check_input", "check_context"]

_RANK_NAMES = {2: "(B, D)", 3: "(B, C, L)", 4: "(B, C, H, W)"}


def check_input(
    layer: str, x: Tensor, features: int | None = None, ranks: tuple[int, ...] = (2, 4)
) -> None:
    """Raises unless ``x`` is a floating-point tensor of one of ``ranks`` with ``features`` on dim 1.

    Args:
        layer: the name the message starts with, e.g. ``"ActNorm"``.
        x: the input.
        features: the size dim 1 must have (``None``: any).
        ranks: the accepted numbers of dimensions, batch included.

    Raises:
        ValueError: for a wrong rank or size of dim 1.
        TypeError: for an integer or boolean tensor.

    Example:
        >>> import torch
        >>> check_input("MyLayer", torch.zeros(2, 3), features=4)
        Traceback (most recent call last):
            ...
        ValueError: MyLayer expects 4 features on dim 1, got input of shape (2, 3)
    """
    if x.dim() not in ranks:
        expected = " or ".join(f"rank {r} {_RANK_NAMES.get(r, '')}".strip() for r in ranks)
        raise ValueError(f"{layer} expects input of {expected}, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{layer} expects a floating-point tensor, got dtype {x.dtype}")
    if features is not None and x.shape[1] != features:
        raise ValueError(f"{layer} expects {features} features on dim 1, got input of shape {tuple(x.shape)}")


def check_context(layer: str, context: Tensor | None, features: int, batch: int) -> None:
    """Raises ``ValueError`` unless ``context`` is ``(batch, features)``, or absent when ``features`` is 0.

    For layers with a conditioner: one built without context (``context_features=0``)
    refuses a context rather than silently ignoring it. Layers without a conditioner
    (ActNorm, permutations, ...) do not call this and ignore any context.

    Example:
        >>> import torch
        >>> check_context("MyLayer", torch.zeros(3, 2), features=0, batch=3)
        Traceback (most recent call last):
            ...
        ValueError: MyLayer was built without context (context_features=0) but got a context of shape (3, 2); build it with context_features=2 to condition on it
    """
    if features == 0:
        if context is not None:
            raise ValueError(
                f"{layer} was built without context (context_features=0) but got a context of shape "
                f"{tuple(context.shape)}; build it with context_features={context.shape[-1]} to condition on it"
            )
        return
    if context is None:
        raise ValueError(f"{layer} was built with context_features={features} but got context=None")
    if context.dim() != 2 or context.shape != (batch, features):
        raise ValueError(f"{layer} expects context of shape ({batch}, {features}), got {tuple(context.shape)}")
