"""Shared test setup: CPU-only DeepSpeed, deterministic torch."""

import os

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(autouse=True)
def _deterministic_torch():
    """Every test starts from the same global RNG state and deterministic kernels."""
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)
