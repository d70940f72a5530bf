"""Tests of flows/transformer.py and flows/attention.py: the oracle on TarFlow's layer and on
patchify, the declared block-triangular structure (and a leaky layer it catches), the key/value
cache against full passes, the exact and the fixed-point inverses, guidance, and the errors."""

from __future__ import annotations

import pytest
import torch

import flows
from flows.attention import CausalTransformer, KVCache
from flows.jacobian import FlowCheckError, check_flow
from flows.transformer import FixedPoint, Patchify, TransformerAutoregressive
from tests.registry import perturb

# torch.func has no batching rule for CPU flash attention's backward: the oracle's vmap falls back
# to a loop there (correct, slower), and says so in a warning.
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

T, P, K = 4, 3, 2  # patches, values per patch, context features


def _layer(order: str = "natural", context: int = 0, patches: int = T, std: float = 0.3) -> TransformerAutoregressive:
    torch.manual_seed(1)
    layer = TransformerAutoregressive(P, patches, hidden_features=8, num_blocks=1, num_heads=2,
                                      context_features=context, order=order)
    perturb(layer, std)
    return layer


def _uncached_inverse(layer: TransformerAutoregressive, z: torch.Tensor, context=None) -> torch.Tensor:
    """The textbook inverse: ``T`` full transformer passes over the whole sequence, no cache."""
    sequence = layer._ordered(z)
    x = torch.zeros_like(sequence)
    for _ in range(layer.num_patches):
        inputs = torch.cat([x.new_zeros(x.shape[0], 1, P), x[:, :-1]], 1)
        x, _ = layer.elementwise.inverse(sequence, layer.conditioner(inputs, context).view(*x.shape, 2))
    return layer._ordered(x)


@pytest.mark.parametrize("order", ["natural", "reversed"])
@pytest.mark.parametrize("context", [0, K])
def test_oracle(order: str, context: int) -> None:
    layer = _layer(order, context)
    x = torch.randn(3, T, P) * 1.5
    report = check_flow(layer, x, torch.randn(3, context) if context else None)
    assert report["structure"] == 0.0  # exactly zero above the blocks, not merely small


def test_oracle_on_a_patch_stack() -> None:
    """Images: patchify, two blocks of alternating order, back to an image."""
    torch.manual_seed(0)
    patches = Patchify((2, 4, 4), patch_size=2)
    blocks = [TransformerAutoregressive(8, 4, 8, 1, 2, order=order) for order in ("natural", "reversed")]
    stack = flows.Sequential(patches, *blocks, flows.Inverse(patches))
    perturb(stack, 0.3)
    check_flow(stack, torch.randn(2, 2, 4, 4))
    check_flow(patches, torch.randn(2, 2, 4, 4))


def test_mask_is_block_triangular_in_patch_order() -> None:
    layer = TransformerAutoregressive(2, 3, hidden_features=4, num_blocks=0, num_heads=1)
    blocks = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    full = blocks.repeat_interleave(2, 0).repeat_interleave(2, 1)
    diagonal_blocks = torch.block_diag(*[torch.ones(2, 2)] * 3).bool()
    expected = (full & ~diagonal_blocks) | torch.eye(6, dtype=torch.bool)
    assert torch.equal(layer.jacobian_mask((3, 2)), expected)
    reversed_layer = TransformerAutoregressive(2, 3, hidden_features=4, num_blocks=0, num_heads=1, order="reversed")
    assert torch.equal(reversed_layer.jacobian_mask((3, 2)), expected.T)


class _SeesItsOwnPatch(TransformerAutoregressive):
    """A broken layer: no shift, so patch t's parameters depend on patch t itself."""

    def forward(self, x, context=None):
        z, log_scale = self.elementwise.forward(x, self._params(x, context))
        return z, flows.base.sum_per_sample(log_scale)


def test_oracle_catches_a_layer_that_sees_its_own_patch() -> None:
    torch.manual_seed(1)
    layer = _SeesItsOwnPatch(P, T, hidden_features=8, num_blocks=1, num_heads=2)
    perturb(layer, 0.3)
    with pytest.raises(FlowCheckError, match="logdet is wrong.*\n.*declared Jacobian structure violated"):
        check_flow(layer, torch.randn(2, T, P))


