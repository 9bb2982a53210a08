"""Autotune tests: every test gets its own cache folder, no shipped configs, fresh memo and
fresh once-only log keys, so no test sees another's state or the user's ~/.cache."""

from __future__ import annotations

import functools
import os

import pytest
import torch

# The root conftest does this too; repeated here so `pytest tests/autotune` alone works.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import autotune  # noqa: E402
from autotune import env  # noqa: E402
from tests.autotune.autotune_helpers import default_cfg, isolated_cache  # noqa: E402


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    with isolated_cache(tmp_path, monkeypatch) as folder:
        yield folder


@pytest.fixture
def fake_tunable():
    return autotune.Tunable("fake_op", family="fake", key=("n", "dtype"), bucket="tokens",
                            default=default_cfg)


@pytest.fixture
def fake_space():
    return autotune.Space({"BLOCK": [32, 128, 256], "num_warps": [4]})


@pytest.fixture
def on_gpu(monkeypatch):
    """Pretend this process runs on the given GPU, or on the CPU with use("cpu", cc=None)
    (metadata only: nothing is launched)."""
    def use(name, cc="9.0"):
        fake = functools.lru_cache(maxsize=None)(
            lambda device_index=None: {"gpu": name, "compute_capability": cc})
        monkeypatch.setattr(env, "device_fields", fake)
        autotune.invalidate()
    return use
