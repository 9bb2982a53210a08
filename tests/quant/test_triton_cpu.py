"""The Triton FP8 W8A16 GEMM under the interpreter (CPU-only machines), tiny shapes, fp16/fp32 x
(the interpreter's bf16 dot is broken): against ref.gemm per channel and per group, several tiles
per axis, split-K with both reductions, stages, strided x and out, NaN around x; configs; and a
compile for sm_90a (no GPU needed) so a tile that cannot pipeline or spills shows before a GPU
run."""

from __future__ import annotations

import pytest
import torch

from pykernels.quant import ref
from pykernels.quant import triton as tq
from tests.quant._cases import TOL, close, make_weight, make_x, own_cache, poisoned  # noqa: F401

pytestmark = [pytest.mark.skipif(torch.cuda.is_available(),
                                 reason="interpreter tests are for CPU-only machines"),
              pytest.mark.usefixtures("own_cache")]

SMALL = {"BLOCK_N": 64, "BLOCK_M": 16, "BLOCK_K": 64}  # several tiles on every axis


def _check(x, p, config=None, **kw):
    m, n = x.shape[0], p.qweight.shape[1]
    want = poisoned(m, n, dtype=x.dtype)
    ref.gemm(x, p.qweight, p.scales, want)
    got = poisoned(m, n, dtype=x.dtype)
    tq.gemm(x, p.qweight, p.scales, got, config=config, **kw)
    close(got, want, TOL[x.dtype])
    return got


@pytest.mark.parametrize("group_size", [-1, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(64, 64), (128, 128), (128, 192), (64, 256)])
@pytest.mark.parametrize("m", [0, 1, 3, 17])
def test_matches_reference(m, shape, dtype, group_size):
    p = make_weight(*shape, group_size)
    _check(make_x(m, shape[1], dtype), p, SMALL)


@pytest.mark.parametrize("block_k", [32, 64, 128])
@pytest.mark.parametrize("group_size", [-1, 128])
def test_block_k_and_nan_around_x(block_k, group_size):
    # K=192 with BLOCK_K=128 ends in a half tile; rows past M and columns past K are NaN in the
    # buffer under x, so an unmasked read would poison the output.
    p = make_weight(128, 192, group_size)
    x = make_x(3, 192, torch.float16, nan_around=True)
    got = _check(x, p, {"BLOCK_N": 64, "BLOCK_M": 16, "BLOCK_K": block_k})
    assert torch.isfinite(got).all()


def test_block_n_wider_than_n():
    # BLOCK_N 128 over N 64 (and over the last 64 rows of N 192): wrapped rows are never stored
    for n in (64, 192):
        _check(make_x(5, 128, torch.float16), make_weight(n, 128),
               {"BLOCK_N": 128, "BLOCK_M": 32, "BLOCK_K": 128})


@pytest.mark.parametrize("atomic_env", [False, True])
@pytest.mark.parametrize("split_k", [1, 2, 3])
@pytest.mark.parametrize("group_size", [-1, 128])
def test_split_k(monkeypatch, split_k, atomic_env, group_size):
    monkeypatch.setenv("VLLM_MARLIN_USE_ATOMIC_ADD", "1" if atomic_env else "0")
    p = make_weight(128, 256, group_size)
    x = make_x(17, 256, torch.float32, strided=True)
    _check(x, p, {**SMALL, "SPLIT_K": split_k})
    _check(x, p, {**SMALL, "SPLIT_K": split_k}, deterministic=True)


def test_split_k_reduction_mode(monkeypatch):
    monkeypatch.setenv("VLLM_MARLIN_USE_ATOMIC_ADD", "0")
    assert tq._reduction(1, False) == "none" and tq._reduction(2, False) == "partials"
    monkeypatch.setenv("VLLM_MARLIN_USE_ATOMIC_ADD", "1")
    assert tq._reduction(1, False) == "none" and tq._reduction(4, False) == "atomic"
    assert tq._reduction(4, True) == "partials"  # deterministic wins over the env


