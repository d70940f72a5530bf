"""The one registry of every public layer and every ready model that the contract test
checks: id -> :class:`Case` (factory, one sample's shape, context features, inputs).

Adding a layer to the contract test is one line in ``LAYERS``; a model or preset added to
``models.MODELS`` joins through ``MODEL_CASES`` by itself (with its small sizes in ``SMALL``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

import flows
import models
from flows.nets import MLP, GlowConvNet
from torch.distributions.transforms import AffineTransform, ComposeTransform, SigmoidTransform


@dataclass(frozen=True)
class Case:
    make: Callable[[], flows.Flow]
    shape: tuple[int, ...]  # one sample's shape
    context: int = 0  # context features, 0 for none
    inputs: Callable[[int, tuple[int, ...]], torch.Tensor] | None = None  # (batch, shape) -> x; None: N(0.2, 1.5^2)
    perturb_std: float = 0.3  # std of the noise `perturb` adds to every parameter
    tolerance: float | None = None  # the oracle's atol = rtol; None: check_flow's (1e-7 in float64)

    def sample_inputs(self, batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(x, context)`` for a batch of ``batch``, in the default dtype."""
        x = torch.randn(batch, *self.shape) * 1.5 + 0.2 if self.inputs is None else self.inputs(batch, self.shape)
        return x, (torch.randn(batch, self.context) if self.context else None)


mlp = partial(MLP, hidden_features=8)
conv = partial(GlowConvNet, hidden_features=6)
prior = partial(GlowConvNet, hidden_features=4)
continuous_net = partial(flows.ConcatSquashNet, hidden_features=4, num_blocks=0)
# A continuous flow is exact only to its ODE solver's error. Measured over the registry's
# continuous cases (perturbed, float64): the largest log-det / round-trip error is 2e-6 with
# the solver at 1e-8 (22 evaluations per solve on average) and 2e-8 at 1e-10 (32); so they
# run at 1e-8 and are checked at atol = rtol = 1e-6, as in tests/models/test_continuous_model.py.
SOLVER = dict(atol=1e-8, rtol=1e-8)
ODE_TOLERANCE = 1e-6


def glow_step(channels: int) -> flows.Flow:
    return flows.Sequential(
        flows.ActNorm(channels),
        flows.InvConv1x1(channels),
        flows.AffineCoupling(channels, conv, scale="sigmoid"),
    )


def glow_multiscale(channels: int = 3) -> flows.Flow:
    """Two Glow levels: squeeze, a step, split with a learned prior; squeeze, a step; unsqueeze back."""
    inner = flows.Sequential(flows.Squeeze(), glow_step(channels * 8), flows.Inverse(flows.Squeeze()))
    split = flows.Split(inner, features=channels * 4, kept=channels * 2, prior_net=prior)
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
        flows.Split(inner, features=channels * 4),
        flows.Inverse(flows.Squeeze()),
    )


LAYERS: dict[str, Case] = {
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
    # torch.distributions transforms as flows, and a flow through torch's Transform and back
    "torch-transform": Case(lambda: flows.TransformAsFlow(ComposeTransform([AffineTransform(0.1, 0.8), SigmoidTransform()])), (4,)),
    "flow-as-transform": Case(lambda: flows.TransformAsFlow(flows.FlowAsTransform(flows.AffineCoupling(3, conv), 3)), (3, 2, 2)),
    # residual (free-form Jacobian, exact mode)
    "residual-vector": Case(lambda: flows.Residual(flows.LipschitzMLP(3, 8)), (3,)),
    "residual-context-vector": Case(lambda: flows.Residual(flows.LipschitzMLP(4, 8, context_features=2)), (4,), 2),
    "residual-image": Case(lambda: flows.Residual(flows.LipschitzConvNet(2, 4, (2, 2))), (2, 2, 2)),
    "residual-context-image": Case(
        lambda: flows.Residual(flows.LipschitzConvNet(2, 4, (2, 2), context_features=2)), (2, 2, 2), 2
    ),
    # continuous (FFJORD's ODE, exact trace), exact to the solver's error
    "continuous-vector": Case(lambda: flows.ContinuousFlow(3, continuous_net, **SOLVER), (3,), tolerance=ODE_TOLERANCE),
    "continuous-context-vector": Case(
        lambda: flows.ContinuousFlow(4, continuous_net, 2, **SOLVER), (4,), 2, tolerance=ODE_TOLERANCE
    ),
    # transformer autoregressive (TarFlow)
    "patchify": Case(lambda: flows.Patchify((2, 4, 4), 2), (2, 4, 4)),
    "unpatchify": Case(lambda: flows.Inverse(flows.Patchify((2, 4, 4), 2)), (4, 8)),
    "transformer-autoregressive": Case(lambda: flows.TransformerAutoregressive(3, 4, 8, 1, 2), (4, 3)),
    "transformer-autoregressive-reversed-context": Case(
        lambda: flows.TransformerAutoregressive(3, 4, 8, 1, 2, context_features=2, order="reversed"), (4, 3), 2
    ),
    # any map through the families' own classes
    "coupling-custom-map": Case(lambda: flows.Coupling(4, mlp, flows.AffineMap("sigmoid"), "checkerboard"), (4,)),
    "autoregressive-additive-map": Case(lambda: flows.Autoregressive(4, flows.AdditiveMap(), 8), (4,)),
}


