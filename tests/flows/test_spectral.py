"""Spectral normalization (flows/spectral.py): the bounds hold for the real operator norms, the
power iteration runs only when a weight changed, and the errors name what came."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flows.lipschitz import LipschitzMLP
from flows.spectral import LipschitzConv2d, LipschitzLinear


pytestmark = pytest.mark.usefixtures("one_thread")


def conv_operator_norm(conv: LipschitzConv2d, weight: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The exact operator norm of the zero-padded convolution on ``size``: its full matrix's largest singular value."""
    channels = weight.shape[1]
    basis = torch.eye(channels * size[0] * size[1]).reshape(-1, channels, *size)
    matrix = F.conv2d(basis, weight, padding=conv.padding).reshape(basis.shape[0], -1)
    return torch.linalg.matrix_norm(matrix, 2)


def test_linear_norm_stays_below_the_coefficient_while_training() -> None:
    layer = LipschitzLinear(6, 5, coefficient=0.9)
    with torch.no_grad():
        layer.weight.mul_(4)
    for _ in range(40):  # small gradient-ascent steps on the output's size
        (grad,) = torch.autograd.grad(layer(torch.randn(16, 6)).square().sum(), layer.weight)
        with torch.no_grad():
            layer.weight.add_(0.03 * grad / grad.norm())
        layer(torch.randn(1, 6))  # the update after the step
        # Five warm-started power iterations per step track the norm to within 0.1%.
        assert torch.linalg.matrix_norm(layer.normalized_weight(), 2) <= 0.9 * (1 + 1e-3)
    assert torch.linalg.matrix_norm(layer.weight, 2) > 2  # the normalization is doing the work
    layer.power_iterate(100)
    assert torch.linalg.matrix_norm(layer.normalized_weight(), 2) <= 0.9 * (1 + 1e-9)


def test_conv_norm_is_the_operator_norm_not_the_reshaped_kernels() -> None:
    """Normalizing the reshaped kernel (C_out, C_in k k) to c can leave the operator norm above c;
    the power iteration on the operator bounds the real one."""
    torch.manual_seed(3)
    conv = LipschitzConv2d(2, 2, 3, (5, 5), coefficient=0.9)
    with torch.no_grad():
        conv.weight.copy_(torch.ones_like(conv.weight))  # a smoothing kernel: the worst case
    conv.power_iterate(200)
    operator = conv_operator_norm(conv, conv.normalized_weight(), (5, 5))
    assert operator <= 0.9 * (1 + 1e-6)
    reshaped = conv.weight / torch.linalg.matrix_norm(conv.weight.reshape(2, -1), 2) * 0.9
    assert conv_operator_norm(conv, reshaped, (5, 5)) > 2 * 0.9
    assert conv_operator_norm(conv, conv.normalized_weight(), (3, 4)) <= operator  # smaller images: below


def test_one_by_one_conv_needs_no_image_size() -> None:
    conv = LipschitzConv2d(3, 4, 1, (6, 6), coefficient=0.8)
    assert conv.u.shape == (4, 1, 1)
    norm = torch.linalg.matrix_norm(conv.normalized_weight().reshape(4, 3), 2)
    assert norm <= 0.8 * (1 + 1e-6)


def test_power_iteration_runs_only_when_the_weight_changed() -> None:
    layer = LipschitzLinear(4, 4)
    u = layer.u.clone()
    layer(torch.randn(2, 4))
    layer(torch.randn(2, 4))
    assert torch.equal(layer.u, u), "a forward with the same weight moved u"
    with torch.no_grad():
        layer.weight.add_(torch.randn(4, 4))
    layer(torch.randn(2, 4))
    assert not torch.equal(layer.u, u)
    u = layer.u.clone()
    layer.eval()
    with torch.no_grad():
        layer.weight.add_(torch.randn(4, 4))
    layer(torch.randn(2, 4))
    assert torch.equal(layer.u, u), "eval mode must not update"


def test_loading_a_state_does_not_trigger_an_update() -> None:
    source, target = LipschitzMLP(3, 8), LipschitzMLP(3, 8)
    target.load_state_dict(source.state_dict())
    target(torch.randn(2, 3))
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


@pytest.mark.parametrize("make", [
    lambda c: LipschitzLinear(2, 2, coefficient=c),
    lambda c: LipschitzConv2d(2, 2, 3, (4, 4), coefficient=c),
])
def test_a_coefficient_of_one_or_more_is_refused(make) -> None:
    with pytest.raises(ValueError, match=r"coefficient must be in \(0, 1\) so that Lip\(g\) < 1 .*got 1.0"):
        make(1.0)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="kernel_size must be odd .*got 2"):
        LipschitzConv2d(2, 2, 2, (4, 4))
    with pytest.raises(ValueError, match="num_power_iterations must be >= 1, got 0"):
        LipschitzLinear(2, 2, num_power_iterations=0)
    with pytest.raises(ValueError, match=r"normalized for images up to \(4, 4\), got input of shape \(1, 2, 5, 4\)"):
        LipschitzConv2d(2, 2, 3, (4, 4))(torch.randn(1, 2, 5, 4))
