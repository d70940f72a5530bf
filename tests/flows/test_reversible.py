"""Memory-saving backpropagation (flows/reversible.py): the same gradients as
ordinary backpropagation, for every layer and model of the registry, without the stored
activations."""

from __future__ import annotations

import copy
import os
import socket
from functools import partial

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import flows
import models
from flows.reversible import DriftMonitor, InvertibleSequential, _steps, inverse_kind, invertible_backprop
from flows.nets import MLP, GlowConvNet
from tests.registry import CASES, Case, perturb

# Every layer of the registry, and the models the issue names (Glow and RealNVP, every
# preset): the other models' presets add time to the suite, not coverage of this code.
IDS = sorted(n for n in CASES if not n.startswith("model-") or n.split("-")[1] in ("glow", "realnvp"))
RTOL = 1e-10  # float64: the rebuilt inputs differ from the true ones by round-off only


def build(case: Case) -> flows.Flow:
    torch.manual_seed(1)
    flow = case.make().double()
    perturb(flow, case.perturb_std)
    return flow


def rewrite(flow: flows.Flow, **options) -> flows.Flow:
    """``invertible_backprop``, opting in to iterative inverses where a layer has one."""
    iterative = any(inverse_kind(step) == "iterative" for _, step in _steps(flow, "flow"))
    return invertible_backprop(flow, allow_iterative_inverse=iterative, **options)


def approximate_inverse(flow: nn.Module) -> bool:
    """Residual and continuous flows invert by a numerical solve, to its tolerance only."""
    return any(isinstance(m, flows.FreeFormFlow) for m in flow.modules())


def rebuild_nodes(output: torch.Tensor) -> int:
    """How many memory-saving runs the autograd graph of ``output`` holds."""
    seen, stack, count = set(), [output.grad_fn], 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        count += type(node).__name__ == "RebuildFunctionBackward"
        stack += [next_node for next_node, _ in node.next_functions]
    return count


def gradients(flow: nn.Module, x: torch.Tensor, context: torch.Tensor | None) -> tuple[list[torch.Tensor], int]:
    """Gradients of a fixed random weighting of ``(z, logdet)`` w.r.t. input, context and every
    parameter (zeros where none reached), and how many memory-saving runs were used."""
    x = x.detach().clone().requires_grad_(True)
    context = None if context is None else context.detach().clone().requires_grad_(True)
    flow.zero_grad(set_to_none=True)
    z, logdet = flow(x, context)
    generator = torch.Generator().manual_seed(7)
    z_weights = torch.randn(z.shape, generator=generator, dtype=z.dtype)
    logdet_weights = torch.randn(logdet.shape, generator=generator, dtype=logdet.dtype)
    ((z * z_weights).sum() + (logdet * logdet_weights).sum()).backward()
    inputs = [x] + ([context] if context is not None else [])
    grads = [t.grad for t in inputs] + [p.grad if p.grad is not None else torch.zeros_like(p) for p in flow.parameters()]
    return grads, rebuild_nodes(z)


def assert_same_gradients(actual: list[torch.Tensor], expected: list[torch.Tensor], rtol: float = RTOL) -> None:
    # Relative to the largest gradient: an entry whose exact gradient is 0 (a strictly
    # triangular factor's) carries round-off of that size in both computations.
    scale = max(float(g.abs().max()) for g in expected if g.numel())
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, rtol=rtol, atol=rtol * scale, msg=lambda m, i=i: f"gradient {i}: {m}")


@pytest.mark.parametrize("name", IDS)
def test_gradients_equal_ordinary_backprop(name: str) -> None:
    case = CASES[name]
    flow = build(case)
    x, context = case.sample_inputs(3)
    with torch.no_grad():
        flow(x, context)  # ActNorm's data-dependent initialization
    if approximate_inverse(flow):  # refused unless opted in: no exact rebuild to compare
        with pytest.raises(TypeError, match="whose inverse is iterative"):
            invertible_backprop(copy.deepcopy(flow))
        return
    saving = rewrite(copy.deepcopy(flow))
    expected, none = gradients(flow, x, context)
    actual, runs = gradients(saving, x, context)
    assert none == 0
    assert runs >= 1 or not list(_steps(saving, "flow")), "the memory-saving path was not taken"
    assert_same_gradients(actual, expected)