def test_patchify_matches_unfold() -> None:
    x = torch.randn(2, 3, 4, 6)
    expected = torch.nn.functional.unfold(x, 2, stride=2).transpose(1, 2)  # (B, T, C p p)
    assert torch.equal(Patchify((3, 4, 6), 2)(x)[0], expected)


def test_new_layer_is_the_identity() -> None:
    layer = TransformerAutoregressive(P, T, hidden_features=8, num_blocks=1, num_heads=2)
    x = torch.randn(2, T, P)
    z, logdet = layer(x)
    assert torch.equal(z, x) and torch.equal(logdet, torch.zeros(2))


def test_kv_cache_gives_the_full_pass() -> None:
    torch.manual_seed(0)
    net = CausalTransformer(3, 5, num_positions=6, hidden_features=8, num_blocks=2, num_heads=2, context_features=K)
    perturb(net, 0.3)
    x, context = torch.randn(2, 6, 3), torch.randn(2, K)
    full = net(x, context)
    for sizes in ([1] * 6, [2, 3, 1]):
        cache, outputs, start = KVCache(2), [], 0
        for size in sizes:
            outputs.append(net(x[:, start : start + size], context, cache))
            cache.commit(size)
            start += size
        torch.testing.assert_close(torch.cat(outputs, 1), full, rtol=0, atol=1e-12)


@pytest.mark.parametrize("order", ["natural", "reversed"])
def test_cached_inverse_equals_the_uncached_sequential_inverse(order: str) -> None:
    layer = _layer(order, K)
    x, context = torch.randn(3, T, P), torch.randn(3, K)
    z, logdet = layer(x, context)
    solution = layer.solve(z, context)
    assert solution.passes == T
    torch.testing.assert_close(solution.x, _uncached_inverse(layer, z, context), rtol=0, atol=1e-12)
    torch.testing.assert_close(solution.x, x, rtol=0, atol=1e-10)
    torch.testing.assert_close(solution.logdet, -logdet, rtol=0, atol=1e-10)


@pytest.mark.parametrize("block_size", [None, 2, 3])
def test_fixed_point_with_enough_iterations_is_exact(block_size: int | None) -> None:
    layer = _layer("reversed", K)
    z, context = torch.randn(3, T, P), torch.randn(3, K)
    exact = layer.solve(z, context)
    solution = layer.solve(z, context, FixedPoint(block_size=block_size))
    assert solution.passes == T  # block sizes add up to T iterations
    torch.testing.assert_close(solution.x, exact.x, rtol=0, atol=1e-10)
    torch.testing.assert_close(solution.logdet, exact.logdet, rtol=0, atol=1e-10)


def test_jacobi_stops_early_on_a_weakly_coupled_layer_and_approximates_with_few_iterations() -> None:
    weak = _layer(patches=8, std=0.02)  # close to the identity: a contraction, Jacobi converges fast
    z = torch.randn(2, 8, P)
    exact = weak.solve(z)
    early = weak.solve(z, fixed_point=FixedPoint(block_size=None, tolerance=1e-9))
    assert early.passes < 8
    torch.testing.assert_close(early.x, exact.x, rtol=0, atol=1e-8)
    strong = _layer(patches=8)
    with torch.no_grad():
        one = strong.solve(z, fixed_point=FixedPoint(block_size=None, max_iterations=1))
        assert one.passes == 1 and float((one.x - strong.solve(z).x).abs().max()) > 1e-3


def test_guidance_extrapolates_mean_and_log_scale() -> None:
    """Patch 0 depends on the context alone; with z = 0 its value is the mean mu, with z = 1 it is
    mu + exp(alpha): guidance w gives mu_c + w (mu_c - mu_u) and alpha_c + w (alpha_c - alpha_u)."""
    layer, context, w = _layer(context=K), torch.randn(2, K), 1.7
    null = torch.zeros_like(context)

    def first(z_value: float, ctx: torch.Tensor, guidance: float = 0.0) -> torch.Tensor:
        z = torch.full((2, T, P), z_value)
        return layer.solve(z, ctx, guidance=guidance).x[:, 0]

    mu_c, mu_u = first(0.0, context), first(0.0, null)
    alpha_c, alpha_u = (first(1.0, context) - mu_c).log(), (first(1.0, null) - mu_u).log()
    torch.testing.assert_close(first(0.0, context, w), mu_c + w * (mu_c - mu_u))
    torch.testing.assert_close(first(1.0, context, w) - first(0.0, context, w),
                               (alpha_c + w * (alpha_c - alpha_u)).exp())


