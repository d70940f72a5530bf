"""The registry of every public flow the contract test checks: id -> (factory, input shape, context features).

Adding a layer to the contract test is one line here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

import flows
from flows.nets import MLP, GlowConvNet


@dataclass(frozen=True)
class Case:
    make: Callable[[], flows.Flow]
    shape: tuple[int, ...]  # one sample's shape
    context: int = 0  # context features, 0 for none


mlp = partial(MLP, hidden_features=8)
conv = partial(GlowConvNet, hidden_features=6)
prior = partial(GlowConvNet, hidden_features=4)


def glow_step(channels: int) -> flows.Flow:
    return flows.Sequential(
        flows.ActNorm(channels),
        flows.InvConv1x1(channels),
        flows.AffineCoupling(channels, conv, scale="sigmoid"),
    )


def glow_multiscale(channels: int = 3) -> flows.Flow:
    """Two Glow levels: squeeze, a step, split with a learned prior; squeeze, a step; unsqueeze back."""
    inner = flows.Sequential(flows.Squeeze(), glow_step(channels * 8), flows.Inverse(flows.Squeeze()))
    split = flows.Split(inner, num_features=channels * 4, kept=channels * 2, prior_net=prior)
    return flows.Sequential(flows.Squeeze(), glow_step(channels * 4), split, flows.Inverse(flows.Squeeze()))


def realnvp_multiscale(channels: int = 3) -> flows.Flow:
    """RealNVP's scale: checkerboard couplings, squeeze, channel couplings, factor out half."""
    inner = flows.Sequential(
        flows.AffineCoupling(channels * 2, conv, mask="checkerboard"),
        flows.AffineCoupling(channels * 2, conv, mask="checkerboard", parity=1),
    )
    return flows.Sequential(
        flows.AffineCoupling(channels, conv, mask="checkerboard"),
        flows.AffineCoupling(channels, conv, mask="checkerboard", parity=1),
        flows.Squeeze(),
        flows.AffineCoupling(channels * 4, conv, mask="channel"),
        flows.AffineCoupling(channels * 4, conv, mask="channel", parity=1),
        flows.Split(inner, num_features=channels * 4),
        flows.Inverse(flows.Squeeze()),
    )


