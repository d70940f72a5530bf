"""InvConv1x1 (LU and full), its eval-mode weight cache, and the permutations."""

from __future__ import annotations

import pytest
import torch

import flows
from flows.jacobian import check_flow
from tests.registry import perturb


@pytest.mark.parametrize("lu", [True, False])
def test_starts_as_a_rotation(lu: bool) -> None:
    conv = flows.InvConv1x1(5, lu=lu, seed=3)
    _, logdet = conv(torch.randn(2, 5, 3, 3))
    torch.testing.assert_close(logdet, torch.zeros(2), rtol=0, atol=1e-10)


def test_lu_weight_equals_its_factors() -> None:
    conv = flows.InvConv1x1(4, seed=0)
    perturb(conv)
    weight, log_abs_det = conv._compute(inverse=False)
    inverse, _ = conv._compute(inverse=True)
    torch.testing.assert_close(weight @ inverse, torch.eye(4), rtol=0, atol=1e-12)
    torch.testing.assert_close(log_abs_det, torch.linalg.slogdet(weight)[1], rtol=0, atol=1e-12)


def test_eval_cache_and_train_path_are_both_exact() -> None:
    conv = flows.InvConv1x1(3, seed=1)
    perturb(conv)
    x = torch.randn(3, 3, 2, 2)
    check_flow(conv, x)  # train mode: recomputed on every call
    conv.eval()
    check_flow(conv, x)  # eval mode: the cached weight and inverse
    assert conv._caches[False].key is not None and conv._caches[True].key is not None


def test_eval_cache_is_reused_while_weights_are_unchanged() -> None:
    conv = flows.InvConv1x1(3, seed=1).eval()
    x = torch.randn(2, 3, 2, 2)
    conv(x)
    conv.inverse(x)
    cached = conv._caches[False].value, conv._caches[True].value
    conv(x)
    conv.inverse(x)
    assert conv._caches[False].value is cached[0] and conv._caches[True].value is cached[1]


@pytest.mark.parametrize("lu", [True, False])
def test_a_parameter_update_invalidates_the_cache(lu: bool) -> None:
    conv = flows.InvConv1x1(3, lu=lu, seed=1)
    x = torch.randn(2, 3, 2, 2)
    optimizer = torch.optim.SGD(conv.parameters(), lr=0.1)
    (conv(x)[0].square().sum() + conv(x)[1].sum()).backward()
    conv.eval()
    y_before, logdet_before = conv(x)
    optimizer.step()
    y_after, logdet_after = conv(x)
    fresh = flows.InvConv1x1(3, lu=lu, seed=1)
    fresh.load_state_dict(conv.state_dict())
    fresh.train()
    y_expected, logdet_expected = fresh(x)
    assert not torch.allclose(y_before, y_after)
    torch.testing.assert_close(y_after, y_expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logdet_after, logdet_expected, rtol=1e-12, atol=1e-12)
    check_flow(conv, x)


def test_load_state_dict_invalidates_the_cache() -> None:
    conv = flows.InvConv1x1(3, seed=1).eval()
    x = torch.randn(2, 3)
    conv(x)
    other = flows.InvConv1x1(3, seed=2)
    conv.load_state_dict(other.state_dict())
    torch.testing.assert_close(conv(x)[0], other(x)[0], rtol=1e-12, atol=1e-12)


def test_lu_and_full_agree_for_the_same_weight() -> None:
    lu = flows.InvConv1x1(4, seed=5)
    perturb(lu)
    full = flows.InvConv1x1(4, lu=False)
    with torch.no_grad():
        full.weight.copy_(lu._compute(inverse=False)[0])
    x = torch.randn(2, 4, 3, 3)
    y_lu, logdet_lu = lu(x)
    y_full, logdet_full = full(x)
    torch.testing.assert_close(y_lu, y_full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logdet_lu, logdet_full, rtol=1e-12, atol=1e-12)


def test_bad_channel_count() -> None:
    with pytest.raises(ValueError, match=r"InvConv1x1 expects 4 features on dim 1, got input of shape \(2, 3, 5, 5\)"):
        flows.InvConv1x1(4)(torch.randn(2, 3, 5, 5))


def test_bad_size() -> None:
    with pytest.raises(ValueError, match="InvConv1x1 needs features >= 1, got 0"):
        flows.InvConv1x1(0)


def test_permutation_is_fixed_by_its_seed() -> None:
    assert torch.equal(flows.Permutation(7, seed=4).permutation, flows.Permutation(7, seed=4).permutation)
    x = torch.arange(7.0).unsqueeze(0)
    y, logdet = flows.Permutation(7, seed=4)(x)
    assert sorted(y[0].tolist()) == list(range(7)) and logdet.shape == (1,)


def test_reverse_checks_its_size_when_given() -> None:
    with pytest.raises(ValueError, match=r"Reverse expects 3 features on dim 1, got input of shape \(1, 4\)"):
        flows.Reverse(3)(torch.randn(1, 4))


def test_permutation_rank_error() -> None:
    with pytest.raises(ValueError, match=r"Permutation expects input of rank 2 \(B, D\) or rank 4 \(B, C, H, W\), got shape \(5,\)"):
        flows.Permutation(5)(torch.randn(5))
