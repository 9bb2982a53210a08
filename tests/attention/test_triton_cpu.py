"""Triton kernels under the interpreter (CPU-only machines), tiny shapes, float16: decode with and
without splits, GQA ratios, page sizes, prefill with prefixes, append, plan objects."""

from __future__ import annotations

import pytest
import torch

from pykernels import attention
from pykernels.attention import PagedDecode, PagedPrefill, ref, triton_decode
from pykernels.attention import triton_prefill as tp
from tests.attention._cases import TOL, Paged

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="interpreter tests are for CPU-only machines")
DT = torch.float16
D = 64
SMALL = {"BLOCK_N": 16}  # interpreter time grows with the block


def _close(got, want):
    atol, rtol = TOL[DT]
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (8, 1), (4, 2)])
@pytest.mark.parametrize("page_size", [1, 3, 16])
def test_decode(splits, heads, page_size):
    hq, hkv = heads
    p = Paged([1, 7, 17, 0, 40], page_size, hkv, D, DT)
    q = p.q(hq, D, DT)
    out = torch.full_like(q, float("nan"))
    got = attention.paged_decode(q, p.cache, *p.table, out=out, backend="triton",
                                 config={**SMALL, "num_splits": splits})
    assert got is out
    _close(got, ref.decode_ref(q, p.cache, *p.table))
    assert torch.count_nonzero(got[3]) == 0


@pytest.mark.parametrize("d, rows, want", [(128, 32, 32), (128, 100, 64), (128, 132, 128),
                                           (64, 1, 32), (256, 8, 32), (256, 64, 64)])
def test_merge_head_dim_slices(d, rows, want):
    """The merge cuts a row's head_dim (into slices of >= 32) only while rows < SMs (132), so
    test_decode above (<= 40 rows at d=64) runs the sliced merge."""
    assert triton_decode.merge_block_d(d, rows, 132) == want


def test_decode_head_chunks_and_strided_q():
    # group 32 > BLOCK_H 16: two programs per kv head; q a strided view.
    p = Paged([5, 20], 4, 1, D, DT)
    q = p.q(32, D, DT, strided=True)
    got = attention.paged_decode(q, p.cache, *p.table, backend="triton",
                                 config={**SMALL, "BLOCK_H": 16, "num_splits": 2})
    _close(got, ref.decode_ref(q, p.cache, *p.table))


@pytest.mark.parametrize("kw", [{"logits_soft_cap": 4.0}, {"window_left": 5},
                                {"sm_scale": 0.2, "k_scale": 0.5, "v_scale": 1.5}])
def test_decode_options(kw):
    p = Paged([3, 30], 4, 2, D, DT)
    q = p.q(4, D, DT)
    got = attention.paged_decode(q, p.cache, *p.table, backend="triton",
                                 config={**SMALL, "num_splits": 2}, **kw)
    _close(got, ref.decode_ref(q, p.cache, *p.table, **kw))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2)])
@pytest.mark.parametrize("block_m,heads_inner", [(16, False), (32, False), (16, True)])
def test_prefill_with_prefix(causal, heads, block_m, heads_inner):
    hq, hkv = heads
    p = Paged([9, 5, 0, 21, 3], 4, hkv, D, DT, q_lens=[3, 5, 0, 17, 0])
    q = p.q(hq, D, DT)
    cfg = {"BLOCK_M": block_m, "BLOCK_N": 16, "HEADS_INNER": heads_inner}
    got = attention.paged_prefill(q, p.cache, p.qo_indptr, *p.table, causal=causal,
                                  backend="triton", config=cfg)
    _close(got, ref.prefill_ref(q, p.cache, p.qo_indptr, *p.table, causal=causal))


@pytest.mark.parametrize("kw", [{"window_left": 2}, {"logits_soft_cap": 3.0}])
def test_prefill_options(kw):
    p = Paged([12, 20], 4, 2, D, DT, q_lens=[12, 6])
    q = p.q(4, D, DT)
    got = attention.paged_prefill(q, p.cache, p.qo_indptr, *p.table, backend="triton",
                                  config={"BLOCK_M": 16, "BLOCK_N": 16}, **kw)
    _close(got, ref.prefill_ref(q, p.cache, p.qo_indptr, *p.table, **kw))


def test_tile_map_orders_long_tiles_first():
    qo = torch.tensor([0, 5, 5, 12], dtype=torch.int32)  # q lens 5, 0, 7; group 2, BLOCK_M 4
    req, idx = tp.tile_map(qo, 12, 2, 4)
    assert req.tolist()[:7] == [0, 0, 0, 2, 2, 2, 2]
    assert idx.tolist()[:7] == [2, 1, 0, 3, 2, 1, 0]
    assert all(r >= 3 for r in req.tolist()[7:])  # spare slots exit at once


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_append(backend):
    p = Paged([6, 3], 4, 2, D, DT)
    k = torch.randn(3, 2, D, dtype=DT)
    v = torch.randn(3, 2, D, dtype=DT)
    slots = torch.tensor([4, -1, 9])
    want = p.cache.clone()
    ref.append_ref(k, v, want, slots, 0.5, 4.0)
    got = attention.append_paged_kv(k, v, p.cache, slots, k_scale=0.5, v_scale=4.0,
                                    backend=backend)
    assert torch.equal(got, want)


