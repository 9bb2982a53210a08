"""Shared test setup: gpu marker auto-skip, Triton interpreter on CPU-only machines, seeded RNG."""

from __future__ import annotations

import os
import zlib

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

# Without a GPU, Triton kernels can only run through the interpreter, which Triton reads when a
# kernel module is imported: set it before any test module imports one.
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed(request):
    # A distinct, reproducible seed per test: fresh inputs everywhere, same inputs on a rerun.
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    yield


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    """PYKERNELS_CACHE_DIR pointed at a fresh folder, so no test touches the user's cache."""
    monkeypatch.setenv("PYKERNELS_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"
