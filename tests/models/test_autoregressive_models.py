"""Tests of models/maf.py and models/nsf.py: every preset, built small and perturbed, through
the oracle in float64 on vectors, with and without context, on inputs inside and outside
the splines' interval; the density API; sampling; IAF in a model-like stack; errors."""

from __future__ import annotations

import json

import pytest
import torch

import flows
from flows.autoregressive import MaskedAffineAutoregressive, RQSplineAutoregressive
from flows.jacobian import check_flow
from models import MAF, MODELS, NSF, build_model

D, K = 4, 3  # features, context features
SMALL = {
    "maf": dict(num_layers=2, hidden_features=8, num_blocks=1),
    "nsf": dict(num_layers=2, hidden_features=8, num_blocks=1),
}
SPLINES = (flows.RQSplineCoupling, RQSplineAutoregressive)


def _cases() -> list:
    cases = []
    for preset in MAF.PRESETS:
        cases += [pytest.param("maf", preset, {}, ctx, id=f"maf-{preset}-ctx{ctx}") for ctx in (0, K)]
    for preset in NSF.PRESETS:
        for variant in ("coupling", "autoregressive"):
            cases += [
                pytest.param("nsf", preset, {"variant": variant}, ctx, id=f"nsf-{preset}-{variant}-ctx{ctx}")
                for ctx in (0, K)
            ]
    return cases