def test_plan_objects_with_fixed_buffers():
    dec = PagedDecode(4, 2, D, 4, dtype=DT, device="cpu", backend="triton", max_batch=4,
                      max_pages=64, config={**SMALL, "num_splits": 2})
    pre = PagedPrefill(4, 2, D, 4, dtype=DT, device="cpu", backend="triton", max_batch=4,
                       max_pages=64, max_tokens=32, config={"BLOCK_M": 16, "BLOCK_N": 16})
    for lens in ([5, 17, 2], [30, 1]):  # two steps through the same buffers
        p = Paged(lens, 4, 2, D, DT, q_lens=[1] * len(lens))
        dec.plan(*p.table)
        q = p.q(4, D, DT)
        _close(dec.run(q, p.cache), ref.decode_ref(q, p.cache, *p.table))
        pre.plan(p.qo_indptr, *p.table)
        _close(pre.run(q, p.cache), ref.decode_ref(q, p.cache, *p.table))
    assert dec.num_splits == 2


# ---- what the compiler makes of the prefill for Hopper (sm_90a, no GPU needed) -----------------


def _sm90_signature(fn, const: dict, ptrs: dict) -> tuple[dict, dict, list[str]]:
    """(signature, constants, 16-aligned arguments) of an attention kernel for compile_sm90:
    `ptrs` typed as given, other pointers int32, the scales fp32, the rest int32; the data
    pointers and strides aligned as launched. A constexpr parameter not in `const` takes its
    declared default, as a launch does (typed i32 instead, a new flag would turn into a run-time
    branch and change what the compile shows); one without a default is an error."""
    const = dict(const)
    for p in fn.params:
        if p.is_constexpr and p.name not in const:
            assert p.has_default, f"{fn.__name__}: constexpr {p.name} needs a value here"
            const[p.name] = p.default
    floats = ("qk_scale", "cap_scale", "v_scale")
    sig = {n: ptrs.get(n) or ("*i32" if n.endswith("_ptr") else "fp32" if n in floats else "i32")
           for n in fn.arg_names if n not in const}
    return sig, const, [*ptrs, *(n for n in fn.arg_names if n.startswith("stride_"))]


def _compile_sm90(block_m: int, block_n: int, warps: int, stages: int, head_dim: int = 128,
                  soft_cap: bool = False):
    from tests.triton_sm90 import compile_sm90

    fn = tp._prefill_kernel
    const = dict(HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, PAGE_SIZE=16, CAUSAL=True,
                 SOFT_CAP=soft_cap, WINDOW=False)
    ptrs = {"q_ptr": "*bf16", "cache_ptr": "*bf16", "out_ptr": "*bf16"}
    r = compile_sm90(fn, *_sm90_signature(fn, const, ptrs), warps, stages)
    return r["regs"], r["stack"], r["wgmma"], r["hazards"]


SM90_TILES = [  # (BLOCK_M, BLOCK_N, warps, stages[, head_dim, soft_cap])
    (128, 64, 8, 3),  # the d=128 default
    (256, 64, 8, 4),  # tuned on the H200 (8x2048, 1x8192)
    (128, 128, 8, 3),
    (128, 64, 8, 3, 128, True),
    (64, 32, 4, 2, 256),  # the d=256 default
]


def test_prefill_compiles_for_sm90():
    from tests.triton_sm90 import results_in_child

    results = results_in_child("tests.attention.test_triton_cpu", "_compile_sm90(*t)")
    for tile, (regs, stack, wgmma, hazards) in zip(SM90_TILES, results):
        # P @ V takes P from registers (a register-operand wgmma, as the FP8 GEMM's weight): no
        # instruction may write those registers before the wgmma is retired (docs/quant.md).
        assert wgmma and hazards == [], (tile, hazards)
        if tile[:4] == (128, 64, 8, 3) and len(tile) == 4:  # the default must not spill
            assert stack == 0, (tile, regs, stack)


def _compile_decode_sm90(block_n: int, warps: int, stages: int) -> list[int]:
    from tests.triton_sm90 import compile_sm90

    fn = triton_decode._decode_split_kernel
    const = dict(HEAD_DIM=128, BLOCK_H=16, BLOCK_N=block_n, PAGE_SIZE=16, SOFT_CAP=False,
                 WINDOW=False, DIRECT=False, PDL=True)
    ptrs = {"q_ptr": "*bf16", "cache_ptr": "*bf16", "out_ptr": "*bf16", "po_ptr": "*fp32",
            "plse_ptr": "*fp32"}
    return compile_sm90(fn, *_sm90_signature(fn, const, ptrs), warps, stages)["rings"]


DECODE_SM90_TILES = [(64, 2, 3), (64, 4, 4), (128, 8, 3)]  # (BLOCK_N, warps, stages)


def test_decode_kv_rings_for_sm90():
    """K and V each get num_stages - 1 shared buffers. With the page index loaded inside the
    block that uses it they got one at any depth (triton 3.6 and 3.9): no second block in
    flight (docs/attention.md, Status)."""
    from tests.triton_sm90 import results_in_child

    rings = results_in_child("tests.attention.test_triton_cpu", "_compile_decode_sm90(*t)",
                             tiles="DECODE_SM90_TILES", fn="_compile_decode_sm90")
    for (block_n, warps, stages), got in zip(DECODE_SM90_TILES, rings):
        assert got == [stages - 1, stages - 1], (block_n, warps, stages, got)
