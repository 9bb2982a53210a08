"""The CUDA op library: a clear error where it cannot build, the JIT path where it can."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from pykernels import _ops


def test_unavailable_names_the_missing_piece():
    if torch.version.cuda is not None:
        pytest.skip("this torch has CUDA")
    ok, reason = _ops.available()
    assert not ok
    assert "CPU build" in reason and torch.__version__ in reason
    with pytest.raises(_ops.BackendUnavailable, match="CPU build"):
        _ops.load()


def test_explicit_cuda_backend_on_cpu_only_box_is_clear():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    import pykernels
    from pykernels.norm import backends

    assert "CPU build" in (backends()["cuda"] or "") or torch.version.cuda is not None
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        pykernels.rms_norm(torch.randn(2, 4), torch.ones(4), backend="cuda")


def test_sources_found():
    from pykernels import _build

    names = {p.name for p in _build.sources()}
    assert {"activation.cu", "norm.cu", "torch_bindings.cpp"} <= names


@pytest.mark.gpu
def test_jit_build_in_fresh_cache(tmp_path):
    """PYKERNELS_USE_JIT=1 ignores a prebuilt _C and compiles csrc/ into the given cache."""
    script = textwrap.dedent("""
        import torch, pykernels
        from pykernels import _ops
        from pykernels.norm.ref import rms_norm_ref
        src = _ops.load()
        assert src != "prebuilt", src
        x = torch.randn(3, 4096, dtype=torch.bfloat16, device="cuda")
        w = torch.randn(4096, dtype=torch.bfloat16, device="cuda")
        torch.testing.assert_close(pykernels.rms_norm(x, w, backend="cuda").float(),
                                   rms_norm_ref(x.float(), w.float()), atol=1e-2, rtol=1.6e-2)
        print("JIT", src)
    """)
    env = {"PYKERNELS_USE_JIT": "1", "PYKERNELS_CACHE_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"JIT {tmp_path}" in proc.stdout