def test_auto_split(monkeypatch):
    # SPLIT_K 0: about two programs an SM, >= 4 K tiles a split (one split in the interpreter)
    monkeypatch.setattr(tq, "_sm_count", lambda device: 132)
    cuda = torch.device("cuda")
    assert tq._auto_split(64, 32, cuda) == 4  # M 1, N 4096 / 64, K 4096 / 128
    assert tq._auto_split(64, 8, cuda) == 2 and tq._auto_split(512, 32, cuda) == 1
    _check(make_x(3, 256, torch.float16), make_weight(64, 256), {**SMALL, "SPLIT_K": 0})


def test_more_splits_than_k_tiles():
    # SPLIT_K 8 over 2 K tiles: clamped, no empty split leaves garbage in the partials
    assert tq._splits(2, 8) == (2, 1) and tq._splits(7, 3) == (3, 3) and tq._splits(8, 3) == (3, 3)
    _check(make_x(3, 128, torch.float16), make_weight(64, 128), {**SMALL, "SPLIT_K": 8})


@pytest.mark.parametrize("stages", [None, 1, 3])
def test_stages_and_default_config(stages):
    p = make_weight(128, 192, 128)
    _check(make_x(17, 192, torch.float16, strided=True), p, stages=stages)


def test_strided_out():
    p = make_weight(64, 128)
    x = make_x(7, 128, torch.float16)
    big = torch.full((7, 100), float("nan"), dtype=torch.float16)
    out = big[:, 10:74]
    tq.gemm(x, p.qweight, p.scales, out, config=SMALL)
    want = torch.empty(7, 64, dtype=torch.float16)
    ref.gemm(x, p.qweight, p.scales, want)
    close(out, want, TOL[torch.float16])
    assert big[:, :10].isnan().all() and big[:, 74:].isnan().all()


def test_config_resolution(monkeypatch):
    monkeypatch.delenv("TRITON_DISABLE_MACA_OPT_MMA_PREFETCH", raising=False)
    shape = dict(m=1, n=128, k=256, dtype=torch.float16, group_size=-1)
    cfg = tq._config(**shape, config=None, stages=None)
    assert set(cfg) == set(tq._KEYS) and cfg["num_stages"] > 1
    assert tq._config(**shape, config=None, stages=1)["num_stages"] == 1
    assert tq._config(**shape, config={"prefetch": False}, stages=None)["num_stages"] == 1
    over = tq._config(**shape, config={"BLOCK_K": 32, "SPLIT_K": 2}, stages=2)
    assert (over["BLOCK_K"], over["SPLIT_K"], over["num_stages"]) == (32, 2, 2)
    monkeypatch.setenv("TRITON_DISABLE_MACA_OPT_MMA_PREFETCH", "1")
    assert tq._config(**shape, config={"num_stages": 4}, stages=3)["num_stages"] == 1


@pytest.mark.parametrize("config, err, msg", [
    ([("BLOCK_K", 64)], TypeError, r"config must be a dict, got list"),
    ({"BLOCK": 64}, ValueError, r"config has unknown keys \['BLOCK'\]"),
    ({"BLOCK_K": 256}, ValueError, r"config\['BLOCK_K'\] must be one of \(32, 64, 128\), got 256"),
    ({"BLOCK_N": 48}, ValueError, r"config\['BLOCK_N'\] must be a power of two >= 16, got 48"),
    ({"BLOCK_M": 8}, ValueError, r"config\['BLOCK_M'\] must be a power of two >= 16, got 8"),
    ({"SPLIT_K": -1}, ValueError, r"config\['SPLIT_K'\] must be an int >= 0 .*got -1"),
    ({"num_warps": 0}, ValueError, r"config\['num_warps'\] must be a positive int, got 0"),
])
def test_bad_configs(config, err, msg):
    p = make_weight(64, 64)
    with pytest.raises(err, match=msg):
        tq.gemm(make_x(1, 64, torch.float16), p.qweight, p.scales,
                poisoned(1, 64, dtype=torch.float16), config=config)