# Ready models: every preset of every model, built small. Image presets run on two image
# shapes (levels in [0, K)), vector presets on two vector shapes (one with context) whose
# entries reach both the splines' interval and their identity tails.
SMALL: dict[str, dict] = {
    "nice": dict(num_steps=2, hidden_features=8, num_blocks=0),
    "realnvp": dict(num_scales=2, num_steps=2, hidden_features=4, num_blocks=0),
    "glow": dict(num_scales=2, num_steps=1, hidden_features=4, num_blocks=0),
    "maf": dict(num_steps=2, hidden_features=8, num_blocks=1),
    # One scale and 4 channels for images: noise on conv conditioners gives extreme spline
    # bins, and the round trip of deeper perturbed stacks loses more than 1e-7 to round-off.
    # Dropout off: a random mask makes every call a different map (tests/models/test_nsf.py
    # checks the dropout presets in eval mode).
    "nsf": dict(num_scales=1, num_steps=2, hidden_features=4, num_blocks=1, dropout=0.0),
    "residual": dict(num_scales=2, num_steps=1, hidden_features=4, num_blocks=0, logdet_mode="exact"),
    "tarflow": dict(patch_size=2, hidden_features=8, num_steps=2, num_blocks=1, num_heads=2),
    # One block, exact trace, the solver at 1e-8 (its errors: see ODE_TOLERANCE).
    "ffjord": dict(num_steps=1, hidden_features=4, num_blocks=0, time=0.5, logdet_mode="exact", **SOLVER),
}
# Vector presets: MLP / MADE conditioners wider than image ones (4 ReLU units are often all
# off for a batch, and then a parameter legitimately gets no gradient).
SMALL_VECTOR: dict[str, dict] = {name: {**sizes, "hidden_features": 8} for name, sizes in SMALL.items()}
VECTOR_PRESETS = {"toy2d", "small", "power", "gas", "hepmass", "miniboone", "bsds300"}
IMAGE_SHAPES = [((1, 4, 4), 17, 0), ((3, 4, 4), 256, 2)]
# FFJORD flattens images into one ODE: its exact trace and the oracle's Jacobian through the
# solver cost ~D^2, so 2x2 images take its image path (preprocessing, flatten and back).
SMALL_IMAGE_SHAPES = {"ffjord": [((1, 2, 2), 17, 0), ((2, 2, 2), 256, 2)]}
VECTOR_SHAPES = [((3,), 0), ((4,), 3)]  # D >= 3: `across_tails` leaves an entry inside


def levels_in(num_levels: int) -> Callable[[int, tuple[int, ...]], torch.Tensor]:
    """Dequantized levels, uniform in ``[0, K)``: what an image model takes."""
    return lambda batch, shape: torch.rand(batch, *shape) * num_levels


def across_tails(batch: int, shape: tuple[int, ...], bound: float = 3.0) -> torch.Tensor:
    """Vectors with entries inside ``[-bound, bound]`` and two outside it, in rows of sizes
    1, 0.3 and 3 (cycling): the small ones stay inside the splines' interval after the
    first linear map, the large ones reach the tails."""
    x = torch.rand(batch, *shape) * 1.6 * bound - 0.8 * bound
    x[:, 0], x[:, -1] = 1.5 * bound, -2.0 * bound
    return x * torch.tensor([1.0, 0.3, 3.0]).repeat(batch)[:batch, None]


def _model_transform(name: str, preset: str, shape, num_levels, context: int, extra: dict) -> flows.Flow:
    sizes = SMALL[name] if len(shape) == 3 else SMALL_VECTOR[name]
    return models.build_model(name, preset, shape, num_levels, context_features=context, **sizes, **extra).transform


def _model_cases() -> dict[str, Case]:
    cases: dict[str, Case] = {}
    for name in SMALL:
        for preset in models.MODELS[name].PRESETS:
            variants = [{}] if name != "nsf" or preset not in VECTOR_PRESETS else [
                {"variant": "coupling"}, {"variant": "autoregressive"}]
            if preset in VECTOR_PRESETS:
                shapes = [(shape, None, context) for shape, context in VECTOR_SHAPES]
            else:
                shapes = SMALL_IMAGE_SHAPES.get(name, IMAGE_SHAPES)
            for extra in variants:
                for shape, levels, context in shapes:
                    case_id = "-".join(
                        ["model", name, preset, *extra.values(), "x".join(map(str, shape))] + (["ctx"] if context else [])
                    )
                    make = partial(_model_transform, name, preset, shape, levels, context, extra)
                    # Spline models see both their interval and their identity tails.
                    inputs = levels_in(levels) if levels is not None else across_tails if name == "nsf" else None
                    tolerance = ODE_TOLERANCE if name == "ffjord" else None
                    cases[case_id] = Case(make, shape, context, inputs, perturb_std=0.2, tolerance=tolerance)
    return cases


MODEL_CASES = _model_cases()
CASES: dict[str, Case] = {**LAYERS, **MODEL_CASES}


def perturb(module: torch.nn.Module, std: float = 0.3, where: Callable[[str], bool] | None = None) -> None:
    """Adds N(0, std^2) noise to every parameter (those whose name ``where`` accepts), so
    identity-initialized layers (zero last layers) cannot pass a check by being the identity.

    The noise is the same for every kind of parameter: an LU-factored 1x1 convolution
    stays invertible under it (its determinant is ``prod exp(log_s)``, never 0), though
    its condition number grows with ``std``.
    """
    with torch.no_grad():
        for name, p in module.named_parameters():
            if where is None or where(name):
                p.add_(torch.randn_like(p) * std)
