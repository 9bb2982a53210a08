"""Paged prefill in Triton: causal (bottom-right aligned, so a cached prefix works), GQA-packed.

One program per (q tile, kv head). A tile is BLOCK_M "packed rows" of one request: row
``t * group + g`` is query token t under q head g of the kv head's group, so the group's q heads
share every K/V block loaded (4x fewer gathers at 32 q / 8 kv heads), FlashInfer's packing.
Keys are streamed in BLOCK_N-token blocks gathered through the page table; blocks every row of
the tile sees in full run without a mask, the diagonal (and window edge, and the kv end) with one.

The tile map (which request and tile each program takes) is built on the device by `plan`
without a host sync: programs past the last tile exit at once. Within a request the last tile
(the most keys under a causal mask) gets the lowest program id, so long tiles start first.
Program order over kv heads is a tuned choice (`HEADS_INNER`): one head's tiles after another,
or the heads of a tile side by side, which leaves only the last request's short tiles for the
tail (a list-scheduling model of 132 SMs: makespan 7% lower at 8x2048, 3% at 32x512). Ordering
all tiles of a batch longest first was measured worse (32x512, 128x32 tile: 370 vs 330 us on an
H200): it spreads a request's tiles, which share its keys in L2, over the whole launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from autotune import Tunable
from pykernels.attention import _common
from pykernels.attention.triton_decode import _seq_len, _tanh


@triton.jit
def _attend_block(acc, m, l_sum, q, k_base, stride_kv, kv_indices_ptr, page_lo, n0, pos,
                  kv_len, qk_scale, cap_scale, window_left, offs_d,
                  BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, MASK: tl.constexpr,
                  CAUSAL: tl.constexpr, SOFT_CAP: tl.constexpr, WINDOW: tl.constexpr,
                  stride_page, stride_tok):
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < kv_len
    page = tl.load(kv_indices_ptr + page_lo + offs_n // PAGE_SIZE, mask=n_ok, other=0)
    row = page.to(tl.int64) * stride_page + (offs_n % PAGE_SIZE) * stride_tok
    k = tl.load(k_base + row[:, None] + offs_d[None, :], mask=n_ok[:, None], other=0.0)
    s = tl.dot(q, tl.trans(k.to(q.dtype)))
    if SOFT_CAP:
        s = cap_scale * _tanh(s * qk_scale)
        scale = 1.0
    else:  # scaled inside the exp2's FFMA below (qk_scale > 0: the row max commutes with it)
        scale = qk_scale
    if MASK:
        keep = n_ok[None, :]
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= pos[:, None])
        if WINDOW:
            keep = keep & (offs_n[None, :] >= pos[:, None] - window_left)
        s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1) * scale)
    if MASK:  # rows that saw no key yet keep m = -inf: exp2 against 0 instead of NaN
        m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:  # every row saw a key of the first, unmasked block
        m_new_safe = m_new
    alpha = tl.exp2(m - m_new_safe)
    p = tl.exp2(s * scale - m_new_safe[:, None])
    v = tl.load(k_base + stride_kv + row[:, None] + offs_d[None, :], mask=n_ok[:, None],
                other=0.0)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(q.dtype), v.to(q.dtype), acc)
    l_sum = l_sum * alpha + tl.sum(p, 1)
    return acc, m_new, l_sum


@triton.jit
def _prefill_kernel(
    q_ptr, cache_ptr, out_ptr, tile_req_ptr, tile_idx_ptr, qo_indptr_ptr,
    kv_indptr_ptr, kv_indices_ptr, kv_last_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_page, stride_kv, stride_tok, stride_head,
    batch, group, num_kv_heads, qk_scale, cap_scale, window_left, v_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr, CAUSAL: tl.constexpr, SOFT_CAP: tl.constexpr,
    WINDOW: tl.constexpr, HEADS_INNER: tl.constexpr = False,
):
    if HEADS_INNER:  # a 1-D grid, the kv heads of one tile side by side
        slot = tl.program_id(0) // num_kv_heads
        kvh = tl.program_id(0) % num_kv_heads
    else:  # (tile slots, kv heads): one head's tiles after another
        slot = tl.program_id(0)
        kvh = tl.program_id(1)
    r = tl.load(tile_req_ptr + slot)
    if r >= batch:
        return
    tile = tl.load(tile_idx_ptr + slot)
    q0 = tl.load(qo_indptr_ptr + r)
    q_len = tl.load(qo_indptr_ptr + r + 1) - q0
    page_lo, kv_len = _seq_len(kv_indptr_ptr, kv_last_ptr, r, PAGE_SIZE)
    prefix = kv_len - q_len

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    tok = rows // group
    qh = kvh * group + rows % group
    r_ok = tok < q_len
    pos = prefix + tok
    offs_d = tl.arange(0, HEAD_DIM)
    q_off = (q0 + tok).to(tl.int64)[:, None] * stride_qt + qh[:, None] * stride_qh
    q = tl.load(q_ptr + q_off + offs_d[None, :], mask=r_ok[:, None], other=0.0)

    tok_first = (tile * BLOCK_M) // group
    tok_last = tl.minimum((tile * BLOCK_M + BLOCK_M - 1) // group, q_len - 1)
    hi = kv_len
    full_hi = kv_len  # keys below it are visible to every row of the tile
    if CAUSAL:
        hi = tl.minimum(kv_len, prefix + tok_last + 1)
        full_hi = tl.minimum(kv_len, prefix + tok_first + 1)
    lo = 0
    if WINDOW:
        lo = tl.maximum(prefix + tok_first - window_left, 0) // BLOCK_N * BLOCK_N
        full_hi = lo  # every block may cut the window: mask them all
    full_hi = tl.maximum(full_hi // BLOCK_N * BLOCK_N, lo)

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    k_base = cache_ptr + kvh.to(tl.int64) * stride_head
    for n0 in range(lo, full_hi, BLOCK_N):
        acc, m, l_sum = _attend_block(
            acc, m, l_sum, q, k_base, stride_kv, kv_indices_ptr, page_lo, n0, pos, kv_len,
            qk_scale, cap_scale, window_left, offs_d, BLOCK_N, PAGE_SIZE, False, CAUSAL,
            SOFT_CAP, WINDOW, stride_page, stride_tok)
    for n0 in range(full_hi, hi, BLOCK_N):
        acc, m, l_sum = _attend_block(
            acc, m, l_sum, q, k_base, stride_kv, kv_indices_ptr, page_lo, n0, pos, kv_len,
            qk_scale, cap_scale, window_left, offs_d, BLOCK_N, PAGE_SIZE, True, CAUSAL,
            SOFT_CAP, WINDOW, stride_page, stride_tok)

    o = acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None] * v_scale  # rows that see no key: 0
    o_off = (q0 + tok).to(tl.int64)[:, None] * stride_ot + qh[:, None] * stride_oh
    tl.store(out_ptr + o_off + offs_d[None, :], o.to(out_ptr.dtype.element_ty),
             mask=r_ok[:, None])


# ---- configs and the tile map -----------------------------------------------------------------


def default_config(head_dim: int, **_) -> dict:
    """FA2-style tiles: 128 packed rows x 64 keys, 8 warps (the Triton fused-attention
    tutorial's Hopper forward config for d=128); half the rows at d=256 to fit registers."""
    return {
        "BLOCK_M": 128 if head_dim <= 128 else 64,
        "BLOCK_N": 64 if head_dim <= 128 else 32,
        "num_warps": 8 if head_dim <= 128 else 4,
        "num_stages": 3 if head_dim <= 128 else 2,
        "HEADS_INNER": False,
    }


# Keyed by the kv length too (the mean per request, pow2 bucket, as the backend choice's key):
# one token count holds 8 x 2048 and 32 x 512, whose best tiles differ (a 512-key request runs
# 8 blocks of 64 keys per 256-row tile, pipeline fill and epilogue included).
PREFILL = Tunable("paged_prefill_triton", family="attention",
                  key=("num_q_heads", "num_kv_heads", "head_dim", "page_size", "dtype",
                       "kv_dtype", "kv_len"),
                  bucket="tokens", default=default_config, sources=(__file__,))


def plan(spec: _common.Spec, qo_indptr: torch.Tensor, total_q: int, config: dict | None,
         max_batch: int | None = None, kv_len: int = 1
         ) -> tuple[dict, tuple[torch.Tensor, torch.Tensor]]:
    """(config, tile map). ``kv_len``: the config key's pow2 mean kv length
    (``tunables.spec_key``). The map has an upper bound of tiles known on the host
    (``ceil(total_q * group / BLOCK_M) + max_batch``) so no count is read back."""
    cfg = dict(config) if config else PREFILL.lookup(
        tokens=max(total_q, 1), num_q_heads=spec.num_q_heads, num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_dim, page_size=spec.page_size, dtype=spec.q_dtype,
        kv_dtype=spec.kv_dtype, kv_len=kv_len)
    cfg = {**default_config(spec.head_dim), **cfg}
    return cfg, tile_map(qo_indptr, total_q, spec.group, cfg["BLOCK_M"], max_batch)


def tile_map(qo_indptr: torch.Tensor, total_q: int, group: int, block_m: int,
             max_batch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(request, tile) of every program, int32; request = batch past the last tile. Each
    request adds at most one partial tile, hence the ``+ max_batch`` slots."""
    batch = qo_indptr.shape[0] - 1
    ptr = qo_indptr.long()
    tiles = ((ptr[1:] - ptr[:-1]) * group + block_m - 1) // block_m
    ends = torch.cumsum(tiles, 0)
    slots = -(-total_q * group // block_m) + (batch if max_batch is None else max_batch)
    t = torch.arange(slots, device=qo_indptr.device)
    req = torch.searchsorted(ends, t, right=True)
    safe = req.clamp(max=max(batch - 1, 0))
    first = ends[safe] - tiles[safe] if batch else t
    idx = tiles[safe] - 1 - (t - first) if batch else t  # last tile of a request first
    return req.to(torch.int32), idx.to(torch.int32)


def prefill(out: torch.Tensor, q: torch.Tensor, kv_cache: torch.Tensor,
            qo_indptr: torch.Tensor, table: _common.Table, params: _common.Params,
            causal: bool, work, cfg: dict) -> None:
    tile_req, tile_idx = work
    if q.shape[0] == 0 or tile_req.shape[0] == 0:
        return
    hkv = kv_cache.shape[3]
    qk_scale, cap_scale = params.qk_scale_log2()
    inner = bool(cfg["HEADS_INNER"])
    grid = (tile_req.shape[0] * hkv,) if inner else (tile_req.shape[0], hkv)
    _prefill_kernel[grid](
        q, kv_cache, out, tile_req, tile_idx, qo_indptr,
        table.kv_indptr, table.kv_indices, table.kv_last_page_len,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        table.batch, q.shape[1] // hkv, hkv, qk_scale, cap_scale, params.window_left,
        params.v_scale,
        HEAD_DIM=q.shape[2], BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        PAGE_SIZE=table.page_size, CAUSAL=causal, SOFT_CAP=params.logits_soft_cap > 0,
        WINDOW=params.window_left >= 0, HEADS_INNER=inner, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
