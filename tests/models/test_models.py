"""Tests of the ready models (models/density.py, nice.py, realnvp.py, glow.py, multiscale.py,
build_model): the DensityModel API, rebuilding from ``config`` and the error messages.

Every preset of every model also goes through the oracle with every layer, from the one
registry (tests/registry.py, run by tests/flows/test_contract.py).
"""

from __future__ import annotations

import json

import pytest
import torch

import flows
from models import MODELS, DensityModel, Glow, build_model
from models.multiscale import multiscale
from tests.registry import MODEL_CASES, SMALL, perturb

def _data(batch: int, shape: tuple[int, ...], num_levels: int | None) -> torch.Tensor:
    """Dequantised levels in [0, K) for image models, standard normal vectors otherwise."""
    if num_levels is None:
        return torch.randn(batch, *shape)
    return torch.rand(batch, *shape) * num_levels


def _small_model(name: str, preset: str, shape, num_levels, context: int = 0) -> DensityModel:
    """A small float64 model, ActNorm initialized on data, then every parameter perturbed."""
    model = build_model(name, preset, shape, num_levels, context_features=context, **SMALL[name]).double()
    ctx = torch.randn(8, context) if context else None
    model.transform(_data(8, shape, num_levels), ctx)  # ActNorm's data-dependent init
    perturb(model, 0.2)
    return model


def test_every_model_and_preset_is_in_the_registry() -> None:
    assert set(SMALL) == set(MODELS)
    for name, cls in MODELS.items():
        assert cls.name == name
        for preset in cls.PRESETS:
            assert any(case.startswith(f"model-{name}-{preset}-") for case in MODEL_CASES), (name, preset)


def test_multiscale_matches_its_description() -> None:
    """Glow's shape: squeeze, steps, split around the next scale, unsqueeze; RealNVP's last
    scale has no squeeze."""
    steps = lambda c: [flows.ActNorm(c)]  # noqa: E731
    body = multiscale(1, 2, steps, prior_net=flows.nets.ZeroConv)
    kinds = [type(layer).__name__ for layer in body]
    assert kinds == ["Squeeze", "ActNorm", "Split", "InverseFlow"]
    assert body[1].features == 4 and body[2].kept == 2 and body[2].prior is not None
    inner = [type(layer).__name__ for layer in body[2].flow]
    assert inner == ["Squeeze", "ActNorm", "InverseFlow"] and body[2].flow[1].features == 8
    flat = multiscale(1, 1, steps, unsqueezed=lambda c, last: [flows.Reverse(c)] * (1 + last), squeeze_last=False)
    assert [type(layer).__name__ for layer in flat] == ["Reverse", "Reverse"]


@pytest.mark.parametrize(("name", "shape", "num_levels"), [
    ("nice", (1, 4, 4), 17), ("realnvp", (3, 4, 4), 256), ("glow", (1, 4, 4), 17), ("glow", (5,), None),
])
def test_density_api(name, shape, num_levels) -> None:
    model = _small_model(name, "toy2d" if len(shape) == 1 else "digits", shape, num_levels)
    x = _data(4, shape, num_levels)
    z, logdet = model.transform(x)
    assert z.shape == x.shape and model.in_shape == shape and model.num_levels == num_levels
    log_p_base, parts_logdet = model.log_prob_parts(x)
    torch.testing.assert_close(log_p_base, model.base.log_prob(z))
    torch.testing.assert_close(parts_logdet, logdet)
    torch.testing.assert_close(model.log_prob(x), model.base.log_prob(z) + logdet)
    samples = model.sample(5, temperature=0.7)
    assert samples.shape == (5, *shape) and bool(torch.isfinite(samples).all())
    cold = model.sample(2, temperature=0.0)
    torch.testing.assert_close(cold, model.transform.inverse(torch.zeros(2, *shape))[0])


