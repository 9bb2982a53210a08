"""The four top-level packages are importable and their entry points run from any directory."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest


@pytest.mark.parametrize("package", ["pykernels", "autotune", "bench", "serving"])
def test_importable(package):
    importlib.import_module(package)


def test_pykernels_import_is_light():
    code = ("import sys, pykernels, pykernels.envs; "
            "heavy = [m for m in ('torch', 'triton', 'pykernels.norm') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("argv", [["serving"], ["pykernels.envs"]])
def test_entry_points_run_from_any_directory(tmp_path, argv):
    proc = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip()
