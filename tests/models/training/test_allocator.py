"""Tests of models/training/allocator.py: the host-memory setting of train.py.

Each test runs in a subprocess: the setting is process-wide (glibc's malloc), and would
otherwise change the allocator of every test after it in the pytest process.
"""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Frees and reallocates 64 MB blocks, as a training step frees and reallocates its
# tensors, and prints the page faults of the second round. 64 MB is above the largest
# threshold glibc picks by itself (32 MB), so by default every block is a fresh mmap.
CHURN = """
import resource, sys, torch
from models.training.allocator import reuse_freed_memory
if sys.argv[1] == "reuse":
    assert reuse_freed_memory()
def churn():
    for _ in range(5):
        torch.empty(16 << 20).fill_(1.0)
churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

APPLIES = "from models.training.allocator import reuse_freed_memory; print(reuse_freed_memory())"


def _python(*args: str) -> str:
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            check=True)
    return result.stdout.split()[-1]


def test_reuse_freed_memory_says_whether_it_applies() -> None:
    assert _python("-c", APPLIES) == str(GLIBC)


@pytest.mark.skipif(not GLIBC, reason="the setting is glibc's")
def test_reused_memory_is_not_faulted_in_again() -> None:
    # Measured: 81,925 faults by default (5 blocks of 16,384 pages of 4 kB), 0 with the
    # setting. With transparent huge pages a block takes 32 faults, so the bound is loose.
    default, reuse = int(_python("-c", CHURN, "default")), int(_python("-c", CHURN, "reuse"))
    assert default > 100 and reuse * 10 < default, (default, reuse)
