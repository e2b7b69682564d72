"""Shared test set-up: tiny tensors run fastest (and most predictably under load) on one
thread; matplotlib never opens a window; the tiny model and its tokens are built once per
test module (builders in ``builders.py``)."""

import os

import matplotlib
import pytest
import torch
from builders import tiny_model

matplotlib.use("Agg")
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model():
    """``tiny_model()``: module-scoped, so tests that modify it restore it (or build their own)."""
    return tiny_model()


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    """4 sequences of 12 tokens from the tiny model's vocabulary of 50."""
    return torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(0))
