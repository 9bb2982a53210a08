"""Fixtures of the bench harness tests (helpers live in bench_fakes.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A results root in a tmp folder: no test writes into the repository's results/."""
    return tmp_path / "results"
