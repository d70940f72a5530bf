"""flows/interop.py: flows as torch transforms and torch transforms as flows.

Both wrappers also go through the oracle from the registry (tests/registry.py)."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch.distributions import Independent, Normal, TransformedDistribution
from torch.distributions.transforms import ExpTransform, SigmoidTransform

import flows
from flows.nets import MLP
from tests.registry import perturb

D = 3


def _flow() -> flows.Flow:
    flow = flows.Sequential(flows.AffineCoupling(D, partial(MLP, hidden_features=8)), flows.InvConv1x1(D))
    perturb(flow, 0.3)
    return flow


def test_a_flow_in_a_transformed_distribution_gives_the_flow_density() -> None:
    flow = _flow()
    base = Independent(Normal(torch.zeros(D), torch.ones(D)), 1)
    transformed = TransformedDistribution(base, [flows.FlowAsTransform(flow, event_dim=1).inv])
    ours = flows.FlowDistribution(flow, flows.StandardNormal(D))
    x = torch.randn(5, D)
    torch.testing.assert_close(transformed.log_prob(x), ours.log_prob(x))
    torch.testing.assert_close(transformed.log_prob(x.view(5, 1, D)), ours.log_prob(x).view(5, 1))  # leading dims
    samples = transformed.rsample((4, 2))
    assert samples.shape == (4, 2, D) and samples.requires_grad


def test_log_abs_det_jacobian_is_the_flows_logdet_cached_or_recomputed() -> None:
    flow = _flow()
    transform = flows.FlowAsTransform(flow, event_dim=1)
    x = torch.randn(4, D)
    y = transform(x)
    z, logdet = flow(x)
    torch.testing.assert_close(y, z)
    torch.testing.assert_close(transform.log_abs_det_jacobian(x, y), logdet)
    other = torch.randn(4, D)
    torch.testing.assert_close(transform.log_abs_det_jacobian(other, flow(other)[0]), flow(other)[1])
    torch.testing.assert_close(transform.inv(y), x)
    torch.testing.assert_close(transform.inv.log_abs_det_jacobian(y, transform.inv(y)), -logdet)


def test_torch_transforms_as_flows_compose_with_layers() -> None:
    layer = flows.Sequential(flows.TransformAsFlow(SigmoidTransform()), flows.Logit(0.0))  # sigmoid then logit
    x = torch.randn(4, D)
    y, logdet = layer(x)
    torch.testing.assert_close(y, x)
    torch.testing.assert_close(logdet, torch.zeros(4), atol=1e-12, rtol=0)


def test_a_wrapped_flow_keeps_its_parameters_registered() -> None:
    flow = _flow()
    wrapped = flows.TransformAsFlow(flows.FlowAsTransform(flow, event_dim=1))
    assert {id(p) for p in wrapped.parameters()} == {id(p) for p in flow.parameters()}


def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match=r"FlowAsTransform expects a flows.Flow, got ExpTransform"):
        flows.FlowAsTransform(ExpTransform(), event_dim=1)
    with pytest.raises(ValueError, match=r"FlowAsTransform expects event_dim >= 1 \(dims of one sample\), got 0"):
        flows.FlowAsTransform(_flow(), event_dim=0)
    with pytest.raises(TypeError, match=r"TransformAsFlow expects a torch.distributions.Transform, got ActNorm"):
        flows.TransformAsFlow(flows.ActNorm(2))
    with pytest.raises(ValueError, match=r"TransformAsFlow expects a bijective transform"):
        flows.TransformAsFlow(torch.distributions.transforms.AbsTransform())
