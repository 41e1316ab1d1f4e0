from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/upstream.py

from indicf5.checkpoint import load_checkpoint  # noqa: E402
from indicf5.synthetic import make_synthetic  # noqa: E402


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="session")
def snapshot(tmp_path_factory) -> Path:
    """A synthetic IndicF5 snapshot at the default (small) sizes; treat it as read-only."""
    return make_synthetic(tmp_path_factory.mktemp("synthetic") / "IndicF5")


@pytest.fixture(scope="session")
def checkpoint(snapshot):
    return load_checkpoint(snapshot)
