"""Compiling a Triton kernel for sm_90a without a GPU (Triton's bundled ptxas), for tests that
check what the compiler made of a main loop. Run it in a child process without TRITON_INTERPRET:
the interpreter replaces the JIT functions the compiler needs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path


def compile_sm90(fn, sig: dict, const: dict, aligned: list[str], warps: int,
                 stages: int) -> dict:
    """The kernel `fn` compiled for sm_90a with the `aligned` arguments marked 16-divisible:
    cubin registers and stack bytes, whether the main loop became async copies (pipelined) and
    wgmma, and the PTX."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(fn, {**sig, **{c: "constexpr" for c in const}}, const, attrs)
    out = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                         options={"num_warps": warps, "num_stages": stages})
    tool = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(out.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(tool), "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
    regs, stack = (int(v) for v in re.search(r"REG:(\d+).*?STACK:(\d+)", usage).groups())
    ttgir = out.asm["ttgir"]
    return {"regs": regs, "stack": stack, "pipelined": "async_copy" in ttgir,
            "wgmma": "warp_group_dot" in ttgir, "ptx": out.asm["ptx"]}


def results_in_child(module: str, call: str) -> list:
    """`[<call>(*t) for t in SM90_TILES]` of test module `module`, run in a child process without
    TRITON_INTERPRET (the interpreter, on in a CPU test process, replaces the JIT functions the
    compiler needs); pytest.skip where no sm_90 toolchain is installed."""
    import pytest

    code = (f"import json; from {module} import SM90_TILES, _compile_sm90; "
            f"print(json.dumps([{call} for t in SM90_TILES]))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                          env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0 and ("ptxas" in done.stderr or "No such file" in done.stderr):
        pytest.skip(f"no sm_90 compile toolchain here: {done.stderr[-300:]}")
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
