"""Shared test set-up: a fixed seed per test, float64 by default, a --device option."""

from __future__ import annotations

import pathlib
import sys

import pytest
import torch

# models/ and train.py are used from the repository root, not installed.
ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", default="cpu", help="device for tests that take one (cpu, cuda)")


@pytest.fixture(autouse=True)
def _seed_and_dtype():
    """Every test starts from seed 0 in float64, and leaves the defaults as it found them."""
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture
def one_thread():
    """One intra-op thread for tests of tiny tensors, restored afterwards: on a loaded 2-core
    machine a parallel region waits for a busy core (a 2x3x3 conv took 30 ms with 2 threads,
    5 us with 1). Use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def device(request: pytest.FixtureRequest) -> torch.device:
    name = request.config.getoption("--device")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    return torch.device(name)