def _perturb(module: torch.nn.Module, std: float = 0.2) -> None:
    """N(0, std) on every parameter: zero-initialised layers must not pass as the identity."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * std)


def _model(name: str, preset: str, extra: dict, context: int):
    model = build_model(name, preset, (D,), context_features=context, **SMALL[name], **extra).double()
    model.transform(torch.randn(16, D) * 2, torch.randn(16, context) if context else None)  # ActNorm init
    _perturb(model)
    return model


def _inputs(batch: int, bound: float) -> torch.Tensor:
    """Samples of sizes 1, 0.3 and 3 (cycling) times a row with entries inside
    ``[-bound, bound]`` and two outside it: the small ones stay inside the splines'
    interval after the first linear map, the large ones reach the tails."""
    x = torch.rand(batch, D) * 1.6 * bound - 0.8 * bound
    x[:, 0], x[:, -1] = 1.5 * bound, -2.0 * bound
    return x * torch.tensor([1.0, 0.3, 3.0]).repeat(batch)[:batch, None]


def _spline_inputs(model, x: torch.Tensor, context) -> list[torch.Tensor]:
    """The entries each spline layer transforms, for one forward pass of ``x``."""
    seen: list[torch.Tensor] = []

    def record(layer, args, _output) -> None:
        inputs = args[0].detach()
        if isinstance(layer, flows.RQSplineCoupling):
            inputs = inputs[:, layer.transformed_entries(tuple(inputs.shape[1:]))]
        seen.append(inputs)

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, SPLINES)]
    with torch.no_grad():
        model.transform(x, context)
    for hook in hooks:
        hook.remove()
    return seen


@pytest.mark.parametrize(("name", "preset", "extra", "context"), _cases())
def test_every_preset_passes_the_oracle(name, preset, extra, context) -> None:
    model = _model(name, preset, extra, context)
    bound = model.config.get("tail_bound", 3.0)
    entries = []
    for batch in (1, 3):
        ctx = torch.randn(batch, context) if context else None
        x = _inputs(batch, bound)
        entries += [s.flatten().abs() for s in _spline_inputs(model, x, ctx)]
        check_flow(model.transform, x, ctx)
    if name == "nsf":  # the splines saw both their interval and their identity tails
        entries = torch.cat(entries)
        assert bool((entries > bound).any()) and bool((entries < bound).any())


@pytest.mark.parametrize(("name", "extra"), [("maf", {}), ("nsf", {"variant": "coupling"}),
                                             ("nsf", {"variant": "autoregressive"})])
def test_density_api_and_sampling(name, extra) -> None:
    model = _model(name, "small", extra, K)
    context = torch.randn(4, K)
    x = _inputs(4, 3.0)
    z, logdet = model.transform(x, context)
    torch.testing.assert_close(model.log_prob(x, context), model.base.log_prob(z) + logdet)
    log_p_base, parts_logdet = model.log_prob_parts(x, context)
    torch.testing.assert_close(log_p_base + parts_logdet, model.log_prob(x, context))
    samples = model.sample(4, context=context)
    assert samples.shape == (4, D) and bool(torch.isfinite(samples).all())
    z, _ = model.transform(samples, context)
    torch.testing.assert_close(model.transform.inverse(z, context)[0], samples, rtol=1e-9, atol=1e-9)
    cold = model.sample(4, context=context, temperature=0.0)
    torch.testing.assert_close(cold, model.transform.inverse(torch.zeros(4, D), context)[0])


@pytest.mark.parametrize("context", [0, K])
def test_iaf_in_a_model_like_stack(context) -> None:
    iaf = flows.Sequential(
        flows.ActNorm(D),
        flows.Inverse(MaskedAffineAutoregressive(D, 8, order="natural", context_features=context)),
        flows.Reverse(),
        flows.Inverse(MaskedAffineAutoregressive(D, 8, order="reversed", context_features=context)),
        flows.InvConv1x1(D),
    ).double()
    iaf(torch.randn(16, D), torch.randn(16, context) if context else None)
    _perturb(iaf)
    for batch in (1, 3):
        ctx = torch.randn(batch, context) if context else None
        check_flow(iaf, torch.randn(batch, D) * 2, ctx)
    # IAF's forward is its MAF's inverse: D passes for the density, one to sample.
    maf = iaf[1].flow
    x, ctx = torch.randn(3, D), torch.randn(3, context) if context else None
    torch.testing.assert_close(iaf[1](x, ctx)[0], maf.inverse(x, ctx)[0])


def test_maf_reverses_the_order_between_layers_and_follows_with_actnorm() -> None:
    model = MAF((D,), num_layers=3, hidden_features=8)
    layers = list(model.transform)
    mades = [layer.made for layer in layers if isinstance(layer, MaskedAffineAutoregressive)]
    assert [m.degrees.tolist()[0] for m in mades] == [1, D, 1]
    assert [type(layer).__name__ for layer in layers[:2]] == ["MaskedAffineAutoregressive", "ActNorm"]


def test_nsf_steps_are_linear_then_spline_with_a_final_linear_map() -> None:
    model = NSF((D,), num_layers=2, hidden_features=8, variant="autoregressive")
    kinds = [type(layer).__name__ for layer in model.transform[0]]  # no preprocessing for vectors
    assert kinds == ["InvConv1x1", "RQSplineAutoregressive", "InvConv1x1", "RQSplineAutoregressive", "InvConv1x1"]


def test_gradients_reach_every_parameter() -> None:
    for model in (_model("maf", "small", {}, K), _model("nsf", "small", {}, K)):
        loss = -model.log_prob(torch.randn(6, D), torch.randn(6, K)).mean()  # inside the splines
        loss.backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
        assert not missing


@pytest.mark.parametrize("variant", ["coupling", "autoregressive"])
def test_config_rebuilds_a_vector_model(variant) -> None:
    model = _model("nsf", "small", {"variant": variant}, 0)
    rebuilt = MODELS["nsf"](**json.loads(json.dumps(model.config))).double()
    rebuilt.load_state_dict(model.state_dict())
    x = _inputs(3, 3.0)
    torch.testing.assert_close(rebuilt.log_prob(x), model.log_prob(x), rtol=0, atol=1e-10)


def test_presets_follow_their_sources() -> None:
    # gpapamak/maf run_experiments.py: MAF (5); 100 units for POWER and GAS, 512 otherwise.
    tabular = ("power", "gas", "hepmass", "miniboone", "bsds300")
    hidden = {name: MAF.PRESETS[name]["hidden_features"] for name in tabular}
    assert hidden == {"power": 100, "gas": 100, "hepmass": 512, "miniboone": 512, "bsds300": 512}
    assert {MAF.PRESETS[name]["num_layers"] for name in hidden} == {5}
    # arXiv:1906.04032: B = 3 throughout the tabular experiments.
    assert {NSF.PRESETS[name]["tail_bound"] for name in hidden} == {3.0}


def test_model_argument_errors() -> None:
    with pytest.raises(ValueError, match=r"MAF expected num_layers >= 1, got 0"):
        MAF((D,), num_layers=0)
    with pytest.raises(ValueError, match=r"NSF expected variant 'coupling' or 'autoregressive', got 'spline'"):
        NSF((D,), variant="spline")
    with pytest.raises(ValueError, match=r"NSF expected at least 2 features for variant 'coupling', got .*\(1,\)"):
        NSF((1,))
    with pytest.raises(ValueError, match=r"NSF expected variant 'coupling' for images, got 'autoregressive'"):
        NSF((1, 8, 8), variant="autoregressive", num_scales=2)
    with pytest.raises(ValueError, match=r"NSF expected num_bins >= 1 and tail_bound > 0, got 0 and 3.0"):
        NSF((D,), num_bins=0)
    with pytest.raises(ValueError, match=r"NSF expected num_layers >= 1, num_blocks >= 0 and num_scales >= 1, got 0"):
        NSF((D,), num_layers=0)
    with pytest.raises(ValueError, match=r"NSF expected H and W divisible by 8"):
        NSF((1, 4, 4))
    NSF((1,), variant="autoregressive", num_layers=1, hidden_features=4)  # 1-D data: autoregressive works
