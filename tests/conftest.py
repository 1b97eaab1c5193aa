"""Shared pytest configuration: markers and environment for the whole suite."""

from __future__ import annotations

import os

import pytest

# Keep the 2-core CI machine responsive: one intra-op thread pool of at most 2.
os.environ.setdefault("OMP_NUM_THREADS", "2")

from cvserve.models import compat

# The suite imports detectron2-based modules directly: apply the v0.6 layer once, first.
compat.apply()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
