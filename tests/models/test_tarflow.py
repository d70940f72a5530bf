"""Tests of models/tarflow.py: the oracle on small models, the architecture, the density
reported, the training recipe (noise augmentation, context dropout), the denoising step,
sampling with the fixed-point samplers and with guidance, rebuilding, and the errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

import flows
from flows.jacobian import check_flow
from flows.transformer import FixedPoint, Patchify, TransformerAutoregressive
from models.tarflow import TarFlow
from tests.registry import perturb

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

SMALL = dict(patch_size=2, hidden_features=8, num_steps=2, num_blocks=1, num_heads=2)
LEVELS = 17


def _model(shape=(1, 4, 4), levels: int | None = LEVELS, context: int = 0, std: float = 0.2, **overrides) -> TarFlow:
    torch.manual_seed(1)
    model = TarFlow(shape, levels, context_features=context, **{**SMALL, **overrides})
    perturb(model, std)
    return model


def _levels(batch: int, shape=(1, 4, 4)) -> torch.Tensor:
    return torch.rand(batch, *shape) * LEVELS


@pytest.mark.parametrize(("shape", "levels", "context"), [((1, 4, 4), LEVELS, 0), ((3, 4, 4), 256, 2), ((3,), None, 3)])
def test_oracle(shape, levels, context) -> None:
    model = _model(shape, levels, context, **({"patch_size": 1} if len(shape) == 1 else {}))
    x = torch.rand(3, *shape) * levels if levels else torch.randn(3, *shape)
    check_flow(model.transform, x, torch.randn(3, context) if context else None)


def test_architecture() -> None:
    model = TarFlow((3, 8, 4), 256, patch_size=2, hidden_features=8, num_steps=3, num_blocks=1, num_heads=2)
    layers = list(model.transform)
    assert isinstance(layers[0], flows.ScalarAffine) and (layers[0].scale, layers[0].shift) == (2 / 256, -1.0)
    assert isinstance(layers[1], Patchify) and (layers[1].num_patches, layers[1].patch_features) == (8, 12)
    blocks = layers[2:-1]
    assert [b.order for b in blocks] == ["natural", "reversed", "natural"]
    assert all(isinstance(b, TransformerAutoregressive) and len(b.conditioner.layers) == 1 for b in blocks)
    assert isinstance(layers[-1], flows.InverseFlow) and layers[-1].flow is layers[1]
    assert model.transform.iterative_inverse


def test_every_parameter_gets_a_gradient() -> None:
    model = _model(context=2)
    model.log_prob(_levels(16), torch.randn(16, 2)).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_density_of_a_new_model_is_the_scaled_gaussian() -> None:
    """New blocks are the identity: log p(v) = log N(2v/K - 1; 0, I) + D log(2/K), in level units."""
    model = TarFlow((1, 4, 4), LEVELS, **SMALL)
    v = _levels(5)
    u = 2 * v / LEVELS - 1
    expected = (-0.5 * u**2 - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1) + 16 * math.log(2 / LEVELS)
    torch.testing.assert_close(model.log_prob(v), expected)


def test_augment_adds_the_papers_noise_in_level_units_and_drops_context_rows() -> None:
    model = TarFlow((1, 4, 4), LEVELS, noise_std=0.05, context_dropout=0.25, context_features=3, **SMALL)
    assert model.noise_scale == pytest.approx(0.05 * LEVELS / 2)  # sigma in [-1, 1] units, as the paper's
    x, context = torch.zeros(4000, 1, 4, 4), torch.ones(4000, 3)
    noisy, dropped = model.augment(x, context)
    assert float(noisy.std()) == pytest.approx(model.noise_scale, rel=0.02)
    kept = dropped.sum(1) / 3
    assert set(kept.unique().tolist()) == {0.0, 1.0}  # whole rows, zeroed or intact
    assert float(1 - kept.mean()) == pytest.approx(0.25, abs=0.03)
    clean = TarFlow((1, 4, 4), LEVELS, context_features=3, **SMALL)
    same_x, same_context = clean.augment(x, context)
    assert same_x is x and same_context is context


def test_denoise_is_a_tweedie_step_with_the_models_score() -> None:
    model = TarFlow((1, 4, 4), LEVELS, noise_std=0.1, **SMALL)  # identity blocks: a known Gaussian density
    v = _levels(3)
    score = -(2 * v / LEVELS - 1) * (2 / LEVELS)
    torch.testing.assert_close(model.denoise(v), v + model.noise_scale**2 * score)
    assert model.denoise(v).requires_grad is False
    assert TarFlow((1, 4, 4), LEVELS, **SMALL).denoise(v) is v  # no noise, nothing to remove


def test_sampling_shapes_samplers_and_denoising() -> None:
    model = _model(context=2)
    context = torch.randn(3, 2)
    torch.manual_seed(5)
    exact = model.sample(4, context)
    assert exact.shape == (4, 3, 1, 4, 4)
    torch.manual_seed(5)
    generic = flows.FlowDistribution.sample(model, 4, context)  # FlowDistribution's path through transform.inverse
    torch.testing.assert_close(exact, generic, rtol=0, atol=0)
    for fixed_point in (FixedPoint(block_size=None), FixedPoint(block_size=3)):
        torch.manual_seed(5)
        torch.testing.assert_close(model.sample(4, context, fixed_point=fixed_point), exact, rtol=0, atol=1e-10)
    noisy = _model(context=2, noise_std=0.1)
    torch.manual_seed(5)
    raw = noisy.sample(context=context)
    torch.manual_seed(5)
    torch.testing.assert_close(noisy.sample(context=context, denoise=True), noisy.denoise(raw, context))
    z = torch.randn(2, 1, 4, 4)
    assert model.invert(z, context[:2]).passes == 2 * 4  # every block: one pass per patch


def test_guidance() -> None:
    model = _model(context=2)
    context = torch.randn(3, 2)
    torch.manual_seed(5)
    plain = model.sample(2, context)
    torch.manual_seed(5)
    assert torch.equal(model.sample(2, context, guidance=0.0), plain)
    torch.manual_seed(5)
    guided = model.sample(2, context, guidance=2.0)
    assert guided.shape == plain.shape and not torch.allclose(guided, plain)
    with pytest.raises(ValueError, match="guidance=1.0 needs a class-conditional model .*got context_features=0"):
        _model().sample(2, guidance=1.0)
    with pytest.raises(ValueError, match="built with context_features=2 but got context=None"):
        model.invert(torch.randn(2, 1, 4, 4), guidance=1.0)


def test_rebuild_from_config() -> None:
    model = _model((3, 4, 4), 256, context=2, noise_std=0.05, context_dropout=0.1)
    config = json.loads(json.dumps(model.config))
    rebuilt = TarFlow(**config)
    rebuilt.load_state_dict(model.state_dict())
    x, context = torch.rand(2, 3, 4, 4) * 256, torch.randn(2, 2)
    torch.testing.assert_close(rebuilt.log_prob(x, context), model.log_prob(x, context), rtol=0, atol=0)
    assert (rebuilt.noise_std, rebuilt.context_dropout) == (0.05, 0.1)


def test_presets() -> None:
    presets = TarFlow.PRESETS
    assert presets["imagenet64"] == dict(patch_size=2, hidden_features=768, num_steps=8, num_blocks=8, noise_std=0.0)
    assert presets["imagenet64-samples"]["noise_std"] == 0.05 and presets["imagenet64-samples"]["context_dropout"] == 0.1
    for name, sizes in presets.items():
        shape = (2,) if name == "toy2d" else (3, 8, 8)
        small = {**sizes, **{k: v for k, v in SMALL.items() if k != "patch_size"}}
        model = TarFlow(shape, None if name == "toy2d" else 256, context_features=2, **small)
        x = torch.randn(2, *shape) if name == "toy2d" else torch.rand(2, *shape) * 256
        assert model.log_prob(x, torch.randn(2, 2)).shape == (2,), name


def test_errors() -> None:
    with pytest.raises(ValueError, match=r"TarFlow expected H and W divisible by 3 .*got in_shape \(1, 4, 4\)"):
        TarFlow((1, 4, 4), LEVELS, patch_size=3)
    with pytest.raises(ValueError, match="TarFlow expected num_steps >= 1, got 0"):
        TarFlow((1, 4, 4), LEVELS, num_steps=0)
    with pytest.raises(ValueError, match="expected noise_std >= 0 and context_dropout in \\[0, 1\\), got -0.1 and 0.0"):
        TarFlow((1, 4, 4), LEVELS, noise_std=-0.1)
    with pytest.raises(ValueError, match="expected noise_std >= 0 and context_dropout in \\[0, 1\\), got 0.0 and 1.0"):
        TarFlow((1, 4, 4), LEVELS, context_dropout=1.0)
