"""Tests of models/data/toy.py (and the KnownDensity base): true densities and the toy sets."""

from __future__ import annotations

import math

import pytest
import torch

from models.data import load_dataset
from models.data.toy import TOY_DENSITIES, Checkerboard, EightGaussians, Rings, TwoMoons


BINS = 10  # per axis, for comparing sample counts with the density


def midpoint_grid(density, step: float):
    """Cell centers over ``density.bounds`` (a multiple of BINS cells per axis, each at
    most ``step`` wide), the cell area, and the cell counts per axis."""
    axes, sizes, widths = [], [], []
    for low, high in density.bounds:
        n = BINS * math.ceil((high - low) / (BINS * step))
        width = (high - low) / n
        axes.append(low + width * (torch.arange(n, dtype=torch.float64) + 0.5))
        sizes.append(n)
        widths.append(width)
    points = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 2)
    return points, widths[0] * widths[1], sizes


# Cells of 0.02 are a tenth of the narrowest noise std (0.1 -> 0.2 std per cell); the
# checkerboard's 0.05 cells tile its 2x2 squares exactly.
STEPS = {"checkerboard": 0.05, "eight_gaussians": 0.02, "rings": 0.02, "two_moons": 0.02}


@pytest.fixture(scope="module")
def grids():
    """name -> (density, grid points, cell area, cells per axis, density on the grid)."""
    out = {}
    for name, cls in TOY_DENSITIES.items():
        density = cls()
        points, area, sizes = midpoint_grid(density, STEPS[name])
        out[name] = density, points, area, sizes, density.log_prob(points).exp()
    return out


@pytest.mark.parametrize("name", list(TOY_DENSITIES))
def test_toy_density_integrates_to_one(name, grids):
    _, _, area, _, p = grids[name]
    # The midpoint rule is exact for the checkerboard (cells tile the squares) and, for
    # the smooth densities, off by the Gaussian factor exp(-2 pi^2 std^2 / step^2)
    # < 1e-200 (Poisson summation); the mass outside the bounds is < 1e-13, and summing
    # ~2e5 float64 terms rounds by ~1e-14 (measured errors: <= 6e-15).
    assert float(p.sum() * area) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("name", list(TOY_DENSITIES))
