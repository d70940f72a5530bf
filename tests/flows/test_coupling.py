"""Coupling layers: masks, parities, odd sizes, context, errors, and float32 stability."""

from __future__ import annotations

from functools import partial

import pytest
import torch

import flows
from flows.coupling import checkerboard
from flows.nets import MLP, GlowConvNet
from tests.registry import perturb

mlp = partial(MLP, hidden_features=8)
conv = partial(GlowConvNet, hidden_features=4)


@pytest.mark.parametrize(("parity", "transformed"), [(0, [False, False, True, True, True]), (1, [True, True, False, False, False])])
def test_channel_mask_halves_differ_by_one_for_odd_counts(parity: int, transformed: list[bool]) -> None:
    layer = flows.AffineCoupling(5, mlp, parity=parity)
    assert layer.transformed_entries((5,)).tolist() == transformed


def test_checkerboard_patterns() -> None:
    assert checkerboard((5,), 0).tolist() == [False, True, False, True, False]
    assert checkerboard((5,), 1).tolist() == [True, False, True, False, True]
    image = checkerboard((2, 2, 3), 0)
    assert image[0].tolist() == [[False, True, False], [True, False, True]]
    assert torch.equal(image[0], image[1])


@pytest.mark.parametrize("mask", ["channel", "checkerboard"])
@pytest.mark.parametrize("parity", [0, 1])
def test_untouched_entries_pass_through_exactly(mask: str, parity: int) -> None:
    layer = flows.AffineCoupling(3, conv, mask=mask, parity=parity)
    perturb(layer)
    x = torch.randn(2, 3, 4, 4)
    y, _ = layer(x)
    untouched = ~layer.transformed_entries((3, 4, 4))
    assert torch.equal(y[:, untouched], x[:, untouched])
    assert not torch.allclose(y[:, ~untouched], x[:, ~untouched])


def test_fresh_layers_are_the_identity() -> None:
    x = torch.randn(2, 3, 4, 4)
    for layer in (flows.AffineCoupling(3, conv), flows.AdditiveCoupling(3, conv, mask="checkerboard")):
        y, logdet = layer(x)
        assert torch.equal(y, x) and torch.all(logdet == 0)


def test_affine_scale_is_bounded_by_the_soft_clamp() -> None:
    layer = flows.AffineCoupling(2, mlp, clamp=1.5)
    with torch.no_grad():
        layer.subnet[-1].bias.fill_(1e6)
    _, logdet = layer(torch.randn(4, 2))
    torch.testing.assert_close(logdet, torch.full((4,), 1.5), rtol=0, atol=1e-12)


def test_sigmoid_scale_matches_glow() -> None:
    layer = flows.AffineCoupling(2, mlp, scale="sigmoid")
    x = torch.randn(3, 2)
    y, logdet = layer(x)
    s = torch.sigmoid(torch.tensor(2.0))
    torch.testing.assert_close(y[:, 1], x[:, 1] * s)
    torch.testing.assert_close(logdet, torch.log(s).expand(3))


def test_context_is_broadcast_over_space() -> None:
    seen = {}

    class Recorder(torch.nn.Module):
        def __init__(self, in_features: int, out_features: int) -> None:
            super().__init__()
            self.net = conv(in_features, out_features)

        def forward(self, h):
            seen["input"] = h
            return self.net(h)

    layer = flows.AffineCoupling(3, Recorder, context_features=2)
    context = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    layer(torch.randn(2, 3, 2, 2), context)
    assert seen["input"].shape == (2, 1 + 2, 2, 2)
    assert torch.all(seen["input"][1, 2] == 4.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mask": "diagonal"}, "AffineCoupling mask must be 'channel' or 'checkerboard', got 'diagonal'"),
        ({"parity": 2}, "AffineCoupling parity must be 0 or 1, got 2"),
        ({"scale": "softplus"}, "AffineMap scale must be 'exp' or 'sigmoid', got 'softplus'"),
    ],
)
def test_bad_construction(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        flows.AffineCoupling(4, mlp, **kwargs)


def test_channel_mask_needs_two_features() -> None:
    with pytest.raises(ValueError, match="AdditiveCoupling with a channel mask needs features >= 2, got 1"):
        flows.AdditiveCoupling(1, mlp)


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (torch.randn(2, 4, 3), r"AffineCoupling expects input of rank 2 \(B, D\) or rank 4 \(B, C, H, W\), got shape \(2, 4, 3\)"),
        (torch.randn(2, 5), r"AffineCoupling expects 4 features on dim 1, got input of shape \(2, 5\)"),
    ],
)
def test_bad_input(x: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        flows.AffineCoupling(4, mlp)(x)
    with pytest.raises(ValueError, match=message):
        flows.AffineCoupling(4, mlp).inverse(x)


def test_context_of_the_wrong_batch() -> None:
    layer = flows.AffineCoupling(4, mlp, context_features=2)
    with pytest.raises(ValueError, match=r"AffineCoupling expects context of shape \(3, 2\), got \(2, 2\)"):
        layer(torch.randn(3, 4), torch.randn(2, 2))


def glow_like_stack(channels: int, image: bool) -> flows.Sequential:
    """64 layers: ActNorm, InvConv1x1, affine and additive couplings, repeated."""
    net = partial(GlowConvNet, hidden_features=16) if image else partial(MLP, hidden_features=32)
    layers: list[flows.Flow] = []
    for step in range(16):
        parity = step % 2
        layers += [
            flows.ActNorm(channels),
            flows.InvConv1x1(channels),
            flows.AffineCoupling(channels, net, parity=parity),
            flows.AdditiveCoupling(channels, net, mask="checkerboard", parity=parity),
        ]
    return flows.Sequential(*layers)


@pytest.mark.parametrize("image", [False, True], ids=["vector", "image"])
def test_float32_round_trip_through_64_layers(image: bool) -> None:
    torch.set_default_dtype(torch.float32)
    stack = glow_like_stack(4, image)
    perturb(stack, 0.05, where=lambda name: "subnet" in name)
    x = torch.randn(32, 4, 8, 8) if image else torch.randn(256, 4)
    stack(x)  # ActNorm initialization
    stack.eval()
    with torch.no_grad():
        z, logdet = stack(x)
        x_back, inverse_logdet = stack.inverse(z)
    # Bound: each of the 64 layers adds a few float32 ulps (eps = 1.2e-7) relative to
    # |x| <= ~5, so a linear growth gives 64 * 3 * 1.2e-7 * 5 ~ 1e-4. Measured: ~4e-6
    # on both stacks, so this bound catches any layer that loses precision badly.
    assert (x_back - x).abs().max() < 1e-4
    assert (logdet + inverse_logdet).abs().max() < 1e-4 * max(1.0, float(logdet.abs().max()))


def test_checkerboard_mask_is_built_once_per_shape() -> None:
    layer = flows.AffineCoupling(3, conv, mask="checkerboard")
    x = torch.randn(2, 3, 4, 4)
    layer(x)
    mask = layer._checkerboard_on(x)
    layer(x)
    layer.inverse(x)
    assert layer._checkerboard_on(x) is mask and len(layer._masks) == 1
    assert layer._checkerboard_on(torch.randn(2, 3, 2, 2)).shape == (1, 3, 2, 2)


def test_checkerboard_after_inference_mode_still_trains() -> None:
    layer = flows.AffineCoupling(3, conv, mask="checkerboard")
    perturb(layer)
    x = torch.randn(2, 3, 4, 4)
    with torch.inference_mode():
        layer(x)
    y, logdet = layer(x)
    (y.sum() + logdet.sum()).backward()
    assert all(p.grad is not None for p in layer.parameters())
