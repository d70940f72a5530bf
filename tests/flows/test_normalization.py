"""ActNorm: data-dependent initialization, its persistence, and its multi-process averaging."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import flows


def test_initialization_standardizes_each_channel() -> None:
    x = torch.randn(64, 3, 4, 4) * torch.tensor([1.0, 5.0, 0.1]).view(1, 3, 1, 1) + 7.0
    layer = flows.ActNorm(3)
    y, logdet = layer(x)
    torch.testing.assert_close(y.mean((0, 2, 3)), torch.zeros(3), rtol=0, atol=1e-12)
    torch.testing.assert_close(y.var((0, 2, 3), unbiased=False), torch.ones(3), rtol=0, atol=1e-12)
    expected = -16 * torch.log(x.std((0, 2, 3), unbiased=False)).sum()
    torch.testing.assert_close(logdet, expected.expand(64), rtol=1e-12, atol=1e-12)


def test_constant_channel_initializes_without_nan() -> None:
    x = torch.randn(8, 2, 3, 3)
    x[:, 1] = 4.0
    layer = flows.ActNorm(2)
    y, logdet = layer(x)
    assert torch.isfinite(y).all() and torch.isfinite(logdet).all()
    assert layer.log_scale[1] == 0 and torch.all(y[:, 1] == 0)


def test_initializes_once_and_only_in_training_mode() -> None:
    layer = flows.ActNorm(2)
    layer.eval()
    layer(torch.randn(4, 2) * 3)
    assert not layer.is_initialized and torch.all(layer.log_scale == 0)
    layer.train()
    layer(torch.randn(16, 2) * 3 + 1)
    assert layer.is_initialized and bool(layer.initialized)
    bias = layer.bias.detach().clone()
    layer(torch.randn(16, 2) * 10)
    torch.testing.assert_close(layer.bias.detach(), bias, rtol=0, atol=0)


def test_explicit_initialize() -> None:
    layer = flows.ActNorm(3)
    x = torch.randn(32, 3) * 2 + 1
    layer.initialize(x)
    assert layer.is_initialized
    y, _ = layer(x)
    torch.testing.assert_close(y.mean(0), torch.zeros(3), rtol=0, atol=1e-12)


def test_loaded_state_is_not_reinitialized() -> None:
    trained = flows.ActNorm(3)
    trained(torch.randn(16, 3) * 4 + 2)
    fresh = flows.ActNorm(3)
    fresh.load_state_dict(trained.state_dict())
    assert fresh.is_initialized
    x = torch.randn(5, 3) * 100
    torch.testing.assert_close(fresh(x)[0], trained(x)[0], rtol=0, atol=0)


def test_uninitialized_state_loads_as_uninitialized() -> None:
    fresh = flows.ActNorm(3)
    fresh.load_state_dict(flows.ActNorm(3).state_dict())
    assert not fresh.is_initialized


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (torch.randn(2, 3, 4), r"ActNorm expects input of rank 2 \(B, D\) or rank 4 \(B, C, H, W\), got shape \(2, 3, 4\)"),
        (torch.randn(2, 4), r"ActNorm expects 3 features on dim 1, got input of shape \(2, 4\)"),
    ],
)
def test_bad_input(x: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        flows.ActNorm(3)(x)


def test_integer_input_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="ActNorm expects a floating-point tensor, got dtype torch.int64"):
        flows.ActNorm(3)(torch.ones(2, 3, dtype=torch.long))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_on_rank(rank: int, world_size: int, port: int, path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.set_default_dtype(torch.float64)
        generator = torch.Generator().manual_seed(100 + rank)
        # Each rank sees different data; rank 1's is shifted and wider.
        x = torch.randn(10, 2, 3, 3, generator=generator) * (1 + rank) + 3 * rank
        layer = flows.ActNorm(2)
        layer(x)
        torch.save({"state": layer.state_dict(), "x": x}, f"{path}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_initialization_is_averaged_over_processes(tmp_path) -> None:
    mp.spawn(_init_on_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for key in ("bias", "log_scale"):
        torch.testing.assert_close(results[0]["state"][key], results[1]["state"][key], rtol=0, atol=0)
    # The shared statistics are those of the union of both ranks' data.
    union = torch.cat([r["x"] for r in results])
    single = flows.ActNorm(2)
    single(union)
    torch.testing.assert_close(results[0]["state"]["bias"], single.bias.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(results[0]["state"]["log_scale"], single.log_scale.detach(), rtol=1e-12, atol=1e-12)