def test_a_wrong_inverse_gives_wrong_gradients() -> None:
    class LeakyActNorm(flows.ActNorm):  # an inverse off by 1e-6 relative
        def inverse(self, y, context=None):
            x, logdet = super().inverse(y, context)
            return x * (1 + 1e-6), logdet

    stack = flows.Sequential(flows.AffineCoupling(3, MLP), LeakyActNorm(3))
    x = torch.randn(5, 3)
    stack(x)
    perturb(stack)
    expected, _ = gradients(stack, x, None)
    actual, _ = gradients(invertible_backprop(copy.deepcopy(stack)), x, None)
    with pytest.raises(AssertionError, match="not close"):
        assert_same_gradients(actual, expected)


def test_density_model_gradients_and_state_dict_keys() -> None:
    model = models.Glow((3, 8, 8), 256, num_scales=2, num_steps=3, hidden_features=8).double()
    perturb(model, 0.05)
    x = torch.rand(4, 3, 8, 8) * 256
    with torch.no_grad():
        model.log_prob(x)
    saving = invertible_backprop(copy.deepcopy(model))
    assert saving.state_dict().keys() == model.state_dict().keys()
    grads = []
    for m in (model, saving):
        m.zero_grad(set_to_none=True)
        m.log_prob(x).sum().backward()
        grads.append([p.grad for p in m.parameters()])
    assert_same_gradients(grads[1], grads[0])
    bare = invertible_backprop(flows.FlowDistribution(flows.ActNorm(2), flows.StandardNormal((2,))))
    assert isinstance(bare.transform, InvertibleSequential)
    fresh = invertible_backprop(models.Glow((3, 8, 8), 256, num_scales=2, num_steps=3, hidden_features=8).double())
    fresh.load_state_dict(model.state_dict())  # checkpoints move freely between the two
    torch.testing.assert_close(fresh.log_prob(x), model.log_prob(x), rtol=0, atol=0)


def glow_steps(channels: int, num_steps: int, hidden: int = 8, **net) -> list[flows.Flow]:
    conv = partial(GlowConvNet, hidden_features=hidden, **net)
    layers: list[flows.Flow] = []
    for _ in range(num_steps):
        layers += [flows.ActNorm(channels), flows.InvConv1x1(channels), flows.AffineCoupling(channels, conv, scale="sigmoid")]
    return layers


def saved_tensors(flow: flows.Flow, x: torch.Tensor) -> int:
    count = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal count
        count += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        flow(x)
    return count


def test_stored_tensors_do_not_grow_with_depth() -> None:
    x = torch.randn(2, 4, 4, 4, requires_grad=True)
    counts = {}
    for depth in (2, 8):
        stack = flows.Sequential(*glow_steps(4, depth))
        stack(x)  # initialization
        counts["ordinary", depth] = saved_tensors(stack, x)
        counts["saving", depth] = saved_tensors(invertible_backprop(stack, max_run_length=None), x)
    assert counts["ordinary", 8] > 3 * counts["ordinary", 2] > 0
    assert counts["saving", 2] == counts["saving", 8] == 1  # the run's output alone


def test_max_run_length_bounds_the_runs() -> None:
    stack = flows.Sequential(*glow_steps(4, 4))  # 12 steps
    x = torch.randn(2, 4, 4, 4)
    stack(x)
    perturb(stack, 0.1)
    flow = invertible_backprop(copy.deepcopy(stack), max_run_length=5)
    assert saved_tensors(flow, x.requires_grad_(True)) == 3  # runs of 5, 5 and 2 steps: one output each
    expected, _ = gradients(stack, x, None)
    actual, runs = gradients(flow, x, None)
    assert runs == 3
    assert_same_gradients(actual, expected)
    with pytest.raises(ValueError, match="invertible_backprop expects max_run_length >= 1 or None, got 0"):
        invertible_backprop(stack, max_run_length=0)


def test_refuses_a_layer_without_inverse_and_leaves_the_flow_unchanged() -> None:
    class ForwardOnly(flows.Flow):
        def forward(self, x, context=None):
            return x * 2, torch.full(x.shape[:1], x[0].numel() * 0.6931)

    inner = flows.Sequential(flows.ActNorm(2), ForwardOnly())
    flow = flows.Sequential(flows.ActNorm(4), flows.Split(inner, 4))
    message = r"got ForwardOnly at Sequential\.flows\.1\.flow\.flows\.1, whose inverse raises InverseNotAvailable"
    with pytest.raises(TypeError, match=message):
        invertible_backprop(flow)
    assert type(flow[1].flow) is flows.Sequential
    with pytest.raises(TypeError, match=r"got ForwardOnly at flows\.0, whose inverse raises"):
        InvertibleSequential(ForwardOnly())
    assert inverse_kind(ForwardOnly()) == "none"


