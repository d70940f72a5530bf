"""Networks with a Lipschitz constant below 1: the ``g`` of a residual flow ``z = x + g(x)``.

``Lip(g) < 1`` makes ``x + g(x)`` invertible (Banach's fixed-point theorem) and makes the
power series of ``log det(I + J_g)`` converge. It is obtained layer by layer: each linear
map is spectrally normalized to an operator norm of at most ``coefficient < 1``, and the
activation, LipSwish, is 1-Lipschitz, so ``Lip(g) <= coefficient ** num_linear_maps``.

Spectral normalization. ``W`` is replaced by ``W / max(1, sigma / c)``, where ``sigma``
estimates ``||W||_2`` by power iteration (Miyato et al. 2018; Behrmann et al. 2019;
Chen et al. 2019). Two departures from ``torch.nn.utils.parametrizations.spectral_norm``,
each needed here:

- torch's parametrization normalizes to 1 and, in training mode, runs a power-iteration
  step on *every* access of the weight. A flow must be one function between calls: the
  fixed-point inverse calls ``g`` many times, the oracle differentiates it again, and
  ``load_state_dict`` then a forward must not change the state. So the vectors ``u, v``
  are updated only when the weight has changed (its autograd version counter moved: an
  optimizer step, a load, an in-place edit), in training mode, ``num_power_iterations``
  steps at a time, and never inside one call.
- For a convolution, the spectral norm of the reshaped kernel ``(C_out, C_in k k)`` is not
  the operator norm of the convolution. Power iteration runs on the convolution operator
  itself (``conv2d`` and its adjoint ``conv_transpose2d``) on images of ``image_size``,
  as rtqichen/residual-flows does. With zero padding, the operator on smaller images is a
  compression of this one, so the bound holds for every input up to ``image_size``.

The bound is as good as the power iteration, which under-estimates ``sigma`` until it
has converged: 50 steps run at construction, then ``num_power_iterations`` (5, as in
rtqichen/residual-flows' toy runs) after each change of the weight, warm-started. That
tracks the norm while the weight moves by small steps (tested: within 0.1%), but large
steps that swap the top singular pair leave it behind (measured: 21% over after 40 steps
of relative size 0.1 that maximize ``||W x||``): raise ``num_power_iterations``, or call
``power_iterate(n)`` before relying on the bound.

References:
    Behrmann et al., "Invertible Residual Networks", ICML 2019, arXiv:1811.00995.
    Chen et al., "Residual Flows for Invertible Generative Modeling", NeurIPS 2019,
    arXiv:1906.02735 (LipSwish: section 4).
    Miyato et al., "Spectral Normalization for GANs", ICLR 2018, arXiv:1802.05957.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flows.validation import check_context

__all__ = [
    "LipSwish", "LipschitzLinear", "LipschitzConv2d", "LipschitzNet", "LipschitzMLP", "LipschitzConvNet",
    "refresh_spectral_norms",
]

_INITIAL_POWER_ITERATIONS = 50


def _check_coefficient(layer: str, coefficient: float) -> None:
    if not 0 < coefficient < 1:
        raise ValueError(
            f"{layer} coefficient must be in (0, 1) so that Lip(g) < 1 and x + g(x) is invertible, "
            f"got {coefficient!r}"
        )


class LipSwish(nn.Module):
    """``x * sigmoid(beta x) / 1.1`` with a learned ``beta > 0``: 1-Lipschitz for every ``beta``.

    ``|d/dx x sigmoid(beta x)| <= 1.1`` for all ``beta >= 0`` (Chen et al. 2019, section 4),
    hence the division. ``beta = softplus(raw)``, initialized at ``softplus(0.5)``, as in
    rtqichen/residual-flows.

    Example:
        >>> import torch
        >>> LipSwish()(torch.zeros(2, 3)).abs().sum().item()
        0.0
    """

    def __init__(self) -> None:
        super().__init__()
        self.raw_beta = nn.Parameter(torch.tensor(0.5))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(F.softplus(self.raw_beta) * x) / 1.1


class _SpectrallyNormalized(nn.Module):
    """A linear operator ``W`` used as ``W / max(1, sigma / coefficient)``.

    Subclasses hold ``weight`` and ``bias`` and implement the operator ``_apply_weight(v)``
    and its adjoint ``_apply_adjoint(u)`` on one sample ``u`` / ``v`` (buffers of the
    output and input shapes), and ``forward``.
    """

    weight: nn.Parameter
    u: Tensor
    v: Tensor

    def _setup(self, coefficient: float, num_power_iterations: int, out_shape, in_shape) -> None:
        _check_coefficient(type(self).__name__, coefficient)
        if num_power_iterations < 1:
            raise ValueError(
                f"{type(self).__name__} num_power_iterations must be >= 1, got {num_power_iterations!r}"
            )
        self.coefficient = coefficient
        self.num_power_iterations = num_power_iterations
        self.register_buffer("u", F.normalize(torch.randn(out_shape).flatten(), dim=0).reshape(out_shape))
        self.register_buffer("v", F.normalize(torch.randn(in_shape).flatten(), dim=0).reshape(in_shape))
        self._weight_version = -1
        self.power_iterate(_INITIAL_POWER_ITERATIONS)
        # Loaded vectors belong to the loaded weight: no update after a load.
        self.register_load_state_dict_post_hook(lambda module, keys: module._mark_current())

    def _apply_weight(self, v: Tensor) -> Tensor:
        raise NotImplementedError

    def _apply_adjoint(self, u: Tensor) -> Tensor:
        raise NotImplementedError

    def _mark_current(self) -> None:
        self._weight_version = self.weight._version

    @torch.no_grad()
    def power_iterate(self, num_iterations: int) -> None:
        """Runs ``num_iterations`` power-iteration steps on ``W^T W`` and stores ``u, v``."""
        u, v = self.u, self.v
        for _ in range(num_iterations):
            v = F.normalize(self._apply_adjoint(u).flatten(), dim=0).reshape(v.shape)
            u = F.normalize(self._apply_weight(v).flatten(), dim=0).reshape(u.shape)
        self.u.copy_(u)
        self.v.copy_(v)
        self._mark_current()

    def spectral_norm(self) -> Tensor:
        """``sigma = u^T W v``, the power iteration's estimate of ``||W||_2`` (differentiable in ``W``)."""
        return torch.sum(self.u * self._apply_weight(self.v))

    def normalized_weight(self) -> Tensor:
        """``W / max(1, sigma / coefficient)``: operator norm at most ``coefficient`` (as estimated)."""
        if self.training and self.weight._version != self._weight_version:
            self.power_iterate(self.num_power_iterations)
        return self.weight / torch.clamp(self.spectral_norm() / self.coefficient, min=1.0)


