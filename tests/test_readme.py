"""The README's Python blocks run as written."""

from __future__ import annotations

import pathlib
import re

import pytest
import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index: int) -> None:
    torch.set_default_dtype(torch.float32)  # as a reader's session would be
    exec(compile(BLOCKS[index], f"README.md block {index}", "exec"), {})


def test_readme_has_blocks() -> None:
    assert len(BLOCKS) >= 2
