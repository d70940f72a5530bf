"""Root pytest set-up: doctests in flows/ and models/ start from a fixed seed too."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _doctest_seed(doctest_namespace: dict) -> None:
    torch.manual_seed(0)
