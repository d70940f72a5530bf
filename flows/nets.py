"""Subnetwork factories: callables ``(in_features, out_features) -> nn.Module``.

Pass the class itself, or ``functools.partial`` of it to set sizes::

    flows.AffineCoupling(8, functools.partial(flows.nets.MLP, hidden_features=128))

The last layer of each is zero-initialized, so a new coupling starts as the identity.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["MLP", "ResidualBlock", "GlowConvNet", "ZeroConv"]


class ResidualBlock(nn.Module):
    """``h + W2 dropout(act(W1 act(h))))``: a hidden block with a skip connection."""

    def __init__(self, features: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.first = nn.Linear(features, features)
        self.second = nn.Linear(features, features)
        self.activation = nn.ReLU()
        self.dropout = nn.Dropout(dropout) if dropout else None  # none at all when off: fewer calls per pass

    def forward(self, h: Tensor) -> Tensor:
        residual = self.activation(self.first(self.activation(h)))
        if self.dropout is not None:
            residual = self.dropout(residual)
        return h + self.second(residual)


class MLP(nn.Sequential):
    """Fully connected net ``(B, in_features) -> (B, out_features)`` with ReLU.

    An input layer to ``hidden_features``, ``num_blocks`` hidden blocks, then the output
    layer: ``num_blocks + 1`` hidden layers when plain. A block is one hidden layer, or
    with ``residual`` two with a skip connection (NSF's residual conditioner).

    Args:
        in_features: input size.
        out_features: output size.
        hidden_features: width of the hidden layers.
        num_blocks: hidden blocks between the input layer and the output layer.
        residual: use residual blocks.
        dropout: probability of dropping a hidden unit in each block (training only).
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
        num_blocks: int = 1,
        residual: bool = False,
        dropout: float = 0.0,
        zero_init: bool = True,
    ) -> None:
        if not isinstance(num_blocks, int) or num_blocks < 0:
            raise ValueError(f"MLP num_blocks must be an integer >= 0, got {num_blocks!r}")
        if not 0 <= dropout < 1:
            raise ValueError(f"MLP dropout must be in [0, 1), got {dropout!r}")
        layers: list[nn.Module] = [nn.Linear(in_features, hidden_features)]
        if residual:
            layers += [ResidualBlock(hidden_features, dropout) for _ in range(num_blocks)]
            layers.append(nn.ReLU())
        else:
            layers.append(nn.ReLU())
            for _ in range(num_blocks):
                layers += [nn.Dropout(dropout)] if dropout else []
                layers += [nn.Linear(hidden_features, hidden_features), nn.ReLU()]
        last = nn.Linear(hidden_features, out_features)
        if zero_init:
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        super().__init__(*layers, last)


class GlowConvNet(nn.Sequential):
    """Glow's coupling network: 3x3 conv, ReLU, 1x1 conv, ReLU, 3x3 conv (zero-initialized).

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
    """One zero-initialized 3x3 convolution, ``(B, in, H, W) -> (B, out, H, W)``.

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