CASES: dict[str, Case] = {
    # base
    "sequential-vector": Case(lambda: flows.Sequential(flows.ActNorm(5), flows.Reverse(), flows.InvConv1x1(5)), (5,)),
    "inverse-affine": Case(lambda: flows.Inverse(flows.AffineCoupling(5, mlp)), (5,)),
    # normalization
    "actnorm-vector": Case(lambda: flows.ActNorm(5), (5,)),
    "actnorm-image": Case(lambda: flows.ActNorm(3), (3, 4, 2)),
    # linear
    "invconv-lu-image": Case(lambda: flows.InvConv1x1(3), (3, 2, 4)),
    "invconv-full-image": Case(lambda: flows.InvConv1x1(3, lu=False), (3, 2, 4)),
    "invconv-lu-vector": Case(lambda: flows.InvConv1x1(5), (5,)),
    "permutation-vector": Case(lambda: flows.Permutation(5, seed=1), (5,)),
    "permutation-image": Case(lambda: flows.Permutation(3, seed=1), (3, 2, 2)),
    "reverse-vector": Case(lambda: flows.Reverse(), (5,)),
    # elementwise
    "scalar-affine": Case(lambda: flows.ScalarAffine(-0.25, 1.0), (3, 2, 2)),
    "logit": Case(lambda: flows.Sequential(flows.Inverse(flows.Logit(0.0)), flows.Logit(0.05)), (5,)),
    # reshape
    "squeeze": Case(lambda: flows.Squeeze(), (3, 4, 2)),
    "unsqueeze": Case(lambda: flows.Inverse(flows.Squeeze()), (12, 1, 2)),
    "flatten": Case(lambda: flows.Flatten((3, 2, 2)), (3, 2, 2)),
    "unflatten": Case(lambda: flows.Inverse(flows.Flatten((2, 1, 3))), (6,)),
    "split-prior-image": Case(lambda: flows.Split(flows.ActNorm(2), 5, kept=2, prior_net=prior), (5, 2, 2)),
    "split-prior-vector": Case(lambda: flows.Split(flows.ActNorm(2), 5, prior_net=mlp), (5,)),
    "split-identity": Case(lambda: flows.Split(flows.InvConv1x1(2), 4), (4, 2, 2)),
    # coupling
    "additive-channel-vector": Case(lambda: flows.AdditiveCoupling(5, mlp), (5,)),
    "additive-checker-vector": Case(lambda: flows.AdditiveCoupling(5, mlp, mask="checkerboard", parity=1), (5,)),
    "additive-channel-image": Case(lambda: flows.AdditiveCoupling(3, conv, parity=1), (3, 2, 2)),
    "affine-channel-vector": Case(lambda: flows.AffineCoupling(5, mlp), (5,)),
    "affine-channel-vector-p1": Case(lambda: flows.AffineCoupling(5, mlp, parity=1), (5,)),
    "affine-checker-vector": Case(lambda: flows.AffineCoupling(5, mlp, mask="checkerboard"), (5,)),
    "affine-channel-image": Case(lambda: flows.AffineCoupling(3, conv), (3, 2, 4)),
    "affine-checker-image": Case(lambda: flows.AffineCoupling(3, conv, mask="checkerboard", parity=1), (3, 4, 2)),
    "affine-sigmoid-image": Case(lambda: flows.AffineCoupling(3, conv, scale="sigmoid"), (3, 2, 2)),
    "affine-context-vector": Case(lambda: flows.AffineCoupling(5, mlp, context_features=2), (5,), 2),
    "affine-context-image": Case(lambda: flows.AffineCoupling(3, conv, mask="checkerboard", context_features=2), (3, 2, 2), 2),
    "additive-context-vector": Case(lambda: flows.AdditiveCoupling(4, mlp, context_features=3), (4,), 3),
    "spline-channel-vector": Case(lambda: flows.RQSplineCoupling(5, mlp, num_bins=4, tail_bound=2.0), (5,)),
    "spline-checker-vector-p1": Case(lambda: flows.RQSplineCoupling(5, mlp, mask="checkerboard", parity=1, num_bins=3), (5,)),
    "spline-channel-image": Case(lambda: flows.RQSplineCoupling(3, conv, num_bins=4, tail_bound=1.5), (3, 2, 2)),
    "spline-context-vector": Case(lambda: flows.RQSplineCoupling(4, mlp, context_features=2, num_bins=5), (4,), 2),
    # autoregressive
    "maf": Case(lambda: flows.MaskedAffineAutoregressive(5, 8), (5,)),
    "maf-reversed-residual": Case(lambda: flows.MaskedAffineAutoregressive(5, 8, order="reversed", residual=True), (5,)),
    "maf-context": Case(lambda: flows.MaskedAffineAutoregressive(5, 8, order="random", seed=3, context_features=2), (5,), 2),
    "iaf": Case(lambda: flows.Inverse(flows.MaskedAffineAutoregressive(5, 8)), (5,)),
    "spline-autoregressive": Case(lambda: flows.RQSplineAutoregressive(5, 8, num_bins=4, tail_bound=2.0), (5,)),
    "spline-autoregressive-context": Case(lambda: flows.RQSplineAutoregressive(4, 8, num_bins=3, context_features=2), (4,), 2),
    # multi-scale stacks
    "glow-multiscale": Case(glow_multiscale, (3, 4, 4)),
    "realnvp-multiscale": Case(realnvp_multiscale, (3, 4, 4)),
}


def perturb(flow: torch.nn.Module, std: float = 0.3) -> None:
    """Random non-trivial parameters, so identity-initialised layers are not the identity.

    LU factors stay well-conditioned (unit diagonal L, log_s near 0), and everything
    else gets a normal perturbation around its initial value.
    """
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(torch.randn_like(p) * std)
