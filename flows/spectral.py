"""Spectral normalization: linear maps and convolutions with operator norm at most ``c < 1``.

``W`` is replaced by ``W / max(1, sigma / c)``, where ``sigma`` estimates ``||W||_2`` by
power iteration (Miyato et al. 2018; Behrmann et al. 2019; Chen et al. 2019). Two
departures from ``torch.nn.utils.parametrizations.spectral_norm``, each needed here:

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
tracks the norm while the weight moves by small steps (tested: within 0.1%), but not when
training pushes several singular values up to the cap together: after 3000 Adam steps
(1e-3) of benchmarks/residual_toy.py the largest normalized norm was 1.2-2.4% above the
coefficient in four runs (so ``Lip(g) <= (1.024 c)^3``, still below 1 for ``c = 0.97``), and 40
gradient steps of Frobenius size 0.1 that maximize ``||W x||`` on a 5 x 6 weight left it
21% above. Raise ``num_power_iterations``, or call ``power_iterate(n)`` before relying on
the bound (sampling, evaluation).

References:
    Miyato et al., "Spectral Normalization for GANs", ICLR 2018, arXiv:1802.05957.
    Behrmann et al., "Invertible Residual Networks", ICML 2019, arXiv:1811.00995.
    Chen et al., "Residual Flows for Invertible Generative Modeling", NeurIPS 2019, arXiv:1906.02735.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LipschitzLinear", "LipschitzConv2d", "refresh_spectral_norms", "check_coefficient"]

_INITIAL_POWER_ITERATIONS = 50


def check_coefficient(layer: str, coefficient: float) -> None:
    """Raises ``ValueError`` unless ``0 < coefficient < 1``, naming ``layer``."""
    if not 0 < coefficient < 1:
        raise ValueError(
            f"{layer} coefficient must be in (0, 1) so that Lip(g) < 1 and x + g(x) is invertible, "
            f"got {coefficient!r}"
        )


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
        check_coefficient(type(self).__name__, coefficient)
        if num_power_iterations < 1:
            raise ValueError(
                f"{type(self).__name__} num_power_iterations must be >= 1, got {num_power_iterations!r}"
            )
        self.coefficient = coefficient
        self.num_power_iterations = num_power_iterations
        self.register_buffer("u", F.normalize(torch.randn(out_shape).flatten(), dim=0).reshape(out_shape))
        self.register_buffer("v", F.normalize(torch.randn(in_shape).flatten(), dim=0).reshape(in_shape))
        self._weight_version: tuple = ()
        self.power_iterate(_INITIAL_POWER_ITERATIONS)
        # Loaded vectors belong to the loaded weight: no update after a load.
        self.register_load_state_dict_post_hook(lambda module, keys: module._mark_current())

    def _apply_weight(self, v: Tensor) -> Tensor:
        raise NotImplementedError

    def _apply_adjoint(self, u: Tensor) -> Tensor:
        raise NotImplementedError

    def _weight_key(self) -> tuple[int, int, torch.dtype]:
        """The weight's in-place version and storage: ``.to()``/``.double()`` make a new
        tensor whose version counter restarts, so the version alone could miss a change."""
        return self.weight._version, self.weight.data_ptr(), self.weight.dtype

    def _mark_current(self) -> None:
        self._weight_version = self._weight_key()

    def weight_changed(self) -> bool:
        """Whether the weight changed since the vectors were last updated (or loaded)."""
        return self._weight_key() != self._weight_version

    @torch.no_grad()
    def power_iterate(self, num_iterations: int) -> None:
        """Runs ``num_iterations`` power-iteration steps on ``W^T W`` and stores ``u, v``."""
        u, v = self.u, self.v
        for _ in range(num_iterations):  # 6 small ops a step: power iteration is ~15% of a toy step
            v = self._apply_adjoint(u)
            v = v / (torch.linalg.vector_norm(v) + 1e-12)
            u = self._apply_weight(v)
            u = u / (torch.linalg.vector_norm(u) + 1e-12)
        self.u.copy_(u)
        self.v.copy_(v)
        self._mark_current()

    def spectral_norm(self) -> Tensor:
        """``sigma = u^T W v``, the power iteration's estimate of ``||W||_2`` (differentiable in ``W``)."""
        return torch.sum(self.u * self._apply_weight(self.v))

    def normalized_weight(self) -> Tensor:
        """``W / max(1, sigma / coefficient)``: operator norm at most ``coefficient`` (as estimated)."""
        if self.training and self.weight_changed():
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


def refresh_spectral_norms(module: nn.Module) -> None:
    """Updates the power iteration of every spectrally normalized layer in ``module`` whose
    weight changed, in training mode: call it once before ``g`` runs inside ``torch.func``
    transforms or a fixed-point loop, so that no update happens in there."""
    for layer in module.modules():
        if isinstance(layer, _SpectrallyNormalized) and layer.training:
            if layer.weight_changed():
                layer.power_iterate(layer.num_power_iterations)
