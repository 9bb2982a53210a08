"""On the GPU: real timings (bench.timing, CUDA graphs), real kernels, the CLI end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import autotune
from autotune import tune

pytestmark = pytest.mark.gpu


def test_rms_norm_real_tune_and_launch():
    from autotune import norm
    from pykernels.norm import ref
    from pykernels.norm import triton as kern

    spec = norm.FAMILY.ops["rms_norm"]
    shape = {"hidden": 4096, "dtype": "bfloat16", "tokens": 64}
    report = tune(spec.tunable, spec.space, [shape], lambda s: spec.make_case(s, "cuda"))
    e = report.results[0].entry
    assert report.results[0].status == "tuned" and e["timing_method"] in ("graph", "events")
    assert e["time_us"] <= e["default_us"] and e["measured"] >= 2
    x = torch.randn(64, 4096, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(4096, dtype=torch.bfloat16, device="cuda")
    out = torch.empty_like(x)
    assert spec.tunable.lookup(tokens=64, hidden=4096, dtype=x.dtype) == e["config"]
    kern.rms_norm(out, x, w, 1e-6)
    torch.testing.assert_close(out, ref.rms_norm_ref(x, w, 1e-6), atol=2e-2, rtol=2e-2)


def test_gemm_like_prefetch_on_gpu(monkeypatch):
    from tests.autotune import gemm_kernel

    shape = {"M": 64, "N": 64, "K": 256, "dtype": "float16"}
    report = tune(gemm_kernel.TINY_GEMM, gemm_kernel.SPACE, [shape],
                  lambda s: gemm_kernel.make_case(s, "cuda"))
    e = report.results[0].entry
    assert isinstance(e["config"]["prefetch"], bool)
    measured = {(c["prefetch"], c["num_stages"]) for c, _ in e["timings"]}
    assert {(True, 3), (False, 1)} <= measured  # both settings searched (+ the default's 2)
    monkeypatch.setenv("TRITON_DISABLE_MACA_OPT_MMA_PREFETCH", "1")
    autotune.invalidate()
    cfg = gemm_kernel.TINY_GEMM.lookup(M=64, N=64, K=256, dtype=torch.float16)
    assert cfg["prefetch"] is False and cfg["num_stages"] == 1
    a = torch.randn(64, 256, dtype=torch.float16, device="cuda")
    b = torch.randn(256, 64, dtype=torch.float16, device="cuda")
    c = torch.empty(64, 64, dtype=torch.float16, device="cuda")
    gemm_kernel.matmul(a, b, c)
    torch.testing.assert_close(c, (a.float() @ b.float()).half(), atol=1e-1, rtol=1e-2)


def test_cli_end_to_end(tmp_path):
    env = {**os.environ, "PYKERNELS_CACHE_DIR": str(tmp_path / "cache")}
    report = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "autotune.norm", "--model", "qwen3-0.6b", "--op", "rms_norm",
           "--batch-sizes", "1,64", "--budget", "120", "--no-progress", "--report", str(report)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    body = json.loads(report.read_text())
    assert [r["status"] for r in body["reports"][0]["results"]] == ["tuned", "tuned"]
    assert (tmp_path / "cache" / "autotune" / "rms_norm.json").exists()


def test_real_flashinfer_signature():
    autotuner = pytest.importorskip("flashinfer.autotuner")
    import inspect

    assert "cache" in inspect.signature(autotuner.autotune).parameters
    from autotune.fi import flashinfer_autotune

    with flashinfer_autotune() as path:
        assert path.parent.name == "autotune"
