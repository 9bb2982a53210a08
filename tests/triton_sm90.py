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
    cubin registers and stack bytes, whether the main loop was pipelined (`pipelined`) and
    became wgmma, and the PTX."""
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
        usage, sass = (subprocess.run([str(tool), flag, f.name], capture_output=True, text=True,
                                      check=True).stdout
                       for flag in ("--dump-resource-usage", "-sass"))
    regs, stack = (int(v) for v in re.search(r"REG:(\d+).*?STACK:(\d+)", usage).groups())
    ttgir = out.asm["ttgir"]
    return {"regs": regs, "stack": stack, "pipelined": pipelined(ttgir),
            "wgmma": "warp_group_dot" in ttgir, "ptx": out.asm["ptx"],
            "hazards": wgmma_register_hazards(sass), "rings": ring_depths(ttgir)}


def ring_depths(ttgir: str) -> list[int]:
    """The buffer counts of the mutable 3-D shared allocations (a pipelined tile's ring:
    `memdesc<3x64x128xbf16, ..., mutable>` is 3 buffers of a 64 x 128 tile), sorted."""
    return sorted(int(n) for n in re.findall(
        r"ttg\.local_alloc\s*:\s*\(\)\s*->\s*!ttg\.memdesc<(\d+)x\d+x\d+x\w+,[^>]*mutable>", ttgir))


def pipelined(ttgir: str) -> bool:
    """Loads in flight across K steps: cp.async copies (triton emits them only for a pipelined
    loop), or TMA copies into a ring of stage buffers (an unpipelined TMA load is one copy
    into one buffer, waited for at once: no `memdesc_index` into a ring)."""
    return "async_copy" in ttgir or ("async_tma_copy" in ttgir and "memdesc_index" in ttgir)


def wgmma_register_hazards(sass: str) -> list[str]:
    """Instructions that write an A-operand register of a register-operand wgmma (HGMMA) still
    in flight: from each such HGMMA on, through one loop back-edge, until a WARPGROUP.DEPBAR
    retires its group (`DEPBAR.LE gsb0, n` retires it once n groups were committed after it).
    PTX leaves those registers undefined until the wait; triton 3.6 let ptxas load the next K
    step's weight into them (inf in 7% of an FP8 GEMM's outputs on an H200, docs/quant.md)."""
    code = [(int(a, 16), t) for a, t in
            re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*?)\s*;", sass)]
    at = {a: i for i, (a, _) in enumerate(code)}
    found = []
    for i, (addr, text) in enumerate(code):
        a = re.search(r"HGMMA\.\S+\s+R\d+,\s*R(\d+)", text)
        if not a:
            continue
        regs = {f"R{int(a.group(1)) + r}" for r in range(4)}
        closed, after, j, back_taken = "gsb0" in text, 0, i + 1, False
        while j < len(code):
            b, t = code[j]
            if "HGMMA" in t and "gsb0" in t:
                after, closed = after + closed, True
            dep = re.search(r"WARPGROUP\.DEPBAR\.LE gsb0, 0x([0-9a-f]+)", t)
            if dep and closed and after >= int(dep.group(1), 16):
                break
            dst = re.match(r"(?:@!?U?P\w+\s+)?([\w.]+)\s+R(\d+)\b", t)
            if "HGMMA" not in t and dst and regs & _written(*dst.groups()):
                found.append(f"{addr:#x} {text} <- {b:#x} {t}")
                break
            br = re.match(r"(?:@!?U?P\w+\s+)?BRA\s+(0x[0-9a-f]+)", t)
            if br and not back_taken and int(br.group(1), 16) < b:
                j, back_taken = at[int(br.group(1), 16)], True
                continue
            j += 1
    return found


def _written(opcode: str, first: str) -> set[str]:
    """The registers an instruction's destination R<first> covers (LDS.64 and IMAD.WIDE write a
    pair, LDS.128 four)."""
    width = 4 if ".128" in opcode else 2 if (".64" in opcode or ".WIDE" in opcode) else 1
    return {f"R{int(first) + r}" for r in range(width)}


def results_in_child(module: str, call: str, tiles: str = "SM90_TILES",
                     fn: str = "_compile_sm90") -> list:
    """`[<call>(*t) for t in <tiles>]` of test module `module`, run in a child process without
    TRITON_INTERPRET (the interpreter, on in a CPU test process, replaces the JIT functions the
    compiler needs); pytest.skip where no sm_90 toolchain is installed."""
    import pytest

    code = (f"import json; from {module} import {tiles}, {fn}; "
            f"print(json.dumps([{call} for t in {tiles}]))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                          env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0 and ("ptxas" in done.stderr or "No such file" in done.stderr):
        pytest.skip(f"no sm_90 compile toolchain here: {done.stderr[-300:]}")
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
