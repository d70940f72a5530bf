"""ScalarAffine and Logit preprocessing."""

from __future__ import annotations

import math

import pytest
import torch

import flows


def test_scalar_affine_logdet_counts_every_entry() -> None:
    _, logdet = flows.ScalarAffine(1 / 256)(torch.rand(2, 3, 4, 4) * 256)
    torch.testing.assert_close(logdet, torch.full((2,), -48 * math.log(256)))


def test_logit_matches_realnvp_formula() -> None:
    alpha = 0.05
    x = torch.rand(3, 4)
    y, logdet = flows.Logit(alpha)(x)
    s = alpha + (1 - 2 * alpha) * x
    torch.testing.assert_close(y, torch.log(s / (1 - s)))
    expected = (math.log(1 - 2 * alpha) - torch.log(s) - torch.log(1 - s)).sum(1)
    torch.testing.assert_close(logdet, expected)


def test_logit_is_finite_at_the_ends_of_the_unit_interval() -> None:
    y, logdet = flows.Logit(0.05)(torch.tensor([[0.0, 1.0]]))
    assert torch.isfinite(y).all() and torch.isfinite(logdet).all()


@pytest.mark.parametrize(("make", "message"), [
    (lambda: flows.ScalarAffine(0.0), "ScalarAffine needs a finite non-zero scale, got 0.0"),
    (lambda: flows.Logit(0.5), r"Logit needs 0 <= alpha < 0.5, got 0.5"),
])
def test_bad_construction(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()
