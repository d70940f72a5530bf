"""The multi-scale architecture of RealNVP and Glow (and NSF's image models), built once.

Each scale runs some layers at full resolution, squeezes (space to depth), runs more
layers, factors out half of the channels (``flows.Split``, optionally with a learned
prior) and recurses on the other half at the next scale; it then unsqueezes, so the
whole stack maps ``(B, C, H, W)`` to a latent of the same shape: one bijection.
"""

from __future__ import annotations

from collections.abc import Callable

import flows

__all__ = ["multiscale"]

LayersAt = Callable[[int], list[flows.Flow]]


def multiscale(
    channels: int,
    num_scales: int,
    squeezed: LayersAt,
    unsqueezed: Callable[[int, bool], list[flows.Flow]] | None = None,
    prior_net: Callable[[int, int], object] | None = None,
    squeeze_last: bool = True,
) -> flows.Flow:
    """``num_scales`` scales on ``(B, channels, H, W)``; the output keeps the shape.

    One scale is ``unsqueezed(C, last)``, ``Squeeze``, ``squeezed(4C)``, then (but at the
    last scale) ``Split`` of half of the ``4C`` channels around the next scales, and
    ``Inverse(Squeeze)``. With ``squeeze_last=False`` the last scale is
    ``unsqueezed(C, True)`` alone (RealNVP's last scale: couplings, no squeeze).

    Args:
        channels: ``C`` at this scale.
        num_scales: scales from this one down, at least 1.
        squeezed: layers at ``4C`` channels after the squeeze, given ``4C``.
        unsqueezed: layers at ``C`` channels before the squeeze, given ``C`` and whether
            this is the last scale; none when ``None``.
        prior_net: factory of the factored-out half's learned prior (``flows.Split``'s
            ``prior_net``); ``None``: standard normal (RealNVP).
        squeeze_last: whether the last scale squeezes (Glow) or not (RealNVP).

    Example:
        >>> import torch, flows
        >>> body = multiscale(1, 2, lambda c: [flows.ActNorm(c)])
        >>> body(torch.randn(2, 1, 4, 4))[0].shape
        torch.Size([2, 1, 4, 4])
    """
    last = num_scales == 1
    layers = list(unsqueezed(channels, last)) if unsqueezed is not None else []
    if last and not squeeze_last:
        return flows.Sequential(*layers)
    wide = 4 * channels
    layers += [flows.Squeeze(), *squeezed(wide)]  # (B, 4C, H/2, W/2)
    if not last:
        inner = multiscale(wide // 2, num_scales - 1, squeezed, unsqueezed, prior_net, squeeze_last)
        layers.append(flows.Split(inner, wide, kept=wide // 2, prior_net=prior_net))
    layers.append(flows.Inverse(flows.Squeeze()))  # (B, C, H, W)
    return flows.Sequential(*layers)
