"""Tests of models/metrics.py: dequantization, bits per dimension, mean and stderr."""

from __future__ import annotations

import math

import pytest
import torch

from models.metrics import bits_per_dim, bits_per_dim_unit_scale, dequantize, nats_mean_and_stderr

# --- dequantize --------------------------------------------------------------------


def test_dequantize_puts_each_level_in_its_bin():
    levels = torch.arange(17).repeat(1000)  # every level of the digits set
    y = dequantize(levels, 17)
    assert y.dtype == torch.get_default_dtype() and y.shape == levels.shape
    assert bool((y >= levels / 17).all()) and bool((y < (levels + 1) / 17).all())


def test_dequantize_noise_is_uniform():
    levels = torch.zeros(200_000)
    u = dequantize(levels, 4) * 4  # the noise itself, in level units
    # U[0, 1) has mean 1/2 and variance 1/12; 5 standard errors (~3e-3) bound the mean.
    stderr = math.sqrt(1 / 12 / u.numel())
    assert abs(float(u.mean()) - 0.5) < 5 * stderr
    # Each quarter of the bin holds a quarter of the points, within 5 binomial std.
    counts = torch.bincount((u * 4).long(), minlength=4).double()
    assert float((counts / u.numel() - 0.25).abs().max()) < 5 * math.sqrt(0.25 * 0.75 / u.numel())


def test_dequantize_keeps_float_dtype_and_is_reproducible():
    levels = torch.randint(0, 256, (4, 3, 2, 2)).float()
    a = dequantize(levels, 256, generator=torch.Generator().manual_seed(3))
    b = dequantize(levels, 256, generator=torch.Generator().manual_seed(3))
    assert a.dtype == torch.float32 and torch.equal(a, b)


def test_dequantize_stays_below_one_in_float32():
    # In float32, 255 + u rounds up to 256 for about 1 in 2^17 draws of u: 4M draws
    # would give ~32 values of exactly 1.0 without the clamp.
    y = dequantize(torch.full((1 << 22,), 255.0, dtype=torch.float32), 256)
    assert float(y.max()) < 1.0


@pytest.mark.parametrize("num_levels", [1, 2.5, True])
def test_dequantize_rejects_bad_num_levels(num_levels):
    with pytest.raises(ValueError, match=r"num_levels: expected an integer >= 2, got"):
        dequantize(torch.zeros(3), num_levels)


# --- bits per dimension ------------------------------------------------------------


@pytest.mark.parametrize("num_levels, num_dims", [(2, 1), (17, 64), (256, 3072)])
def test_uniform_density_scores_log2_levels(num_levels, num_dims):
    # Uniform on [0, K)^D in level units: -log p = D log K nats.
    nll_levels = num_dims * math.log(num_levels)
    assert bits_per_dim(nll_levels, num_dims) == pytest.approx(math.log2(num_levels), rel=1e-15)
    # Uniform on [0, 1)^D: -log p = 0, and the unit-scale formula adds the D log K term.
    assert bits_per_dim_unit_scale(0.0, num_dims, num_levels) == pytest.approx(math.log2(num_levels), rel=1e-15)


def test_standard_normal_at_its_mode_by_hand():
    # -log N(0; 0, I_D) = (D/2) log(2 pi), so bits/dim = log2(2 pi) / 2 = 1.32574...
    num_dims = 5
    nll = -torch.distributions.Normal(0.0, 1.0).log_prob(torch.zeros(num_dims)).sum()
    assert float(bits_per_dim(nll, num_dims)) == pytest.approx(0.5 * math.log2(2 * math.pi), rel=1e-14)


def test_both_conventions_agree_on_the_same_model():
    # A Gaussian N(mu, s^2 I) over y = (x + u) / K is the Gaussian N(K mu, K^2 s^2 I)
    # over v = x + u: the same model in two scalings must score the same bits/dim.
    num_levels, num_dims = 256, 12
    y = torch.rand(7, num_dims)
    nll_y = -torch.distributions.Normal(0.4, 0.2).log_prob(y).sum(dim=1)
    scaled = torch.distributions.Normal(0.4 * num_levels, 0.2 * num_levels)
    nll_v = -scaled.log_prob(y * num_levels).sum(dim=1)
    unit = bits_per_dim_unit_scale(nll_y, num_dims, num_levels)
    torch.testing.assert_close(unit, bits_per_dim(nll_v, num_dims), rtol=1e-13, atol=0.0)
    assert unit.shape == (7,)


@pytest.mark.parametrize("num_dims", [0, -3, 1.5])
def test_bits_per_dim_rejects_bad_num_dims(num_dims):
    with pytest.raises(ValueError, match=r"num_dims: expected a positive integer, got"):
        bits_per_dim(1.0, num_dims)


def test_bits_per_dim_unit_scale_rejects_bad_num_levels():
    with pytest.raises(ValueError, match=r"num_levels: expected an integer >= 2, got 0"):
        bits_per_dim_unit_scale(1.0, 4, 0)


# --- mean and standard error -------------------------------------------------------


def test_nats_mean_and_stderr_by_hand():
    # [1, 2, 3, 4]: mean 5/2, sample variance 5/3, so stderr = sqrt(5/3) / 2.
    mean, stderr = nats_mean_and_stderr(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float32))
    assert mean == 2.5
    assert stderr == pytest.approx(math.sqrt(5 / 3) / 2, rel=1e-15)


@pytest.mark.parametrize("shape", [(), (1,), (2, 3)])
def test_nats_mean_and_stderr_rejects_bad_shapes(shape):
    message = r"values: expected a 1-D tensor of at least 2 per-sample values, got shape"
    with pytest.raises(ValueError, match=message):
        nats_mean_and_stderr(torch.zeros(shape))
