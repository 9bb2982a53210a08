"""The CUDA launchers' own input checks (csrc/common/checks.h), called through torch.ops directly,
bypassing the Python checks: each bad call must raise the named Python exception.

The calls run in a child process so that a crash in a launcher fails this test with the child's
traceback instead of killing the whole pytest session.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import faulthandler, json, sys, torch
    faulthandler.enable()
    import pykernels.activation.cuda, pykernels.norm.cuda
    ops = torch.ops.pykernels
    x = torch.randn(4, 8, device="cuda")
    xb = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
    wb = torch.randn(64, device="cuda", dtype=torch.bfloat16)
    cases = {
        "silu dtype": lambda: ops.silu_and_mul(torch.empty(4, 4, device="cuda").half(), x),
        "silu shape": lambda: ops.silu_and_mul(torch.empty(4, 5, device="cuda"), x),
        "silu odd": lambda: ops.silu_and_mul(torch.empty(4, 3, device="cuda"), x[:, :7]),
        "silu device": lambda: ops.silu_and_mul(torch.empty(4, 4, device="cuda"), x.cpu()),
        "silu last dim": lambda: ops.silu_and_mul(torch.empty(4, 4, device="cuda"),
                                                  torch.randn(8, 4, device="cuda").t()),
        "norm weight": lambda: ops.rms_norm(torch.empty_like(xb), xb, wb[:32], 1e-6),
        "norm dtype": lambda: ops.rms_norm(xb.int(), xb.int(), wb, 1e-6),
        "norm out": lambda: ops.rms_norm(torch.empty(3, 64, device="cuda",
                                                     dtype=torch.bfloat16), xb, wb, 1e-6),
        "fused residual": lambda: ops.fused_add_rms_norm(xb, xb[:2].clone(), wb, 1e-6),
        "fused weight dtype": lambda: ops.fused_add_rms_norm(xb, xb.clone(), wb.half(), 1e-6),
    }
    out = {}
    for name, call in cases.items():
        print("case", name, flush=True, file=sys.stderr)
        try:
            call()
            out[name] = ["no error", ""]
        except Exception as err:
            out[name] = [type(err).__name__, str(err).splitlines()[0]]
    print(json.dumps(out))
""")

EXPECTED = {
    "silu dtype": ("TypeError", "out and input must have the same dtype"),
    "silu shape": ("ValueError", "out must have shape"),
    "silu odd": ("ValueError", "must be even, got 7"),
    "silu device": ("ValueError", "input must be a CUDA tensor"),
    "silu last dim": ("ValueError", "input must have a contiguous last dimension"),
    "norm weight": ("ValueError", "weight must have shape [64]"),
    "norm dtype": ("TypeError", "input must be bfloat16, float16 or float32"),
    "norm out": ("ValueError", "out must have the shape of input"),
    "fused residual": ("ValueError", "residual must have the shape of input"),
    "fused weight dtype": ("TypeError", "weight and input must have the same dtype"),
}


@pytest.mark.gpu
def test_launchers_raise_named_errors():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"launcher check crashed:\n{proc.stderr[-6000:]}"
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, (kind, message) in EXPECTED.items():
        assert got[name][0] == kind, (name, got[name])
        assert message in got[name][1], (name, got[name])
