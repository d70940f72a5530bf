"""Tests of models/maf.py and models/nsf.py: the splines see their interval and their tails;
the density API; sampling; IAF in a model-like stack; dropout; the presets' sources; errors.

Every preset (both NSF variants, with and without context) goes through the oracle from
the one registry (tests/registry.py, run by tests/flows/test_contract.py).
"""

from __future__ import annotations

import json

import pytest
import torch

import flows
from flows.autoregressive import MaskedAffineAutoregressive, RQSplineAutoregressive
from flows.jacobian import check_flow
from models import MAF, MODELS, NSF, build_model
from tests.registry import SMALL_VECTOR, VECTOR_PRESETS, across_tails, perturb

D, K = 4, 3  # features, context features
SPLINES = (flows.RQSplineCoupling, RQSplineAutoregressive)


def _model(name: str, preset: str, extra: dict, context: int):
    model = build_model(name, preset, (D,), context_features=context, **SMALL_VECTOR[name], **extra).double()
    model.transform(torch.randn(16, D) * 2, torch.randn(16, context) if context else None)  # ActNorm init
    perturb(model, 0.2)
    return model


def _inputs(batch: int, bound: float) -> torch.Tensor:
    return across_tails(batch, (D,), bound)


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


@pytest.mark.parametrize("variant", ["coupling", "autoregressive"])
@pytest.mark.parametrize("preset", sorted(set(NSF.PRESETS) & VECTOR_PRESETS))
def test_splines_see_their_interval_and_their_tails(preset: str, variant: str) -> None:
    """The registry's vector inputs exercise both branches of every spline preset."""
    model = _model("nsf", preset, {"variant": variant}, 0)
    bound = model.config["tail_bound"]
    entries = torch.cat([s.flatten().abs() for s in _spline_inputs(model, _inputs(3, bound), None)])
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
    samples = model.sample(context=context)  # one per context row
    assert samples.shape == (4, D) and bool(torch.isfinite(samples).all())
    z, _ = model.transform(samples, context)
    torch.testing.assert_close(model.transform.inverse(z, context)[0], samples, rtol=1e-9, atol=1e-9)
    cold = model.sample(context=context, temperature=0.0)
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
    perturb(iaf, 0.2)
    for batch in (1, 3):
        ctx = torch.randn(batch, context) if context else None
        check_flow(iaf, torch.randn(batch, D) * 2, ctx)
    # IAF's forward is its MAF's inverse: D passes for the density, one to sample.
    maf = iaf[1].flow
    x, ctx = torch.randn(3, D), torch.randn(3, context) if context else None
    torch.testing.assert_close(iaf[1](x, ctx)[0], maf.inverse(x, ctx)[0])


def test_maf_reverses_the_order_between_layers_and_follows_with_actnorm() -> None:
    model = MAF((D,), num_steps=3, hidden_features=8)
    layers = list(model.transform)
    mades = [layer.made for layer in layers if isinstance(layer, MaskedAffineAutoregressive)]
    assert [m.degrees.tolist()[0] for m in mades] == [1, D, 1]
    assert [type(layer).__name__ for layer in layers[:2]] == ["MaskedAffineAutoregressive", "ActNorm"]


def test_nsf_steps_are_linear_then_spline_with_a_final_linear_map() -> None:
    model = NSF((D,), num_steps=2, hidden_features=8, variant="autoregressive")
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
    assert {MAF.PRESETS[name]["num_steps"] for name in hidden} == {5}
    # arXiv:1906.04032, appendix B: steps, residual blocks, hidden features, bins, dropout.
    table = {
        "power": (10, 2, 256, 8, 0.0), "gas": (10, 2, 256, 8, 0.1), "hepmass": (20, 1, 128, 8, 0.2),
        "miniboone": (10, 1, 32, 4, 0.2), "bsds300": (20, 1, 128, 8, 0.2),
    }
    keys = ("num_steps", "num_blocks", "hidden_features", "num_bins", "dropout")
    for name, row in table.items():
        model = NSF((D,), **NSF.PRESETS[name])
        assert tuple(model.config[k] for k in keys) == row, name
        assert model.config["residual"] and model.config["tail_bound"] == 3.0  # B = 3, section 5


def test_dropout_presets_are_a_flow_in_eval_mode_and_random_in_training() -> None:
    model = build_model("nsf", "gas", (D,), hidden_features=8, num_steps=2).double()
    perturb(model, 0.2)  # the conditioners' last layers start at zero, which hides any dropout
    x = _inputs(3, 3.0)
    model.train()
    assert not torch.equal(model.log_prob(x), model.log_prob(x)), "dropout should randomize training calls"
    model.eval()
    torch.testing.assert_close(model.log_prob(x), model.log_prob(x), rtol=0, atol=0)
    check_flow(model.transform, x)


def test_model_argument_errors() -> None:
    with pytest.raises(ValueError, match=r"MAF expected num_steps >= 1, got 0"):
        MAF((D,), num_steps=0)
    with pytest.raises(ValueError, match=r"NSF expected variant 'coupling' or 'autoregressive', got 'spline'"):
        NSF((D,), variant="spline")
    with pytest.raises(ValueError, match=r"NSF expected at least 2 features for variant 'coupling', got .*\(1,\)"):
        NSF((1,))
    with pytest.raises(ValueError, match=r"NSF expected variant 'coupling' for images, got 'autoregressive'"):
        NSF((1, 8, 8), variant="autoregressive", num_scales=2)
    with pytest.raises(ValueError, match=r"NSF expected num_bins >= 1 and tail_bound > 0, got 0 and 3.0"):
        NSF((D,), num_bins=0)
    with pytest.raises(ValueError, match=r"NSF expected num_steps >= 1, num_blocks >= 0 and num_scales >= 1, got 0"):
        NSF((D,), num_steps=0)
    with pytest.raises(ValueError, match=r"NSF expected H and W divisible by 8"):
        NSF((1, 4, 4))
    NSF((1,), variant="autoregressive", num_steps=1, hidden_features=4)  # 1-D data: autoregressive works
