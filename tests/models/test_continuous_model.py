"""Tests of models/continuous.py (FFJORD): presets, rebuilding from ``config``, the oracle on
its transform (vectors with context and images), the density API, RNODE and NFE, errors.

The oracle checks run the solver at atol = rtol = 1e-8 and compare at 1e-6: the log-det
and the round trip are exact only to the solver's global error (see
tests/flows/test_continuous.py, which measures it).
"""

from __future__ import annotations

import pytest
import torch

import flows
from flows.continuous import ContinuousFlow, function_evaluations, regularization
from flows.jacobian import check_flow
from models.continuous import FFJORD
from tests.registry import perturb

TABULAR_FEATURES = {"power": 6, "gas": 8, "hepmass": 21, "miniboone": 43, "bsds300": 63}
SMALL = dict(hidden_features=8, num_blocks=1, atol=1e-8, rtol=1e-8)


def small_model(shape, num_levels=None, context=0, **kwargs) -> FFJORD:
    torch.manual_seed(1)
    model = FFJORD(shape, num_levels, context_features=context, **{**SMALL, **kwargs}).double()
    perturb(model, 0.3)
    return model


@pytest.mark.parametrize("preset", sorted(FFJORD.PRESETS))
def test_presets_build_with_their_sizes(preset: str) -> None:
    shape, levels = ((TABULAR_FEATURES[preset],), None) if preset in TABULAR_FEATURES else (
        ((2,), None) if preset == "toy2d" else ((1, 8, 8), 17))
    sizes = FFJORD.PRESETS[preset]
    model = FFJORD(shape, levels, **sizes)
    blocks = [m for m in model.modules() if isinstance(m, ContinuousFlow)]
    assert len(blocks) == sizes["num_steps"]
    first = blocks[0].dynamics.layers[0].linear
    assert first.in_features == model.base.event_shape.numel() and first.out_features == sizes["hidden_features"]
    assert len(blocks[0].dynamics.layers) == sizes["num_blocks"] + 2
    assert {b.logdet_mode for b in blocks} == {sizes.get("logdet_mode", "exact")}


def test_config_rebuilds_the_model() -> None:
    model = small_model((3,), context=2, num_steps=2)
    rebuilt = type(model)(**model.config).double()
    rebuilt.load_state_dict(model.state_dict())
    x, context = torch.randn(4, 3), torch.randn(4, 2)
    torch.testing.assert_close(rebuilt.log_prob(x, context), model.log_prob(x, context), rtol=0, atol=0)


@pytest.mark.parametrize(("shape", "num_levels", "context"), [((3,), None, 2), ((1, 4, 4), 17, 0)])
def test_transform_passes_the_oracle(shape, num_levels, context) -> None:
    model = small_model(shape, num_levels, context, num_steps=2)
    x = torch.rand(2, *shape) * num_levels if num_levels else torch.randn(2, *shape)
    ctx = torch.randn(2, context) if context else None
    check_flow(model.transform, x, ctx, atol=1e-6, rtol=1e-6)


def test_density_api() -> None:
    model = small_model((2,), atol=1e-6, rtol=1e-6)
    x = torch.randn(5, 2)
    z, logdet = model.transform(x)
    torch.testing.assert_close(model.log_prob(x), model.base.log_prob(z) + logdet)
    samples = model.sample(3, temperature=0.5)
    assert samples.shape == (3, 2) and bool(torch.isfinite(samples).all())
    torch.testing.assert_close(model.sample(2, temperature=0.0), model.transform.inverse(torch.zeros(2, 2))[0])


def test_estimate_mode_agrees_with_exact_mode_on_average() -> None:
    """A loose sanity check of the model's wiring (the layer's tests hold the z-test)."""
    model = small_model((2,), atol=1e-6, rtol=1e-6)
    x = torch.randn(2, 2)
    exact = model.log_prob(x)
    with flows.logdet_mode(model, "estimate"), torch.no_grad():
        estimates = model.log_prob(x.repeat(2000, 1)).reshape(2000, 2)
    stderr = estimates.std(0) / 2000**0.5
    assert bool(((estimates.mean(0) - exact).abs() < 6 * stderr + 1e-6).all())


def test_rnode_and_nfe_reach_the_training_loop() -> None:
    model = small_model((2,), num_steps=2, kinetic_energy=0.1, jacobian_norm=0.1)
    loss = -model.log_prob(torch.randn(4, 2)).mean()
    penalty = regularization(model)
    assert penalty.shape == (4,) and bool((penalty > 0).all())
    (loss + penalty.mean()).backward()
    counts = function_evaluations(model)
    assert counts["forward"] > 0 and counts["backward"] == 0
    assert regularization(small_model((2,))) is None


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(in_shape=(2,), num_steps=0), r"FFJORD expected num_steps >= 1, got 0"),
    (dict(in_shape=(0,)), r"FFJORD expected in_shape \(D,\) or \(C, H, W\) of positive sizes, got \(0,\)"),
    (dict(in_shape=(2,), activation="relu"), r"activation must be one of \['softplus', 'tanh'\], got 'relu'"),
    (dict(in_shape=(2,), logdet_mode="gradient"), r"logdet_mode must be one of \('exact', 'estimate'\)"),
])
def test_bad_arguments(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        FFJORD(**kwargs)
