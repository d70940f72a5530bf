"""The residual layer (flows/residual.py): exact mode through the oracle, the estimators through
the statistical oracle, the fixed-point inverse, gradients, precision and error messages."""

from __future__ import annotations

import pytest
import torch

from flows.base import Sequential
from flows.freeform import logdet_mode
from flows.jacobian import check_flow
from flows.lipschitz import LipschitzConvNet, LipschitzMLP
from flows.normalization import ActNorm
from flows.residual import ConvergenceError, Residual
from flows.statistical import check_estimator, check_gradient_estimator
from tests.registry import perturb


pytestmark = pytest.mark.usefixtures("one_thread")

CASES = {
    "vector": (lambda: Residual(LipschitzMLP(3, 8)), (3,), 0),
    "vector-context": (lambda: Residual(LipschitzMLP(4, 8, num_blocks=0, context_features=2)), (4,), 2),
    "image": (lambda: Residual(LipschitzConvNet(2, 4, (3, 3))), (2, 3, 3), 0),
    "image-context": (lambda: Residual(LipschitzConvNet(2, 3, (2, 2), context_features=2)), (2, 2, 2), 2),
}


def build(name: str, batch: int = 3) -> tuple[Residual, torch.Tensor, torch.Tensor | None]:
    make, shape, context = CASES[name]
    torch.manual_seed(1)
    layer = make().double()
    perturb(layer)
    x = 1.5 * torch.randn(batch, *shape)
    return layer, x, (torch.randn(batch, context) if context else None)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("name", sorted(CASES))
def test_exact_mode_passes_the_oracle(name: str, train: bool) -> None:
    layer, x, context = build(name)
    layer(x, context)  # the power iteration catches up with the perturbed weights
    layer.train(train)
    report = check_flow(layer, x, context)
    assert report["logdet"] < 1e-10 and report["round_trip"] < 1e-8


@pytest.mark.parametrize("name", ["vector-context", "image"])
def test_estimators_pass_the_statistical_oracle(name: str) -> None:
    layer, x, context = build(name, batch=2)
    check_estimator(layer, x, context, num_draws=100)
    check_gradient_estimator(layer, x, context, num_draws=60, num_projections=2)


def test_exact_mode_gradient_is_the_gradient_of_the_exact_logdet() -> None:
    """Autograd through exact mode (what training and the gradient oracle use) against
    slogdet of the map's own Jacobian, differentiated: g's parameters and x get the gradient."""
    layer, x, context = build("vector-context")
    x.requires_grad_(True)
    params = [p for p in layer.parameters()]
    _, logdet = layer(x, context)
    ours = torch.autograd.grad(logdet.sum(), [x, *params], allow_unused=True)

    def map_one(x_one, ctx_one):
        return layer(x_one.unsqueeze(0), ctx_one.unsqueeze(0))[0].squeeze(0)

    jac = torch.func.vmap(torch.func.jacrev(map_one))(x, context)
    reference = torch.autograd.grad(torch.linalg.slogdet(jac)[1].sum(), [x, *params], allow_unused=True)
    for name, a, b in zip(["x"] + [n for n, _ in layer.named_parameters()], ours, reference):
        if b is None:
            assert a is None or a.abs().max() == 0, name
        else:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=name)
    assert ours[1].abs().sum() > 0, "no gradient reaches g through the log-det"


def test_inverse_is_differentiable_and_its_jacobian_is_the_inverse_matrix() -> None:
    layer, x, context = build("vector-context", batch=1)
    y, _ = layer(x, context)
    forward = torch.autograd.functional.jacobian(lambda v: layer(v, context)[0], x).reshape(4, 4)
    backward = torch.autograd.functional.jacobian(lambda v: layer.inverse(v, context)[0], y).reshape(4, 4)
    torch.testing.assert_close(backward @ forward, torch.eye(4), rtol=0, atol=1e-8)


def test_inverse_that_does_not_converge_says_how_far_it_got() -> None:
    layer, x, _ = build("vector")
    layer.max_iterations = 2
    y, _ = layer(x)
    message = (r"Residual.inverse did not converge in 2 iterations: sample \d still moved by .* in the last one, "
               r"from .* in the first; tolerance 1e-10\. .*Lip\(g\) <= 0\.913 .*raise max_iterations")
    with pytest.raises(ConvergenceError, match=message):
        layer.inverse(y)


def test_inverse_tolerance_is_kept() -> None:
    layer, x, _ = build("vector")
    layer.tolerance = 1e-4
    y, _ = layer(x)
    loose = (layer.inverse(y)[0] - x).abs().max()
    layer.tolerance = None
    tight = (layer.inverse(y)[0] - x).abs().max()
    assert tight < 1e-9 < loose < 1e-2


