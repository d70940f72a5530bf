"""ResidualFlow (models/residual.py): presets, the oracle on its transform in exact mode, the
statistical oracle in estimate mode, exact evaluation, rebuilding from ``config``, errors."""

from __future__ import annotations

import pytest
import torch

import flows
from flows.jacobian import check_flow
from flows.residual import Residual
from flows.statistical import check_estimator
from models.residual import ResidualFlow
from tests.registry import perturb


pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(num_scales=2, num_steps=2, hidden_features=8, num_blocks=0)
SHAPES = [((3,), None, 0), ((4,), None, 3), ((1, 4, 4), 17, 0), ((3, 4, 4), 256, 2)]


def small_model(shape, levels, context, **options) -> tuple[ResidualFlow, torch.Tensor, torch.Tensor | None]:
    torch.manual_seed(0)
    model = ResidualFlow(shape, levels, context_features=context, **{**SMALL, "logdet_mode": "exact", **options})
    model = model.double()
    x = torch.rand(3, *shape) * levels if levels else torch.randn(3, *shape)
    ctx = torch.randn(3, context) if context else None
    model.transform(x, ctx)  # ActNorm's initialization
    perturb(model, 0.2)
    return model, x, ctx


@pytest.mark.parametrize(("shape", "levels", "context"), SHAPES)
def test_transform_passes_the_oracle_in_exact_mode(shape, levels, context) -> None:
    model, x, ctx = small_model(shape, levels, context)
    check_flow(model.transform, x, ctx)


def test_estimate_mode_is_unbiased_for_the_whole_model() -> None:
    model, x, ctx = small_model((4,), None, 3, logdet_mode="estimate")
    check_estimator(model.transform, x, ctx, num_draws=100)


def test_exact_evaluation_of_an_estimate_mode_model() -> None:
    model, x, ctx = small_model((3,), None, 0, logdet_mode="estimate")
    with flows.logdet_mode(model, "exact"):
        exact = model.log_prob(x)
        assert torch.equal(model.log_prob(x), exact)
    assert all(m.logdet_mode == "estimate" for m in model.modules() if isinstance(m, Residual))
    with torch.no_grad():
        draws = torch.stack([model.log_prob(x) for _ in range(400)])
    assert ((draws.mean(0) - exact).abs() < 5 * draws.std(0) / 20).all()


@pytest.mark.parametrize("preset", sorted(ResidualFlow.PRESETS))
def test_presets_build_and_rebuild_from_config(preset: str) -> None:
    shape, levels = ((1, 8, 8), 17) if preset == "digits" else ((6,), None)
    sizes = {} if preset == "toy2d" else dict(hidden_features=8, num_steps=1)
    model = ResidualFlow(shape, levels, **{**ResidualFlow.PRESETS[preset], **sizes})
    rebuilt = ResidualFlow(**model.config)
    rebuilt.load_state_dict(model.state_dict())
    x = torch.rand(2, *shape) * levels if levels else torch.randn(2, *shape)
    with flows.logdet_mode(model, "exact"), flows.logdet_mode(rebuilt, "exact"):
        torch.testing.assert_close(rebuilt.log_prob(x), model.log_prob(x))
    assert model.sample(2).shape == (2, *shape)


def test_image_levels_see_their_own_sizes() -> None:
    model = ResidualFlow((1, 8, 8), 17, num_scales=2, num_steps=1, hidden_features=4)
    sizes = {m.features: m.convs[0].image_size for m in model.modules() if hasattr(m, "convs")}
    assert sizes == {4: (4, 4), 8: (2, 2)}


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="ResidualFlow expected num_scales >= 1 and num_steps >= 1, got 2 and 0"):
        ResidualFlow((2,), num_steps=0)
    with pytest.raises(ValueError, match=r"ResidualFlow expected H and W divisible by 4 .*got in_shape \(1, 6, 6\)"):
        ResidualFlow((1, 6, 6), 17, num_scales=2)
    with pytest.raises(ValueError, match=r"coefficient must be in \(0, 1\) .*got 1.2"):
        ResidualFlow((2,), coefficient=1.2)