def test_refuses_an_iterative_inverse_unless_allowed() -> None:
    maf = flows.MaskedAffineAutoregressive(3, 8)
    message = r"got MaskedAffineAutoregressive at Sequential\.flows\.1, whose inverse is iterative .* allow_iterative_inverse=True"
    with pytest.raises(TypeError, match=message):
        invertible_backprop(flows.Sequential(flows.ActNorm(3), maf))
    assert isinstance(invertible_backprop(flows.Sequential(maf), allow_iterative_inverse=True), InvertibleSequential)
    # IAF's inverse is MAF's one-pass forward: accepted as it is.
    assert inverse_kind(flows.Inverse(maf)) == "exact" and inverse_kind(maf) == "iterative"
    invertible_backprop(flows.Sequential(flows.Inverse(maf)))
    with pytest.raises(TypeError, match="expects a flows.Flow or FlowDistribution, got Linear"):
        invertible_backprop(nn.Linear(2, 2))


def test_actnorm_initializes_on_an_ordinary_first_call() -> None:
    flow = invertible_backprop(flows.Sequential(flows.ActNorm(3), flows.AffineCoupling(3, MLP)))
    x = (torch.randn(16, 3) * 4 + 2).requires_grad_(True)
    z, _ = flow(x)
    assert rebuild_nodes(z) == 0 and flow[0].is_initialized
    reference = flows.ActNorm(3)
    reference(x)
    torch.testing.assert_close(flow[0].bias, reference.bias, rtol=0, atol=0)
    z, _ = flow(x)
    assert rebuild_nodes(z) == 1


def test_no_grad_or_nothing_to_differentiate_runs_plainly() -> None:
    stack = flows.Sequential(*glow_steps(4, 2))
    x = torch.randn(2, 4, 4, 4)
    stack(x)
    flow = invertible_backprop(stack)
    with torch.no_grad():
        assert flow(x.requires_grad_(True))[0].grad_fn is None
    flow.requires_grad_(False)
    z, _ = flow(x.detach())
    assert z.grad_fn is None and saved_tensors(flow, x.detach()) == 0


def dropout_stack() -> flows.Flow:
    net = partial(MLP, hidden_features=16, dropout=0.5)
    stack = flows.Sequential(
        flows.AffineCoupling(4, net), flows.Reverse(), flows.Inverse(flows.AffineCoupling(4, net, parity=1))
    )
    perturb(stack)  # the zero-initialized last layers would hide the dropout
    return stack


def test_dropout_replays_in_the_rerun() -> None:
    stack = dropout_stack()
    x = torch.randn(8, 4)
    grads, after = [], []
    for flow in (stack, invertible_backprop(copy.deepcopy(stack))):
        torch.manual_seed(5)
        grads.append(gradients(flow, x, None)[0])
        after.append(torch.rand(3))  # the global generator continues as after an ordinary step
    assert_same_gradients(grads[1], grads[0])
    torch.testing.assert_close(after[1], after[0], rtol=0, atol=0)
    # Without replay the re-run draws other masks: the test can fail.
    torch.manual_seed(5)
    unreplayed, _ = gradients(invertible_backprop(copy.deepcopy(stack), preserve_rng_state=False), x, None)
    assert not torch.allclose(unreplayed[0], grads[0][0])


def test_a_coupling_runs_its_conditioner_once_in_the_backward() -> None:
    coupling = flows.AffineCoupling(4, MLP)
    calls = []
    coupling.subnet.register_forward_hook(lambda *args: calls.append(torch.is_grad_enabled()))
    flow = invertible_backprop(coupling)
    flow(torch.randn(3, 4, requires_grad=True))[0].sum().backward()
    assert calls == [False, True]  # forward without recording, then one re-run


def test_drift_monitor_records_the_largest_reconstruction_error() -> None:
    torch.set_default_dtype(torch.float32)
    stack = flows.Sequential(*glow_steps(4, 6))
    x = torch.randn(4, 4, 4, 4)
    stack(x)
    perturb(stack, 0.1)
    monitor = DriftMonitor()
    assert monitor.read() == 0.0 and monitor.max_error is None
    flow = invertible_backprop(stack, monitor=monitor)
    z, logdet = flow(x.requires_grad_(True))
    (z.sum() + logdet.sum()).backward()
    with torch.no_grad():
        expected = float((flow.inverse(z)[0] - x).abs().max())
    assert 0 < expected < 1e-4
    assert monitor.read() == pytest.approx(expected, rel=0.5)
    first = monitor.max_error
    flow(x * 0)[0].sum().backward()  # a smaller error does not lower the maximum
    assert monitor.max_error.item() == first.item()
    assert monitor.read(reset=True) > 0 and monitor.max_error is None