def test_toy_samples_follow_the_density(name, grids):
    density, _, area, (nx, ny), p = grids[name]
    n = 100_000
    x = density.sample(n, torch.Generator().manual_seed(1))
    # Probability of each of BINS x BINS boxes from the density, counts from samples.
    probs = (p * area).reshape(BINS, nx // BINS, BINS, ny // BINS).sum(dim=(1, 3)).reshape(-1)
    (x0, x1), (y0, y1) = density.bounds
    i = ((x[:, 0] - x0) / (x1 - x0) * BINS).long().clamp(0, BINS - 1)
    j = ((x[:, 1] - y0) / (y1 - y0) * BINS).long().clamp(0, BINS - 1)
    counts = torch.bincount(i * BINS + j, minlength=BINS * BINS).double()
    # Boxes expected to hold < 5 points are pooled so the normal approximation holds;
    # 5 binomial standard deviations over <= 101 boxes: a false alarm has p < 1e-4.
    big = probs * n >= 5
    expected = torch.cat([probs[big], probs[~big].sum(dim=0, keepdim=True)]) * n
    observed = torch.cat([counts[big], counts[~big].sum(dim=0, keepdim=True)])
    z = (observed - expected) / (expected * (1 - expected / n)).clamp_min(1e-12).sqrt()
    assert float(z.abs().max()) < 5.0, f"max |z| {float(z.abs().max()):.2f}"


@pytest.mark.parametrize("name", list(TOY_DENSITIES))
def test_toy_entropy_matches_the_grid(name, grids):
    density, _, area, _, p = grids[name]
    value, stderr = density.entropy()
    log_p = p.log()
    grid_entropy = float(-(torch.where(p > 0, p * log_p, 0.0)).sum() * area)
    # Grid error as in the normalization test (< 1e-9); the Monte Carlo value is within
    # 5 of its standard errors (exact, stderr 0, for the checkerboard).
    assert abs(grid_entropy - value) < 5 * stderr + 1e-9


@pytest.mark.parametrize("name", list(TOY_DENSITIES))
def test_toy_entropy_matches_fresh_samples(name, grids):
    density = grids[name][0]
    value, stderr = density.entropy()
    nll = -density.log_prob(density.sample(20_000, torch.Generator().manual_seed(2)))
    assert bool(torch.isfinite(nll).all())  # every sample lies in the support
    mean = float(nll.mean())
    fresh_stderr = float(nll.std()) / math.sqrt(nll.numel())
    # Two independent estimates of E[-log p]: within 5 combined standard errors.
    assert abs(mean - value) < 5 * math.hypot(stderr, fresh_stderr) + 1e-12


@pytest.mark.parametrize("name", list(TOY_DENSITIES))
def test_toy_sample_shape_dtype_and_seed(name):
    density = TOY_DENSITIES[name]()
    a = density.sample(5, torch.Generator().manual_seed(7))
    b = density.sample(5, torch.Generator().manual_seed(7))
    assert a.shape == (5, 2) and a.dtype == torch.float64 and torch.equal(a, b)
    assert density.log_prob(a.float()).dtype == torch.float32
    assert density.log_prob(a).shape == (5,)


@pytest.mark.parametrize("name", list(TOY_DENSITIES))
def test_toy_class_densities_integrate_to_one_and_mix_to_the_density(name, grids):
    density, points, area, _, p = grids[name]
    per_class = torch.stack([density.log_prob_given(points, torch.full((len(points),), k))
                             for k in range(density.num_classes)])  # (K, N)
    # Each class density is normalized (same midpoint-rule error as the whole density) ...
    masses = per_class.exp().sum(1) * area
    torch.testing.assert_close(masses, torch.ones_like(masses), rtol=0.0, atol=1e-12)
    # ... and the equal mixture of them is the density itself.
    mixture = torch.logsumexp(per_class, 0) - math.log(density.num_classes)
    finite = p > 0
    torch.testing.assert_close(mixture[finite].exp(), p[finite], rtol=1e-12, atol=0.0)
    assert bool(torch.isinf(mixture[~finite]).all())


@pytest.mark.parametrize("name", list(TOY_DENSITIES))
def test_toy_labels_name_the_class_each_point_came_from(name):
    density = TOY_DENSITIES[name]()
    x, labels = density.sample_labeled(5000, torch.Generator().manual_seed(4))
    assert torch.equal(x, density.sample(5000, torch.Generator().manual_seed(4)))  # the same draws
    assert labels.dtype == torch.int64 and set(labels.tolist()) == set(range(density.num_classes))
    own = density.log_prob_given(x, labels)
    assert bool(torch.isfinite(own).all())
    # The true class explains a point better than any other class, for all but the few
    # points of a class that fall where another's density is higher (overlaps).
    others = torch.stack([density.log_prob_given(x, torch.full_like(labels, k)) for k in range(density.num_classes)])
    assert float((others.argmax(0) == labels).double().mean()) > 0.97


@pytest.mark.parametrize("name", list(TOY_DENSITIES))
def test_toy_conditional_entropy_matches_fresh_samples(name, grids):
    density, points, area, _, _ = grids[name]
    value, stderr = density.conditional_entropy()
    x, labels = density.sample_labeled(20_000, torch.Generator().manual_seed(5))
    nll = -density.log_prob_given(x, labels)
    fresh, fresh_stderr = float(nll.mean()), float(nll.std()) / math.sqrt(nll.numel())
    assert abs(fresh - value) < 5 * math.hypot(stderr, fresh_stderr) + 1e-12
    # H(X | class) <= H(X) <= H(X | class) + log K, with equality on the right for disjoint classes.
    entropy = density.entropy()[0]
    assert value - 1e-2 < entropy < value + math.log(density.num_classes) + 1e-2


@pytest.mark.parametrize(
    "labels, message",
    [
        (torch.zeros(3, dtype=torch.float64), r"Rings.log_prob_given: expected int64 labels of shape \(3,\), got torch.float64 \(3,\)"),
        (torch.zeros(2, dtype=torch.int64), r"expected int64 labels of shape \(3,\), got torch.int64 \(2,\)"),
        (torch.tensor([0, 4, -1]), r"Rings.log_prob_given: expected labels in 0..3, got \[-1, 4\]"),
    ],
)
def test_log_prob_given_rejects_bad_labels(labels, message):
    with pytest.raises(ValueError, match=message):
        Rings().log_prob_given(torch.zeros(3, 2), labels)


def test_checkerboard_values():
    points = torch.tensor([[-3.0, -3.0], [-1.0, -3.0], [1.5, 0.5], [0.5, 1.5], [4.0, 0.0], [-5.0, -3.0]])
    expected = [-math.log(32), -math.inf, -math.log(32), -math.log(32), -math.inf, -math.inf]
    assert Checkerboard().log_prob(points).tolist() == expected


def test_rings_closed_form_matches_angle_quadrature():
    # The trapezoid rule is spectrally accurate for the periodic integrand over the
    # ring's angle; 4096 nodes resolve std / R = 0.025 rad to round-off.
    rings = Rings()
    x = rings.sample(20, torch.Generator().manual_seed(3)) + 0.3 * torch.randn(20, 2)
    theta = torch.arange(4096, dtype=torch.float64) * (2 * math.pi / 4096)
    circle = torch.stack([theta.cos(), theta.sin()], dim=1)  # (T, 2)
    total = torch.zeros(20, dtype=torch.float64)
    for radius in rings.radii.tolist():
        sq = (x[:, None, :] - radius * circle).pow(2).sum(-1)  # (20, T)
        total += (-sq / (2 * rings.std**2)).exp().mean(dim=1) / (2 * math.pi * rings.std**2)
    expected = (total / len(rings.radii)).log()
    torch.testing.assert_close(rings.log_prob(x), expected, rtol=0.0, atol=1e-10)


def test_two_moons_quadrature_is_converged(grids):
    moons, points, _, _, _ = grids["two_moons"]
    points = points[::5]  # ~7,000 points spread over the bounds box
    fine = TwoMoons(num_panels=4 * 64)
    # Measured ~3e-11 over the whole bounds box, down to log p = -120.
    torch.testing.assert_close(moons.log_prob(points), fine.log_prob(points), rtol=0.0, atol=1e-9)


def test_toy_sample_rejects_bad_n():
    with pytest.raises(ValueError, match=r"Rings.sample: expected n >= 1, got 0"):
        Rings().sample(0)


def test_toy_log_prob_rejects_bad_shape():
    with pytest.raises(ValueError, match=r"TwoMoons.log_prob: expected points of shape \(N, 2\), got \(3,\)"):
        TwoMoons().log_prob(torch.zeros(3))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: EightGaussians(std=0.0), r"EightGaussians: expected radius > 0 and std > 0, got 2.0, 0.0"),
        (lambda: Rings(radii=()), r"Rings: expected positive radii and std > 0, got \(\), 0.1"),
        (lambda: TwoMoons(num_panels=0), r"TwoMoons: expected std > 0 and num_panels >= 1, got 0.1, 0"),
    ],
)
def test_toy_constructors_reject_bad_arguments(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_toy_sets_are_fixed_samples():
    train = load_dataset("checkerboard")
    test = load_dataset("checkerboard", split="test")
    assert (len(train), len(test)) == (50_000, 10_000)
    assert train.kind == "toy2d" and train.shape == (2,) and train.data.dtype == torch.float32
    assert train.num_levels is None and train.num_classes == 8
    assert train.labels.shape == (50_000,) and set(train.labels.tolist()) == set(range(8))
    assert isinstance(train.density, Checkerboard)
    assert torch.equal(load_dataset("checkerboard").data, train.data)  # the same every time
    assert not torch.equal(test.data, train.data[:10_000])
    small = load_dataset("checkerboard", num_samples=100)
    other_seed = load_dataset("checkerboard", num_samples=100, seed=1)
    assert len(small) == 100 and not torch.equal(other_seed.data, small.data)