# ---- compiles for Hopper ----------------------------------------------------------------------

def _compile_sm90(block: tuple, group: bool, atomic: bool = False, even_k: bool = True,
                  act: str = "bf16"):
    """Compile the kernel for sm_90a with Triton's bundled ptxas: (registers, stack bytes,
    pipelined main loop, wgmma, byte-wise global loads)."""
    import re

    from tests.triton_sm90 import compile_sm90

    fn = tq._fp8_gemm_kernel
    bn, bm, bk, warps, stages = block
    sig = {"x_ptr": f"*{act}", "w_ptr": "*fp8e4nv", "s_ptr": "*fp32",
           "c_ptr": "*fp32" if atomic else f"*{act}",
           **{name: "i32" for name in fn.arg_names[4:12]}}
    dtype = torch.bfloat16 if act == "bf16" else torch.float16
    const = dict(GROUP=group, EVEN_K=even_k, ATOMIC=atomic, DOT_PRECISION="tf32",
                 BLOCK_N=bn, BLOCK_M=bm, BLOCK_K=bk, CVT_ASM=tq._cvt_asm(dtype),
                 CVT_BIAS=tq._CVT_BIAS[dtype], TMA=False, PIN_ACC=True)
    aligned = ["x_ptr", "w_ptr", "s_ptr", "c_ptr", "N", "K", "stride_xm", "stride_cm"]
    r = compile_sm90(fn, sig, const, aligned, warps, stages)
    byte_loads = len(re.findall(r"ld\.global(?:\.\w+)*\.[bsu]8\b", r["ptx"]))
    return (r["regs"], r["stack"], r["pipelined"], r["wgmma"], byte_loads, _loop_waits(r["ptx"]),
            r["hazards"])


def _loop_waits(ptx: str) -> list[int]:
    """The wgmma.wait_group counts inside the main loop (from its header label to the branch
    back to it), in order."""
    import re

    head = re.search(r"^(\$L__BB\d+_\d+):.*Inner Loop Header", ptx, re.M)
    if head is None:
        return []
    back = re.compile(rf"\bbra(?:\.uni)?\s+{re.escape(head.group(1))};").search(ptx, head.end())
    body = ptx[head.end():back.start()]
    return [int(n) for n in re.findall(r"wgmma\.wait_group\.sync\.aligned (\d+)", body)]


SM90_TILES = [  # ((BLOCK_N, BLOCK_M, BLOCK_K, warps, stages), group, atomic, even_k[, act])
    ((64, 16, 128, 4, 4), False, False, True),  # the decode default
    ((64, 16, 128, 4, 4), True, False, True),
    ((128, 128, 64, 8, 4), False, False, True),  # the prefill default
    ((128, 64, 64, 8, 3), True, True, False),
    ((64, 32, 32, 4, 1), False, False, True),  # prefetch off
    ((64, 16, 128, 4, 4), True, False, False, "fp16"),
]


def test_kernel_compiles_for_sm90():
    from tests.triton_sm90 import results_in_child

    results = results_in_child("tests.quant.test_triton_cpu", "_compile_sm90(*t)")
    for (block, *_), (regs, stack, pipelined, wgmma, byte_loads, waits, hazards) in zip(
            SM90_TILES, results):
        # The converted weight is the wgmma's register operand: the last wgmma of a K step must
        # be waited for inside the step (PIN_ACC), before the next step's loads can land in
        # those registers (triton 3.6 left it pending: wrong sums on an H200).
        assert waits and waits[-1] == 0, (block, waits)
        assert hazards == [], (block, hazards)  # the same, read from the SASS
        # 56-163 registers (triton 3.6 and 3.9), every tile on wgmma with the converted weight
        # (registers) as operand A. Byte-wise weight loads (no 16-byte alignment proven for the
        # panel offset) cost 255 registers and the cp.async pipeline under triton 3.6.
        assert stack == 0 and regs <= 200 and wgmma and byte_loads == 0, block
        assert pipelined == (block[4] > 1), block