@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_float32_and_bf16_gradients_within_stated_bounds(amp: torch.dtype | None) -> None:
    torch.set_default_dtype(torch.float32)
    stack = flows.Sequential(*glow_steps(4, 8, hidden=16))
    x = torch.randn(8, 4, 8, 8)
    stack(x)
    perturb(stack, 0.05)
    grads = []
    for flow in (stack, invertible_backprop(copy.deepcopy(stack))):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp is not None):
            z, logdet = flow(x)
            loss = 0.5 * z.float().square().sum() - logdet.sum()
        flow.zero_grad(set_to_none=True)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in flow.parameters()]))
    # Normwise, against ordinary backpropagation in the same precision; measured 4e-7 and
    # 1.4e-2 (bf16 against float32 is itself 3.5e-2 here). See benchmarks/invertible_drift.py.
    error = float((grads[1] - grads[0]).norm() / grads[0].norm())
    assert error < (1e-5 if amp is None else 5e-2)


def test_inverse_direction_saves_memory_too() -> None:
    stack = flows.Sequential(*glow_steps(4, 2))
    y = torch.randn(3, 4, 4, 4)
    stack(y)
    perturb(stack)
    expected, _ = gradients(flows.Inverse(stack), y, None)
    actual, runs = gradients(flows.Inverse(invertible_backprop(copy.deepcopy(stack))), y, None)
    assert runs == 1
    assert_same_gradients(actual, expected)


def test_torch_func_transforms_see_the_ordinary_composition() -> None:
    stack = flows.Sequential(flows.ActNorm(3), flows.AffineCoupling(3, MLP))
    x = torch.randn(4, 3)
    stack(x)
    perturb(stack)
    saving = invertible_backprop(copy.deepcopy(stack))

    def score(flow: flows.Flow) -> torch.Tensor:
        def log_p(v: torch.Tensor) -> torch.Tensor:
            z, logdet = flow(v.unsqueeze(0))
            return -0.5 * z.square().sum() + logdet.sum()

        return torch.func.vmap(torch.func.grad(log_p))(x)

    torch.testing.assert_close(score(saving), score(stack), rtol=0, atol=0)


def test_higher_order_gradients_raise() -> None:
    flow = invertible_backprop(flows.AffineCoupling(4, MLP))
    z, _ = flow(torch.randn(3, 4, requires_grad=True))
    with pytest.raises(RuntimeError, match="expects first-order gradients, got backward with create_graph=True"):
        torch.autograd.grad(z.square().sum(), list(flow.parameters()), create_graph=True)


def test_torch_compile_gives_the_same_gradients() -> None:
    torch.set_default_dtype(torch.float32)
    stack = flows.Sequential(*glow_steps(4, 2))
    x = torch.randn(3, 4, 4, 4)
    stack(x)
    perturb(stack, 0.1)
    saving = invertible_backprop(copy.deepcopy(stack))

    def loss(flow: flows.Flow, x: torch.Tensor) -> torch.Tensor:
        z, logdet = flow(x)
        return 0.5 * z.square().sum() - logdet.sum()

    expected = torch.autograd.grad(loss(stack, x), list(stack.parameters()))
    actual = torch.autograd.grad(torch.compile(partial(loss, saving))(x), list(saving.parameters()))
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4 * float(e.abs().max()))


class LogProb(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.log_prob(x)


def small_glow() -> models.Glow:
    return models.Glow((3, 8, 8), 256, num_scales=2, num_steps=2, hidden_features=8).double()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_rank(rank: int, world_size: int, port: int, path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        saved = torch.load(f"{path}/setup.pt")
        model = small_glow()
        model.load_state_dict(saved["state"])
        net = DistributedDataParallel(LogProb(invertible_backprop(model)))
        x = saved["x"].chunk(world_size)[rank]
        (-net(x).mean()).backward()
        torch.save([p.grad for p in model.parameters()], f"{path}/grads{rank}.pt")
        del net
    finally:
        dist.destroy_process_group()


def test_ddp_gradients_equal_one_process(tmp_path) -> None:
    torch.manual_seed(3)
    model = small_glow()
    perturb(model, 0.05)
    x = torch.rand(8, 3, 8, 8) * 256
    with torch.no_grad():
        model.log_prob(x)  # initialization on the whole batch, then shared
    torch.save({"state": model.state_dict(), "x": x}, tmp_path / "setup.pt")
    mp.spawn(_ddp_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    (-model.log_prob(x).mean()).backward()
    expected = [p.grad for p in model.parameters()]
    for rank in range(2):
        assert_same_gradients(torch.load(tmp_path / f"grads{rank}.pt"), expected)
