"""Compiling a Triton kernel for sm_90a without a GPU (Triton's bundled ptxas), for tests that
check what the compiler made of a main loop. Run it in a child process without TRITON_INTERPRET:
the interpreter replaces the JIT functions the compiler needs."""

from __future__ import annotations

import re
import subprocess
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