class LipschitzLinear(_SpectrallyNormalized):
    """A linear layer ``y = W' x + b`` with ``||W'||_2 <= coefficient`` (spectral normalization).

    Args:
        in_features: input size.
        out_features: output size.
        coefficient: the bound on the operator norm, in ``(0, 1)``.
        num_power_iterations: power-iteration steps after each change of the weight.

    Example:
        >>> import torch
        >>> layer = LipschitzLinear(4, 3, coefficient=0.9)
        >>> bool(torch.linalg.matrix_norm(layer.normalized_weight(), 2) <= 0.9 + 1e-6)
        True
    """

    def __init__(
        self, in_features: int, out_features: int, coefficient: float = 0.97, num_power_iterations: int = 5
    ) -> None:
        super().__init__()
        linear = nn.Linear(in_features, out_features)  # torch's initialization
        self.weight, self.bias = linear.weight, linear.bias
        self._setup(coefficient, num_power_iterations, (out_features,), (in_features,))

    def _apply_weight(self, v: Tensor) -> Tensor:
        return self.weight @ v

    def _apply_adjoint(self, u: Tensor) -> Tensor:
        return self.weight.T @ u

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.normalized_weight(), self.bias)


class LipschitzConv2d(_SpectrallyNormalized):
    """A 'same' convolution (stride 1, zero padding) with operator norm at most ``coefficient``.

    The norm is that of the convolution operator on images of ``image_size`` (power
    iteration with ``conv2d`` and ``conv_transpose2d``), which bounds it on every smaller
    image too; larger images are refused. A 1x1 convolution's norm is its matrix norm
    whatever the size, so it iterates on one pixel.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: an odd kernel size.
        image_size: ``(H, W)`` of the largest input.
        coefficient: the bound on the operator norm, in ``(0, 1)``.
        num_power_iterations: power-iteration steps after each change of the weight.

    Example:
        >>> import torch
        >>> LipschitzConv2d(2, 3, 3, (4, 4))(torch.randn(1, 2, 4, 4)).shape
        torch.Size([1, 3, 4, 4])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        image_size: tuple[int, int],
        coefficient: float = 0.97,
        num_power_iterations: int = 5,
    ) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"LipschitzConv2d kernel_size must be odd (a 'same' convolution), got {kernel_size}")
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.weight, self.bias = conv.weight, conv.bias
        self.padding = kernel_size // 2
        self.image_size = tuple(image_size)
        h, w = (1, 1) if kernel_size == 1 else self.image_size
        self._setup(coefficient, num_power_iterations, (out_channels, h, w), (in_channels, h, w))

    def _apply_weight(self, v: Tensor) -> Tensor:
        return F.conv2d(v.unsqueeze(0), self.weight, padding=self.padding).squeeze(0)

    def _apply_adjoint(self, u: Tensor) -> Tensor:
        return F.conv_transpose2d(u.unsqueeze(0), self.weight, padding=self.padding).squeeze(0)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2] > self.image_size[0] or x.shape[-1] > self.image_size[1]:
            raise ValueError(
                f"LipschitzConv2d was normalized for images up to {self.image_size}, got input of shape "
                f"{tuple(x.shape)}; build it with image_size={tuple(x.shape[-2:])}"
            )
        return F.conv2d(x, self.normalized_weight(), self.bias, padding=self.padding)


class LipschitzNet(nn.Module):
    """Base of the residual branches ``g(x, context)`` with ``Lip_x(g) < 1``.

    The context enters as a bias of the first hidden layer, so it leaves the Lipschitz
    constant in ``x`` unchanged.

    Attributes:
        features: size of dim 1 of the input (and output).
        context_features: size of the context, 0 for none.
        ranks: the input ranks accepted, batch included.
        lipschitz_bound: ``coefficient ** num_linear_maps``, an upper bound on ``Lip(g)``
            (as good as the power iteration's estimates).
    """

    features: int
    context_features: int
    ranks: tuple[int, ...]
    lipschitz_bound: float

    def _context_bias(self, context: Tensor | None, batch: int, hidden: Tensor) -> Tensor:
        check_context(type(self).__name__, context, self.context_features, batch)
        if context is None:
            return hidden
        bias = self.context_net(context)  # (B, hidden)
        return hidden + bias.reshape(*bias.shape, *([1] * (hidden.dim() - 2)))


class LipschitzMLP(LipschitzNet):
    """``g(x) = L_out(act(... act(L_in x + C context) ...))`` on vectors ``(B, features)``.

    ``num_blocks + 1`` hidden layers of ``hidden_features`` LipSwish units; every linear map
    spectrally normalized, so ``Lip(g) <= coefficient ** (num_blocks + 2)``.

    Args:
        features: input and output size.
        hidden_features: width of the hidden layers.
        num_blocks: hidden blocks between the input layer and the output layer.
        context_features: size of a ``(B, K)`` context, 0 for none.
        coefficient: the bound on each linear map's norm, in ``(0, 1)``.
        num_power_iterations: power-iteration steps after each change of a weight.

    Example:
        >>> import torch
        >>> LipschitzMLP(3, 8)(torch.randn(2, 3)).shape
        torch.Size([2, 3])
    """

    ranks = (2,)

    def __init__(
        self,
        features: int,
        hidden_features: int = 128,
        num_blocks: int = 1,
        context_features: int = 0,
        coefficient: float = 0.97,
        num_power_iterations: int = 5,
    ) -> None:
        super().__init__()
        if num_blocks < 0:
            raise ValueError(f"LipschitzMLP num_blocks must be >= 0, got {num_blocks!r}")
        self.features, self.context_features = features, context_features
        sizes = [features] + [hidden_features] * (num_blocks + 1) + [features]
        self.linears = nn.ModuleList(
            LipschitzLinear(a, b, coefficient, num_power_iterations) for a, b in zip(sizes[:-1], sizes[1:])
        )
        self.activations = nn.ModuleList(LipSwish() for _ in range(num_blocks + 1))
        self.context_net = nn.Linear(context_features, hidden_features) if context_features else None
        self.lipschitz_bound = coefficient ** len(self.linears)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        h = self._context_bias(context, x.shape[0], self.linears[0](x))
        for activation, linear in zip(self.activations, self.linears[1:]):
            h = linear(activation(h))
        return h


class LipschitzConvNet(LipschitzNet):
    """Residual Flows' image branch: ``k x k`` conv, LipSwish, 1x1 conv(s), LipSwish, ``k x k`` conv.

    Maps ``(B, features, H, W)`` to the same shape, ``H, W`` at most ``image_size``;
    ``Lip(g) <= coefficient ** (num_blocks + 2)`` in the Euclidean norm of the image.

    Args:
        features: input and output channels.
        hidden_features: channels of the hidden layers.
        image_size: ``(H, W)`` of the largest input (the convolutions' norms depend on it).
        num_blocks: 1x1 convolutions between the two ``k x k`` ones (1 in Residual Flows).
        context_features: size of a ``(B, K)`` context, 0 for none.
        coefficient: the bound on each convolution's operator norm, in ``(0, 1)``.
        kernel_size: the outer convolutions' odd kernel size.
        num_power_iterations: power-iteration steps after each change of a weight.

    References:
        Chen et al. 2019, arXiv:1906.02735, appendix (kernels 3-1-3).

    Example:
        >>> import torch
        >>> LipschitzConvNet(2, 4, (4, 4))(torch.randn(1, 2, 4, 4)).shape
        torch.Size([1, 2, 4, 4])
    """

    ranks = (4,)

    def __init__(
        self,
        features: int,
        hidden_features: int,
        image_size: tuple[int, int],
        num_blocks: int = 1,
        context_features: int = 0,
        coefficient: float = 0.97,
        kernel_size: int = 3,
        num_power_iterations: int = 5,
    ) -> None:
        super().__init__()
        if num_blocks < 0:
            raise ValueError(f"LipschitzConvNet num_blocks must be >= 0, got {num_blocks!r}")
        self.features, self.context_features = features, context_features
        conv = lambda a, b, k: LipschitzConv2d(a, b, k, image_size, coefficient, num_power_iterations)  # noqa: E731
        inner = [conv(hidden_features, hidden_features, 1) for _ in range(num_blocks)]
        self.convs = nn.ModuleList(
            [conv(features, hidden_features, kernel_size), *inner, conv(hidden_features, features, kernel_size)]
        )
        self.activations = nn.ModuleList(LipSwish() for _ in range(num_blocks + 1))
        self.context_net = nn.Linear(context_features, hidden_features) if context_features else None
        self.lipschitz_bound = coefficient ** len(self.convs)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        h = self._context_bias(context, x.shape[0], self.convs[0](x))
        for activation, conv in zip(self.activations, self.convs[1:]):
            h = conv(activation(h))
        return h



def refresh_spectral_norms(module: nn.Module) -> None:
    """Updates the power iteration of every spectrally normalized layer in ``module`` whose
    weight changed, in training mode: call it once before ``g`` runs inside ``torch.func``
    transforms or a fixed-point loop, so that no update happens in there."""
    for layer in module.modules():
        if isinstance(layer, _SpectrallyNormalized) and layer.training:
            if layer.weight._version != layer._weight_version:
                layer.power_iterate(layer.num_power_iterations)
