"""Subnetwork factories: callables ``(in_features, out_features) -> nn.Module``.

Pass the class itself, or ``functools.partial`` of it to set sizes::

    flows.AffineCoupling(8, functools.partial(flows.nets.MLP, hidden_features=128))

The last layer of each is zero-initialised, so a new coupling starts as the identity.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["MLP", "GlowConvNet", "ZeroConv"]


class MLP(nn.Sequential):
    """Fully connected net ``(B, in_features) -> (B, out_features)`` with ReLU.

    Args:
        in_features: input size.
        out_features: output size.
        hidden_features: width of the hidden layers.
        num_layers: number of hidden layers.
        zero_init: zero the last layer (the coupling starts as the identity).

    Example:
        >>> import torch
        >>> MLP(3, 4, hidden_features=8)(torch.randn(2, 3)).shape
        torch.Size([2, 4])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden_features: int = 64,
        num_layers: int = 2,
        zero_init: bool = True,
    ) -> None:
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden_features), nn.ReLU()]
            width = hidden_features
        last = nn.Linear(width, out_features)
        if zero_init:
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        super().__init__(*layers, last)


class GlowConvNet(nn.Sequential):
    """Glow's coupling network: 3x3 conv, ReLU, 1x1 conv, ReLU, 3x3 conv (zero-initialised).

    Maps ``(B, in_features, H, W) -> (B, out_features, H, W)``.

    Args:
        in_features: input channels.
        out_features: output channels.
        hidden_features: channels of the hidden layers (512 in the paper).
        zero_init: zero the last layer (the coupling starts as the identity).

    References:
        Kingma & Dhariwal, "Glow", NeurIPS 2018, arXiv:1807.03039.

    Example:
        >>> import torch
        >>> GlowConvNet(3, 6, hidden_features=8)(torch.randn(2, 3, 4, 4)).shape
        torch.Size([2, 6, 4, 4])
    """

    def __init__(
        self, in_features: int, out_features: int, hidden_features: int = 512, zero_init: bool = True
    ) -> None:
        last = nn.Conv2d(hidden_features, out_features, 3, padding=1)
        if zero_init:
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        super().__init__(
            nn.Conv2d(in_features, hidden_features, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden_features, hidden_features, 1),
            nn.ReLU(),
            last,
        )

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x)


class ZeroConv(nn.Conv2d):
    """One zero-initialised 3x3 convolution, ``(B, in, H, W) -> (B, out, H, W)``.

    Glow's network for the learned prior of a factored-out half (``flows.Split``): it
    starts at zero, so the prior starts standard normal.

    Example:
        >>> import torch
        >>> ZeroConv(2, 4)(torch.randn(1, 2, 3, 3)).abs().sum()
        tensor(0., grad_fn=<SumBackward0>)
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, 3, padding=1)
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)