def test_guidance_is_a_no_op_without_a_context_effect_and_zero_guidance_is_the_inverse() -> None:
    layer = _layer(context=K)
    z, context = torch.randn(3, T, P), torch.randn(3, K)
    exact = layer.solve(z, context)
    zero = layer.solve(z, context, guidance=0.0)
    assert torch.equal(zero.x, exact.x)
    guided = layer.solve(z, context, guidance=2.0)
    assert guided.x.shape == z.shape and guided.logdet.shape == (3,)
    assert not torch.allclose(guided.x, exact.x)
    with torch.no_grad():
        layer.conditioner.context_embedding.weight.zero_()  # the context no longer matters
    blind = layer.solve(z, context)
    torch.testing.assert_close(layer.solve(z, context, guidance=2.0).x, blind.x, rtol=0, atol=1e-12)


def test_solve_is_differentiable() -> None:
    layer = _layer(context=K)
    z = torch.randn(2, T, P, requires_grad=True)
    layer.solve(z, torch.randn(2, K), FixedPoint(block_size=2)).x.sum().backward()
    assert z.grad is not None and bool(torch.isfinite(z.grad).all())
    assert layer.conditioner.embedding.weight.grad is not None


def test_errors() -> None:
    layer = _layer(context=K)
    with pytest.raises(ValueError, match=r"expects input of shape \(B, 4, 3\) \(batch, patches, values per patch\), "
                                         r"got \(2, 5, 3\); use flows.Patchify"):
        layer(torch.randn(2, 5, 3), torch.randn(2, K))
    with pytest.raises(ValueError, match=r"TransformerAutoregressive expects input of rank 3 \(B, C, L\), got shape"):
        layer(torch.randn(2, 12), torch.randn(2, K))
    with pytest.raises(ValueError, match="needs a context for guidance=1.0, got context=None"):
        _layer().solve(torch.randn(2, T, P), guidance=1.0)
    with pytest.raises(ValueError, match="order must be 'natural' or 'reversed', got 'random'"):
        TransformerAutoregressive(P, T, 8, 1, order="random")
    with pytest.raises(ValueError, match="hidden_features must be divisible by num_heads, got 8 and 3"):
        TransformerAutoregressive(P, T, 8, 1, num_heads=3)
    with pytest.raises(ValueError, match="CausalTransformer num_blocks must be an integer >= 0, got -1"):
        CausalTransformer(3, 6, 4, 8, num_blocks=-1, num_heads=1)
    with pytest.raises(ValueError, match=r"has 4 patches of 3, got sample shape \(12,\)"):
        layer.jacobian_mask((12,))
    with pytest.raises(ValueError, match="FixedPoint block_size must be an integer >= 1 or None, got 0"):
        FixedPoint(block_size=0)
    with pytest.raises(ValueError, match="FixedPoint max_iterations must be an integer >= 1 or None, got 1.5"):
        FixedPoint(max_iterations=1.5)
    with pytest.raises(ValueError, match="FixedPoint tolerance must be >= 0, got -1"):
        FixedPoint(tolerance=-1)


def test_patchify_errors() -> None:
    with pytest.raises(ValueError, match=r"Patchify\(patch_size=2\) needs H and W divisible by 2, got image shape "
                                         r"\(1, 4, 5\); pad or crop"):
        Patchify((1, 4, 5), 2)
    with pytest.raises(ValueError, match=r"Patchify expects shape \(C, H, W\) and patch_size >= 1"):
        Patchify((4, 4), 2)
    patches = Patchify((1, 4, 4), 2)
    with pytest.raises(ValueError, match=r"Patchify expects images of shape \(B, 1, 4, 4\), got \(2, 1, 4, 6\)"):
        patches(torch.randn(2, 1, 4, 6))
    with pytest.raises(ValueError, match=r"Patchify.inverse expects patches of shape \(B, 4, 4\), got \(2, 4, 3\)"):
        patches.inverse(torch.randn(2, 4, 3))