@pytest.mark.parametrize("mode", ["exact", "estimate", "gradient"])
def test_no_graph_without_grad_and_a_graph_with_it(mode: str) -> None:
    layer, x, _ = build("vector")
    layer.logdet_mode = mode
    with torch.no_grad():
        y, logdet = layer(x)
    assert not y.requires_grad and not logdet.requires_grad
    _, logdet = layer(x)
    logdet.sum().backward()
    assert layer.net.linears[0].weight.grad.abs().sum() > 0


def test_number_of_terms_follows_the_stated_distribution() -> None:
    layer = Residual(LipschitzMLP(2, 4), num_exact_terms=2, roulette_p=0.4)
    counts = torch.tensor([layer._num_terms() for _ in range(4000)], dtype=torch.float64)
    assert counts.min() == 2
    # E[n] = 2 + (1 - p) / p = 3.5; standard deviation of N is sqrt(1 - p) / p ~ 1.94
    assert abs(float(counts.mean()) - 3.5) < 4 * 1.94 / 4000**0.5
    for k in (3, 4, 5):  # P(n >= k) = 0.6 ** (k - 2): the weights' denominators
        assert abs(float((counts >= k).double().mean()) - 0.6 ** (k - 2)) < 0.03
        assert layer._weight(k) == pytest.approx(0.6 ** -(k - 2))


def test_logdet_mode_switches_every_residual_layer_of_a_stack() -> None:
    torch.manual_seed(0)
    stack = Sequential(ActNorm(2), Residual(LipschitzMLP(2, 8)), Residual(LipschitzMLP(2, 8)))
    x = torch.randn(5, 2)
    exact = stack(x)[1]
    with logdet_mode(stack, "estimate"):
        assert all(m.logdet_mode == "estimate" for m in stack if isinstance(m, Residual))
        assert not torch.equal(stack(x)[1], exact)
    assert all(m.logdet_mode == "exact" for m in stack if isinstance(m, Residual))


@pytest.mark.parametrize("mode", ["exact", "estimate"])
def test_bfloat16_autocast_keeps_the_logdet_in_float32(mode: str) -> None:
    """Under bf16 autocast g and its products run in bf16 (~3 significant digits); the
    log-det is summed and returned in float32, and stays within bf16's resolution of it."""
    torch.manual_seed(0)
    layer = Residual(LipschitzMLP(4, 16), logdet_mode=mode).float()
    x = torch.randn(64, 4, dtype=torch.float32)
    torch.manual_seed(5)
    _, reference = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(5)  # the same probes and number of terms
        _, logdet = layer(x)
    assert logdet.dtype == torch.float32
    assert (logdet - reference).abs().max() < 0.05 * (1 + reference.abs().max())


def test_bad_arguments_and_inputs() -> None:
    with pytest.raises(TypeError, match=r"Residual expects a flows.lipschitz.LipschitzNet .*got Linear"):
        Residual(torch.nn.Linear(2, 2))
    net = LipschitzMLP(3, 4, context_features=2)
    for options, message in [
        ({"num_exact_terms": -1}, r"num_exact_terms must be an integer >= 0, got -1"),
        ({"roulette_p": 1.0}, r"roulette_p must be in \(0, 1\), got 1.0"),
        ({"probe": "uniform"}, r"probe must be 'rademacher' or 'gaussian', got 'uniform'"),
        ({"tolerance": 0.0}, r"tolerance must be > 0, got 0.0"),
        ({"max_iterations": 0}, r"max_iterations must be an integer >= 1, got 0"),
        ({"logdet_mode": "fast"}, r"logdet_mode must be one of \('exact', 'estimate', 'gradient'\), got 'fast'"),
    ]:
        with pytest.raises(ValueError, match=message):
            Residual(net, **options)
    layer = Residual(net)
    with pytest.raises(ValueError, match=r"Residual expects 3 features on dim 1, got input of shape \(2, 4\)"):
        layer(torch.randn(2, 4), torch.randn(2, 2))
    with pytest.raises(ValueError, match=r"Residual expects input of rank 2 \(B, D\), got shape \(2, 3, 1, 1\)"):
        layer(torch.randn(2, 3, 1, 1), torch.randn(2, 2))
    with pytest.raises(ValueError, match=r"Residual expects context of shape \(2, 2\), got \(2, 5\)"):
        layer(torch.randn(2, 3), torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"Residual was built with context_features=2 but got context=None"):
        layer.inverse(torch.randn(2, 3))
