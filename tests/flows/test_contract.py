"""The contract every public layer and every ready model keeps, checked by the oracle over
the one registry (tests/registry.py)."""

from __future__ import annotations

import pytest
import torch

from flows.jacobian import check_flow
from tests.registry import CASES, Case, perturb

IDS = sorted(CASES)


def build(case: Case) -> torch.nn.Module:
    torch.manual_seed(1)
    flow = case.make().double()
    perturb(flow, case.perturb_std)
    return flow


def inputs(case: Case, batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    return case.sample_inputs(batch)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name", IDS)
def test_oracle(name: str, batch: int) -> None:
    case = CASES[name]
    flow = build(case)
    x, context = inputs(case, batch)
    check_flow(flow, x, context, atol=case.tolerance, rtol=case.tolerance)


@pytest.mark.parametrize("name", IDS)
def test_oracle_eval_mode(name: str) -> None:
    case = CASES[name]
    flow = build(case)
    x, context = inputs(case, 3)
    flow(x, context)  # data-dependent initialization, then freeze
    flow.eval()
    check_flow(flow, x, context, atol=case.tolerance, rtol=case.tolerance)


@pytest.mark.parametrize("name", IDS)
def test_shapes_and_gradients(name: str) -> None:
    case = CASES[name]
    flow = build(case)
    with torch.no_grad():
        flow(*inputs(case, 16))  # ActNorm's initialization on other data: on x itself its bias gets 0 gradient
    # 16 samples: with 3, a ReLU unit of a tiny conditioner can be off for all of them,
    # and a parameter behind it legitimately gets no gradient.
    x, context = inputs(case, 16)
    x.requires_grad_(True)
    y, logdet = flow(x, context)
    assert y.shape[0] == 16 and y[0].numel() == x[0].numel()
    assert logdet.shape == (16,) and logdet.dtype == torch.float64
    (y.square().sum() + logdet.sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    missing = [n for n, p in flow.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reaches {missing}"


@pytest.mark.parametrize("name", IDS)
def test_state_dict_round_trip(name: str) -> None:
    case = CASES[name]
    flow = build(case)
    x, context = inputs(case, 3)
    flow(x, context)
    flow.eval()
    restored = case.make().double()
    restored.load_state_dict(flow.state_dict())
    restored.train()
    restored(inputs(case, 3)[0], context)  # fresh data: a loaded ActNorm must not re-initialize, even in train mode
    for key, value in flow.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), f"{key} changed after loading"
    restored.eval()
    y, logdet = flow(x, context)
    y2, logdet2 = restored(x, context)
    torch.testing.assert_close(y2, y, rtol=0, atol=0)
    torch.testing.assert_close(logdet2, logdet, rtol=0, atol=0)


@pytest.mark.parametrize("name", [n for n in IDS if CASES[n].context])
def test_context_is_required_and_used(name: str) -> None:
    case = CASES[name]
    flow = build(case)
    x, context = inputs(case, 3)
    with pytest.raises(ValueError, match="context_features=.* but got context=None"):
        flow(x)
    with pytest.raises(ValueError, match=r"expects context of shape \(3, \d+\), got \(3, 7\)"):
        flow(x, torch.randn(3, 7))
    y1, _ = flow(x, context)
    y2, _ = flow(x, context + 1)
    assert not torch.allclose(y1, y2), "the context does not change the output"
