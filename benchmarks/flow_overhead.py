"""Flow overhead: a Glow training step against the same subnetworks run alone.

Glow on 3x32x32 (3 levels, 8 steps per level, hidden 128), batch 32. The baseline
runs every coupling network and split prior of that model, alone, on random tensors of
the shapes they see inside the flow, with the same loss-backward-step (train.py's
optimizer). The ratio is
what the flow itself (ActNorm, 1x1 convolutions, squeezes, splits, log-dets, the
preprocessing and the base density) costs on top. Target: at most 1.15 on CPU.

Both run with the host-memory setting train.py uses (``models.training.allocator``), unless
``--glibc-defaults`` is given; ``--compile`` puts both losses through ``torch.compile``
(as ``train.py --compile`` does the model's; about 2 minutes of compiling first).

    python benchmarks/flow_overhead.py [--glibc-defaults] [--compile]
"""

from __future__ import annotations

import pathlib
import statistics
import sys

import torch
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import flows  # noqa: E402
from benchmarks.timing import machine, median_seconds  # noqa: E402
from models import Glow  # noqa: E402
from models import training  # noqa: E402
from models.training.allocator import reuse_freed_memory  # noqa: E402

ROUNDS = 15


def subnetworks(model: nn.Module) -> list[nn.Module]:
    """Every coupling network and split prior in the model."""
    nets = [m.subnet for m in model.modules() if isinstance(m, flows.Coupling)]
    return nets + [m.prior for m in model.modules() if isinstance(m, flows.Split) and m.prior is not None]


def input_shapes(model: nn.Module, nets: list[nn.Module], x: torch.Tensor) -> list[torch.Size]:
    """The input shape each subnetwork sees during a forward pass of the model."""
    shapes: dict[int, torch.Size] = {}
    hooks = [net.register_forward_hook(lambda m, args, out, i=i: shapes.__setitem__(i, args[0].shape)) for i, net in enumerate(nets)]
    with torch.no_grad():
        model.log_prob(x)
    for hook in hooks:
        hook.remove()
    return [shapes[i] for i in range(len(nets))]


def main() -> None:
    allocator = "glibc defaults"
    if "--glibc-defaults" not in sys.argv[1:] and reuse_freed_memory():
        allocator = "freed memory reused (models.training.allocator, as train.py)"
    torch.manual_seed(0)
    model = Glow((3, 32, 32), num_levels=256, num_scales=3, num_steps=8, hidden_features=128)
    x = torch.rand(32, 3, 32, 32) * 256
    nets = subnetworks(model)
    shapes = input_shapes(model, nets, x)  # also initializes ActNorm
    # Inside the flow every subnetwork's input depends on parameters, so its backward
    # computes input gradients too; the baseline does the same work.
    inputs = [torch.randn(shape, requires_grad=True) for shape in shapes]
    # train.py's optimizer on both sides (fused Adam where torch has it).
    flow_optimizer = training.build_optimizer(model, 1e-4)
    net_optimizer = training.build_optimizer([p for net in nets for p in net.parameters()], 1e-4)

    def flow_loss() -> torch.Tensor:
        return -model.log_prob(x).mean()

    def subnet_loss() -> torch.Tensor:
        return sum(net(h).square().mean() for net, h in zip(nets, inputs))

    compiled = "--compile" in sys.argv[1:]
    if compiled:
        flow_loss, subnet_loss = torch.compile(flow_loss), torch.compile(subnet_loss)

    def flow_step() -> None:
        flow_optimizer.zero_grad(set_to_none=True)
        flow_loss().backward()
        flow_optimizer.step()

    def subnet_step() -> None:
        net_optimizer.zero_grad(set_to_none=True)
        subnet_loss().backward()
        net_optimizer.step()

    # Interleave the two so that drifts in machine load (a shared VM) hit both alike, and
    # take the median over rounds of the ratio measured within each round.
    flow_times, net_times = [], []
    for _ in range(ROUNDS):
        flow_times.append(median_seconds(flow_step, repeats=1, warmup=1))
        net_times.append(median_seconds(subnet_step, repeats=1, warmup=1))
    ratios = sorted(f / n for f, n in zip(flow_times, net_times))
    quartiles = statistics.quantiles(ratios, n=4)
    print(f"machine: {machine()}")
    print(f"Glow 3x32x32, 3 levels x 8 steps, hidden 128, batch 32, {len(nets)} subnetworks, {ROUNDS} rounds; "
          f"host memory: {allocator}; {'torch.compile' if compiled else 'eager'}")
    print(f"training step: flow {statistics.median(flow_times) * 1e3:.0f} ms, subnetworks alone "
          f"{statistics.median(net_times) * 1e3:.0f} ms, ratio {statistics.median(ratios):.3f} "
          f"(quartiles {quartiles[0]:.3f}-{quartiles[2]:.3f}; target <= 1.15)")


if __name__ == "__main__":
    main()