def test_sample_with_context() -> None:
    model = _small_model("realnvp", "toy2d", (5,), None, context=3)
    context = torch.randn(4, 3)
    samples = model.sample(context=context)  # one per context row
    assert samples.shape == (4, 5) and bool(torch.isfinite(samples).all())
    assert model.log_prob(samples, context).shape == (4,)


def test_glow_inverse_includes_factored_out_parts() -> None:
    model = Glow((2, 8, 8), num_levels=256, num_scales=2, num_steps=2, hidden_features=4)
    x = torch.rand(3, 2, 8, 8) * 256
    model.transform(x)
    perturb(model, 0.2)
    z, _ = model.transform(x)
    # Levels up to 256 through 6 perturbed steps: 1e-8 is 4e-11 relative (measured 2e-9 here).
    torch.testing.assert_close(model.transform.inverse(z)[0], x, rtol=0, atol=1e-8)
    # The first level factors out channels 4..7 of its squeezed (8, 4, 4) tensor, which
    # unsqueeze back to every pixel of channel 1: changing them changes the sample.
    moved = z.clone()
    moved[:, 1] += 1.0
    assert not torch.allclose(model.transform.inverse(moved)[0], x)


@pytest.mark.parametrize("name", [n for n in SMALL if n != "nsf"] + ["nsf"])
def test_config_rebuilds_the_model(name: str) -> None:
    model = _small_model(name, "digits", (1, 8, 8), 17)
    # One training call after the perturbation, as training leaves a model: a spectrally
    # normalized layer updates its power iteration at the first call after a weight change.
    model.log_prob(_data(3, (1, 8, 8), 17))
    config = json.loads(json.dumps(model.config))  # as a checkpoint would store it
    rebuilt = MODELS[name](**config).double()
    rebuilt.load_state_dict(model.state_dict())
    x = _data(3, (1, 8, 8), 17)
    torch.testing.assert_close(rebuilt.log_prob(x), model.log_prob(x), rtol=0, atol=1e-10)
    assert rebuilt.config == model.config


def test_build_model_applies_preset_then_overrides() -> None:
    model = build_model("glow", "digits", (1, 8, 8), num_levels=17, hidden_features=8)
    assert model.config["hidden_features"] == 8
    assert model.config["num_steps"] == Glow.PRESETS["digits"]["num_steps"]
    assert isinstance(model, flows.FlowDistribution)


def test_build_model_errors() -> None:
    with pytest.raises(ValueError, match=r"expected a model name in .*'glow'.*got 'flow'"):
        build_model("flow", "digits", (1, 8, 8))
    with pytest.raises(ValueError, match=r"expected a glow preset in .*'digits'.*got 'cifar100'"):
        build_model("glow", "cifar100", (3, 32, 32))
    with pytest.raises(ValueError, match=r"expected glow overrides among .*got unknown \['width'\]"):
        build_model("glow", "digits", (1, 8, 8), width=3)


def test_model_argument_errors() -> None:
    with pytest.raises(ValueError, match=r"Glow expected H and W divisible by 4"):
        Glow((1, 6, 6), num_scales=2, num_steps=1, hidden_features=4)
    with pytest.raises(ValueError, match=r"expected in_shape \(D,\) or \(C, H, W\)"):
        MODELS["nice"]((4, 4))
    with pytest.raises(ValueError, match=r"num_levels expected an integer >= 2 or None, got 1"):
        MODELS["realnvp"]((1, 4, 4), num_levels=1, hidden_features=4)
    with pytest.raises(ValueError, match=r"Glow expected coupling 'affine' or 'additive', got 'spline'"):
        Glow((4,), coupling="spline")
    with pytest.raises(ValueError, match=r"RealNVP expected at least 2 features"):
        MODELS["realnvp"]((1,))
    with pytest.raises(ValueError, match=r"NICE expected at least 2 features and num_steps >= 1"):
        MODELS["nice"]((3,), num_steps=0)
