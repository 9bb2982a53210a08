"""Paged decode in Triton: split-KV (flash-decoding) with GQA packing, then a merge.

Stage 1 runs one program per (split, kv head, request). It loads the q heads that share the kv
head (the GQA group, padded to BLOCK_H >= 16 rows for tl.dot) once, then streams the split's keys
in BLOCK_N-token blocks gathered through the page table, so every KV page is read once for the
whole group (4 q heads per kv head at 32 q / 8 kv heads). It keeps an fp32 online softmax in the
log2 domain and writes, per q head, the split's normalized partial output and log2-sum-exp.
Stage 2 merges the splits of each (request, q head). With one split, stage 1 writes the final
output and stage 2 is skipped.

The split count comes from the plan (`_common.choose_splits`, or a tuned config): small batches
need many splits to fill the 132 SMs (bs=1, kv 4096, 8 kv heads: 32 splits -> 256 programs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from autotune import Tunable
from pykernels._backends import pdl_ready
from pykernels.attention import _common


@triton.jit
def _tanh(x):
    # tanh without libdevice (the interpreter has none): 1 - 2 / (exp(2x) + 1), exact at +-inf.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _seq_len(kv_indptr_ptr, kv_last_ptr, b, PAGE_SIZE: tl.constexpr):
    page_lo = tl.load(kv_indptr_ptr + b)
    n_pages = tl.load(kv_indptr_ptr + b + 1) - page_lo
    last = tl.load(kv_last_ptr + b)
    kv_len = tl.where(n_pages > 0, (n_pages - 1) * PAGE_SIZE + last, 0)
    return page_lo, kv_len


@triton.jit
def _page_of(kv_indices_ptr, page_lo, offs_n, end, PAGE_SIZE: tl.constexpr):
    # The page of each key position (0 past `end`).
    return tl.load(kv_indices_ptr + page_lo + offs_n // PAGE_SIZE, mask=offs_n < end, other=0)


@triton.jit
def _decode_split_kernel(
    q_ptr, cache_ptr, out_ptr, po_ptr, plse_ptr,
    kv_indptr_ptr, kv_indices_ptr, kv_last_ptr,
    stride_qb, stride_qh, stride_ob, stride_oh,
    stride_page, stride_kv, stride_tok, stride_head,
    num_q_heads, group, num_splits, qk_scale, cap_scale, window_left, v_scale,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr, SOFT_CAP: tl.constexpr, WINDOW: tl.constexpr,
    DIRECT: tl.constexpr, PDL: tl.constexpr = False,
):
    split = tl.program_id(0)
    head_chunk = tl.program_id(1)
    b = tl.program_id(2)
    if PDL:  # launched early: wait for the kernels before us (q, the cache and table writes, and
        gdc_wait()  # the previous call's merge still reading the partials we overwrite)
    chunks = tl.cdiv(group, BLOCK_H)
    kvh = head_chunk // chunks
    offs_h = (head_chunk % chunks) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < group
    qh = kvh * group + offs_h
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + b * stride_qb + qh[:, None] * stride_qh + offs_d[None, :],
                mask=h_mask[:, None], other=0.0)

    page_lo, kv_len = _seq_len(kv_indptr_ptr, kv_last_ptr, b, PAGE_SIZE)
    start = 0
    if WINDOW:
        start = tl.maximum(kv_len - 1 - window_left, 0)
    # Splits of whole blocks: every block but a split's last is full.
    per_split = tl.cdiv(tl.cdiv(kv_len - start, num_splits), BLOCK_N) * BLOCK_N
    lo = start + split * per_split
    hi = tl.minimum(lo + per_split, kv_len)

    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], tl.float32)
    k_base = cache_ptr + kvh.to(tl.int64) * stride_head
    # The page indices are loaded one block ahead into registers and carried by the loop. Loaded
    # inside the block that uses them, the index load took a pipeline stage of its own: the K and
    # V copies got one shared-memory buffer at any num_stages, waited for before every block's
    # dot (triton 3.6 and 3.9, sm_90 compile); carried, they get num_stages - 1 buffers.
    page = _page_of(kv_indices_ptr, page_lo, lo + tl.arange(0, BLOCK_N), hi, PAGE_SIZE)
    for t0 in range(lo, hi, BLOCK_N):
        offs_n = t0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < hi
        row = page.to(tl.int64) * stride_page + (offs_n % PAGE_SIZE) * stride_tok
        page = _page_of(kv_indices_ptr, page_lo, offs_n + BLOCK_N, hi, PAGE_SIZE)
        k = tl.load(k_base + row[:, None] + offs_d[None, :], mask=n_mask[:, None], other=0.0)
        # V issued with K: without pipelining (num_stages=1, tuned at bs=1) a load after the
        # softmax would add a memory round trip to every block.
        v = tl.load(k_base + stride_kv + row[:, None] + offs_d[None, :], mask=n_mask[:, None],
                    other=0.0)
        s = tl.dot(q, tl.trans(k.to(q.dtype)))
        if SOFT_CAP:
            s = cap_scale * _tanh(s * qk_scale)
        else:
            s = s * qk_scale
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
        l_sum = l_sum * alpha + tl.sum(p, 1)
        m = m_new

    if PDL:  # the merge may launch once every program is past its keys (triggering at the start
        gdc_launch_dependents()  # instead measured 1 us slower at bs=1, 2 at bs=16; H200)
    seen = l_sum > 0
    o = acc / tl.where(seen, l_sum, 1.0)[:, None]  # a split with no keys writes zeros
    if DIRECT:
        dst = out_ptr + b * stride_ob + qh[:, None] * stride_oh + offs_d[None, :]
        tl.store(dst, (o * v_scale).to(out_ptr.dtype.element_ty), mask=h_mask[:, None])
    else:
        row_id = (b * num_q_heads + qh) * num_splits + split
        tl.store(po_ptr + row_id[:, None] * HEAD_DIM + offs_d[None, :], o, mask=h_mask[:, None])
        lse = tl.where(seen, m + tl.log2(tl.where(seen, l_sum, 1.0)), float("-inf"))
        tl.store(plse_ptr + row_id, lse, mask=h_mask)


@triton.jit
def _decode_merge_kernel(
    out_ptr, po_ptr, plse_ptr, stride_ob, stride_oh, num_q_heads, num_splits, v_scale,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    PDL: tl.constexpr = False,
):
    h = tl.program_id(0)
    b = tl.program_id(1)
    d0 = tl.program_id(2) * BLOCK_D
    offs_s = tl.arange(0, BLOCK_S)
    s_mask = offs_s < num_splits
    base = (b * num_q_heads + h) * num_splits
    if PDL:  # launched early (programmatic dependent launch): let the next kernel launch too (a
        gdc_launch_dependents()  # next split kernel's programs take SMs as the splits leave
        gdc_wait()  # them, all of which already run), then wait for this call's splits
    lse = tl.load(plse_ptr + base + offs_s, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)  # empty splits (lse = -inf) weigh 0
    total = tl.sum(w, 0)
    offs_d = d0 + tl.arange(0, BLOCK_D)
    po = tl.load(po_ptr + (base + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                 mask=s_mask[:, None], other=0.0)
    o = tl.sum(po * w[:, None], 0) / tl.where(total > 0, total, 1.0) * v_scale
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, o.to(out_ptr.dtype.element_ty))


# ---- configs ----------------------------------------------------------------------------------


def default_config(head_dim: int, group: int, **_) -> dict:
    """num_splits 0: chosen at plan time by _common.choose_splits. BLOCK_N * head_dim is kept at
    8K elements (16 KB of K + 16 KB of V in bf16 per stage, 3 stages = 96 KB: 2 programs/SM)."""
    return {
        "num_splits": 0,
        "BLOCK_N": max(16, min(64, 8192 // head_dim)),
        "BLOCK_H": max(16, min(64, triton.next_power_of_2(group))),
        "num_warps": 4,
        "num_stages": 3 if head_dim <= 128 else 2,
    }


def _default(num_q_heads, num_kv_heads, head_dim, **_):
    return default_config(head_dim, num_q_heads // num_kv_heads)


# Tuned by `python -m autotune.attention` (issue 5); kv_len is the pow2 bucket of the mean length.
DECODE = Tunable("paged_decode_triton", family="attention",
                 key=("num_q_heads", "num_kv_heads", "head_dim", "page_size", "dtype",
                      "kv_dtype", "kv_len"),
                 bucket="batch", default=_default, sources=(__file__,))


def plan(spec: _common.Spec, batch: int, total_pages: int, config: dict | None) -> dict:
    avg_len = total_pages * spec.page_size / max(batch, 1)
    cfg = dict(config) if config else DECODE.lookup(
        batch=max(batch, 1), num_q_heads=spec.num_q_heads, num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_dim, page_size=spec.page_size, dtype=spec.q_dtype,
        kv_dtype=spec.kv_dtype, kv_len=_pow2(avg_len))
    cfg = {**default_config(spec.head_dim, spec.group), **cfg}
    if not cfg["num_splits"]:
        chunks = -(-spec.group // cfg["BLOCK_H"])
        cfg["num_splits"] = _common.choose_splits(batch, spec.num_kv_heads * chunks, avg_len,
                                                  _common.sm_count(spec.device))
    return cfg


def _pow2(x: float) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def decode(out: torch.Tensor, q: torch.Tensor, kv_cache: torch.Tensor, table: _common.Table,
           params: _common.Params, work: _common.DecodeWork, cfg: dict) -> None:
    batch, hq, d = q.shape
    if batch == 0:
        return
    group = hq // kv_cache.shape[3]
    splits = work.num_splits
    chunks = -(-group // cfg["BLOCK_H"])
    qk_scale, cap_scale = params.qk_scale_log2()
    direct = splits == 1
    pdl = pdl_ready(q.device)
    po = out if direct else work.partial_o
    plse = out if direct else work.partial_lse
    _decode_split_kernel[(splits, kv_cache.shape[3] * chunks, batch)](
        q, kv_cache, out, po, plse, table.kv_indptr, table.kv_indices, table.kv_last_page_len,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        hq, group, splits, qk_scale, cap_scale, params.window_left, params.v_scale,
        HEAD_DIM=d, BLOCK_H=cfg["BLOCK_H"], BLOCK_N=cfg["BLOCK_N"], PAGE_SIZE=table.page_size,
        SOFT_CAP=params.logits_soft_cap > 0, WINDOW=params.window_left >= 0, DIRECT=direct,
        PDL=pdl, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], launch_pdl=pdl,
    )
    if not direct:
        block_d = merge_block_d(d, hq * batch, _common.sm_count(q.device))
        _decode_merge_kernel[(hq, batch, d // block_d)](
            out, work.partial_o, work.partial_lse, out.stride(0), out.stride(1), hq, splits,
            params.v_scale, HEAD_DIM=d, BLOCK_S=triton.next_power_of_2(splits),
            BLOCK_D=block_d, PDL=pdl, num_warps=4, launch_pdl=pdl,
        )


def merge_block_d(head_dim: int, rows: int, sms: int) -> int:
    """Head-dim slice of a merge program: with fewer (request, q head) rows than SMs, each row's
    head_dim is cut into up to 32-wide slices so that more programs share the partials' loads.
    bs=1 at 32 q heads: 32 programs each read every split's whole row (96 splits x 512 B at 32k
    keys; 4.9 us in ncu on an H200 against 43 us for the splits), now 128 programs a quarter."""
    slices = 1
    while slices * rows < sms and head_dim // (2 * slices) >= 32:
        slices *= 2
    return head_dim // slices
