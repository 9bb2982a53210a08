"""Triton kernels of the MoE routing steps: moe_align_block_size, fused_topk, grouped_topk.

moe_align_block_size runs in three launches over chunks of CHUNK slots (a power of two):
  1. count: per-chunk histograms counts[c, e] (tl.histogram), and the sentinel in all of `sorted`;
  2. scan (one program): group starts offsets[e] (padded sizes scanned over experts) and, per
     (chunk, expert), adj[c, e] = offsets[e] + slots of e in earlier chunks - slots of lower
     experts in chunk c;
  3. scatter: each chunk sorts its keys e * CHUNK + local index, so the slots of expert e sit at
     sorted positions p in [lower-expert slots, + count) and go to adj[c, e] + p; every program
     also writes expert ids for a range of blocks (binary search over offsets).
The result is deterministic, each group in ascending slot order, exactly the reference's output.

fused_topk / grouped_topk: one program per BLOCK_M rows, scores in fp32, top-k by repeated
max-and-mask with ties to the lower expert id.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# ---- moe_align_block_size --------------------------------------------------------------------


@triton.jit
def _align_count_kernel(ids_ptr, counts_ptr, sorted_ptr, numel, num_experts, cap, num_chunks,
                        CHUNK: tl.constexpr, BINS: tl.constexpr, FILL: tl.constexpr):
    pid = tl.program_id(0)
    if pid < num_chunks:
        offs = pid * CHUNK + tl.arange(0, CHUNK)
        e = tl.load(ids_ptr + offs, mask=offs < numel, other=-1)
        valid = (e >= 0) & (e < num_experts)
        # tl.histogram bins by the low bits of the value: only in-range ids may reach it.
        hist = tl.histogram(tl.where(valid, e, 0).to(tl.int32), BINS, mask=valid)
        bins = tl.arange(0, BINS)
        tl.store(counts_ptr + pid * num_experts + bins, hist, mask=bins < num_experts)
    fill = pid * FILL + tl.arange(0, FILL)
    tl.store(sorted_ptr + fill, tl.zeros([FILL], tl.int32) + numel, mask=fill < cap)


@triton.jit
def _align_scan_kernel(counts_ptr, adj_ptr, offsets_ptr, total_ptr, num_chunks, num_experts,
                       block_size, CHUNKS: tl.constexpr, TILE_E: tl.constexpr):
    rows = tl.arange(0, CHUNKS)
    row_ok = rows < num_chunks
    carry = tl.sum(tl.zeros([TILE_E], tl.int32), axis=0)  # padded slots of earlier tiles
    row_carry = tl.zeros([CHUNKS], tl.int32)  # per chunk: slots of experts in earlier tiles
    for e0 in range(0, num_experts, TILE_E):
        cols = e0 + tl.arange(0, TILE_E)
        col_ok = cols < num_experts
        idx = rows[:, None] * num_experts + cols[None, :]
        mask = row_ok[:, None] & col_ok[None, :]
        cnt = tl.load(counts_ptr + idx, mask=mask, other=0)
        size = (tl.sum(cnt, axis=0) + block_size - 1) // block_size * block_size
        start = carry + tl.cumsum(size, axis=0) - size
        tl.store(offsets_ptr + cols, start, mask=col_ok)
        above = tl.cumsum(cnt, axis=0) - cnt
        before = row_carry[:, None] + tl.cumsum(cnt, axis=1) - cnt
        tl.store(adj_ptr + idx, start[None, :] + above - before, mask=mask)
        carry += tl.sum(size, axis=0)
        row_carry += tl.sum(cnt, axis=1)
    tl.store(offsets_ptr + num_experts, carry)
    tl.store(total_ptr, carry)


@triton.jit
def _align_scatter_kernel(ids_ptr, adj_ptr, offsets_ptr, map_ptr, sorted_ptr, expert_ids_ptr,
                          numel, num_experts, num_chunks, block_size, num_blocks,
                          CHUNK: tl.constexpr, BLOCK_B: tl.constexpr, STEPS: tl.constexpr,
                          HAS_MAP: tl.constexpr):
    pid = tl.program_id(0)
    if pid < num_chunks:
        local = tl.arange(0, CHUNK)
        offs = pid * CHUNK + local
        e = tl.load(ids_ptr + offs, mask=offs < numel, other=-1)
        valid = (e >= 0) & (e < num_experts)
        # Dropped ids and the tail past numel get expert E: they sort last and are not stored.
        key = tl.sort(tl.where(valid, e, num_experts).to(tl.int32) * CHUNK + local)
        ek = key // CHUNK
        ok = ek < num_experts
        dest = tl.load(adj_ptr + pid * num_experts + ek, mask=ok, other=0) + local
        tl.store(sorted_ptr + dest, pid * CHUNK + key % CHUNK, mask=ok)
    b = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    pos = b * block_size
    total = tl.load(offsets_ptr + num_experts)
    # The expert owning block b: the last e with offsets[e] <= pos (empty experts are skipped).
    lo = tl.zeros([BLOCK_B], tl.int32)
    hi = lo + num_experts
    for _ in tl.static_range(STEPS):
        mid = (lo + hi) // 2
        narrow = (hi - lo) > 1
        below = tl.load(offsets_ptr + mid) <= pos
        lo = tl.where(narrow & below, mid, lo)
        hi = tl.where(narrow & ~below, mid, hi)
    eid = lo
    if HAS_MAP:
        eid = tl.load(map_ptr + lo)
    tl.store(expert_ids_ptr + b, tl.where(pos < total, eid, -1), mask=b < num_blocks)


_FILL = 1024  # sentinel slots per program of the count pass
_BLOCK_B = 256  # expert ids per program of the scatter pass


def align_config(numel: int, num_experts: int) -> dict:
    """CHUNK: ~64 chunks (parallelism of the count and sort passes), >= 256 slots each, and at
    most ~65536 (chunk, expert) counts for the one-program scan; <= 16384 (sort size)."""
    chunk = triton.next_power_of_2(triton.cdiv(numel, 64))
    chunk = max(chunk, 256, triton.next_power_of_2(triton.cdiv(numel * num_experts, 65536)))
    chunk = min(chunk, triton.next_power_of_2(max(numel, 16)), 16384)
    return {"CHUNK": chunk, "num_warps": 4 if chunk <= 1024 else 8}


def moe_align_block_size_(sorted_ids: torch.Tensor, expert_ids: torch.Tensor,
                          total: torch.Tensor, topk_ids: torch.Tensor, num_experts: int,
                          block_size: int, expert_map: torch.Tensor | None,
                          config: dict | None = None) -> None:
    """Writes the three outputs (int32, sized by the caller); topk_ids contiguous int32/int64."""
    numel, cap, num_blocks = topk_ids.numel(), sorted_ids.numel(), expert_ids.numel()
    cfg = config or align_config(numel, num_experts)
    chunk, warps = cfg["CHUNK"], cfg["num_warps"]
    chunks = triton.cdiv(numel, chunk)
    work = torch.empty(2 * chunks * num_experts + num_experts + 1, dtype=torch.int32,
                       device=topk_ids.device)
    counts = work[:chunks * num_experts]
    adj = work[chunks * num_experts:2 * chunks * num_experts]
    offsets = work[2 * chunks * num_experts:]
    _align_count_kernel[(max(chunks, triton.cdiv(cap, _FILL), 1),)](
        topk_ids, counts, sorted_ids, numel, num_experts, cap, chunks,
        CHUNK=chunk, BINS=max(32, triton.next_power_of_2(num_experts)), FILL=_FILL,
        num_warps=warps)
    rows = triton.next_power_of_2(max(chunks, 1))
    tile_e = max(1, min(triton.next_power_of_2(num_experts), 4096 // rows))
    _align_scan_kernel[(1,)](counts, adj, offsets, total, chunks, num_experts, block_size,
                             CHUNKS=rows, TILE_E=tile_e, num_warps=4)
    _align_scatter_kernel[(max(chunks, triton.cdiv(num_blocks, _BLOCK_B), 1),)](
        topk_ids, adj, offsets, expert_map if expert_map is not None else offsets, sorted_ids,
        expert_ids, numel, num_experts, chunks, block_size, num_blocks,
        CHUNK=chunk, BLOCK_B=_BLOCK_B, STEPS=(num_experts - 1).bit_length(),
        HAS_MAP=expert_map is not None, num_warps=warps)


# ---- routing ---------------------------------------------------------------------------------


@triton.jit
def _scores(x, SOFTMAX: tl.constexpr):
    if SOFTMAX:
        p = tl.exp(x - tl.max(x, axis=1)[:, None])
        return p / tl.sum(p, axis=1)[:, None]
    else:
        return tl.sigmoid(x)


@triton.jit
def _fused_topk_kernel(logits_ptr, weights_ptr, ids_ptr, num_rows, num_experts, stride_m,
                       stride_e, TOPK: tl.constexpr, TOPK_P2: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, SOFTMAX: tl.constexpr,
                       RENORM: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < num_rows
    col_ok = cols < num_experts
    x = tl.load(logits_ptr + rows[:, None].to(tl.int64) * stride_m + cols[None, :] * stride_e,
                mask=row_ok[:, None] & col_ok[None, :], other=float("-inf")).to(tl.float32)
    x = tl.where(row_ok[:, None], x, 0.0)  # rows past the end: finite, never stored
    s = tl.where(col_ok[None, :], _scores(x, SOFTMAX), float("-inf"))
    ks = tl.arange(0, TOPK_P2)
    w = tl.zeros([BLOCK_M, TOPK_P2], tl.float32)
    ids = tl.zeros([BLOCK_M, TOPK_P2], tl.int32)
    for k in tl.static_range(TOPK):
        best = tl.max(s, axis=1)
        idx = tl.min(tl.where(s == best[:, None], cols[None, :], BLOCK_E), axis=1)
        w = tl.where(ks[None, :] == k, best[:, None], w)
        ids = tl.where(ks[None, :] == k, idx[:, None], ids)
        s = tl.where(cols[None, :] == idx[:, None], float("-inf"), s)
    if RENORM:
        w = w / tl.sum(w, axis=1)[:, None]
    out = rows[:, None].to(tl.int64) * TOPK + ks[None, :]
    mask = row_ok[:, None] & (ks[None, :] < TOPK)
    tl.store(weights_ptr + out, w, mask=mask)
    tl.store(ids_ptr + out, ids, mask=mask)


def _topk_block_m(width: int) -> int:
    # ~4096 scores per program: 32 fp32 registers per thread at 4 warps.
    return max(1, min(64, 4096 // width))


def _routing_outputs(m: int, topk: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty(m, topk, dtype=torch.float32, device=device),
            torch.empty(m, topk, dtype=torch.int32, device=device))


def fused_topk(gating_logits: torch.Tensor, topk: int, renormalize: bool,
               scoring: str = "softmax") -> tuple[torch.Tensor, torch.Tensor]:
    """gating_logits [M, E] (M >= 1, checked by the caller) -> (weights fp32, ids int32)."""
    m, e = gating_logits.shape
    weights, ids = _routing_outputs(m, topk, gating_logits.device)
    block_e = triton.next_power_of_2(e)
    block_m = _topk_block_m(block_e)
    _fused_topk_kernel[(triton.cdiv(m, block_m),)](
        gating_logits, weights, ids, m, e, gating_logits.stride(0), gating_logits.stride(1),
        TOPK=topk, TOPK_P2=triton.next_power_of_2(topk), BLOCK_M=block_m, BLOCK_E=block_e,
        SOFTMAX=scoring == "softmax", RENORM=bool(renormalize), num_warps=4)
    return weights, ids


@triton.jit
def _grouped_topk_kernel(logits_ptr, bias_ptr, weights_ptr, ids_ptr, num_rows, stride_m,
                         stride_e, scale, GROUPS: tl.constexpr, GROUP_SIZE: tl.constexpr,
                         TOPK_GROUP: tl.constexpr, TOPK: tl.constexpr, TOPK_P2: tl.constexpr,
                         G_P2: tl.constexpr, GS_P2: tl.constexpr, BLOCK_M: tl.constexpr,
                         SOFTMAX: tl.constexpr, RENORM: tl.constexpr, HAS_BIAS: tl.constexpr):
    # Scores as [rows, group, member]: both group dimensions padded to powers of two.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    g = tl.arange(0, G_P2)
    j = tl.arange(0, GS_P2)
    col = g[:, None] * GROUP_SIZE + j[None, :]
    col_ok = (g[:, None] < GROUPS) & (j[None, :] < GROUP_SIZE)
    row_ok = rows < num_rows
    ptrs = logits_ptr + rows[:, None, None].to(tl.int64) * stride_m + col[None, :, :] * stride_e
    x = tl.load(ptrs, mask=row_ok[:, None, None] & col_ok[None, :, :],
                other=float("-inf")).to(tl.float32)
    x = tl.where(row_ok[:, None, None], x, 0.0)  # rows past the end: finite, never stored
    if SOFTMAX:
        p = tl.exp(x - tl.max(tl.max(x, axis=2), axis=1)[:, None, None])
        s = p / tl.sum(tl.sum(p, axis=2), axis=1)[:, None, None]
    else:
        s = tl.sigmoid(x)
    choice = s
    if HAS_BIAS:
        choice = s + tl.load(bias_ptr + col, mask=col_ok, other=0.0).to(tl.float32)[None, :, :]
    choice = tl.where(col_ok[None, :, :], choice, float("-inf"))
    # Group score: the max, or with a bias the sum of the top two (first max removed once).
    top1 = tl.max(choice, axis=2)
    gscore = top1
    if HAS_BIAS:
        first = tl.min(tl.where(choice == top1[:, :, None], j[None, None, :], GS_P2), axis=2)
        rest = tl.where(j[None, None, :] == first[:, :, None], float("-inf"), choice)
        gscore = top1 + tl.max(rest, axis=2)
    gscore = tl.where(g[None, :] < GROUPS, gscore, float("-inf"))
    keep = tl.zeros([BLOCK_M, G_P2], tl.int32)
    for _ in tl.static_range(TOPK_GROUP):
        best = tl.max(gscore, axis=1)
        gi = tl.min(tl.where(gscore == best[:, None], g[None, :], G_P2), axis=1)
        hit = g[None, :] == gi[:, None]
        keep = tl.where(hit, 1, keep)
        gscore = tl.where(hit, float("-inf"), gscore)
    choice = tl.where(keep[:, :, None] != 0, choice, float("-inf"))
    ks = tl.arange(0, TOPK_P2)
    w = tl.zeros([BLOCK_M, TOPK_P2], tl.float32)
    ids = tl.zeros([BLOCK_M, TOPK_P2], tl.int32)
    big = GROUPS * GROUP_SIZE
    for k in tl.static_range(TOPK):
        best = tl.max(tl.max(choice, axis=2), axis=1)
        hit = choice == best[:, None, None]
        idx = tl.min(tl.min(tl.where(hit, col[None, :, :], big), axis=2), axis=1)
        sel = col[None, :, :] == idx[:, None, None]
        wk = tl.sum(tl.sum(tl.where(sel, s, 0.0), axis=2), axis=1)
        w = tl.where(ks[None, :] == k, wk[:, None], w)
        ids = tl.where(ks[None, :] == k, idx[:, None], ids)
        choice = tl.where(sel, float("-inf"), choice)
    if RENORM:
        w = w / tl.sum(w, axis=1)[:, None]
    out = rows[:, None].to(tl.int64) * TOPK + ks[None, :]
    mask = row_ok[:, None] & (ks[None, :] < TOPK)
    tl.store(weights_ptr + out, w * scale, mask=mask)
    tl.store(ids_ptr + out, ids, mask=mask)


def grouped_topk(gating_logits: torch.Tensor, topk: int, num_expert_group: int, topk_group: int,
                 renormalize: bool, scoring: str = "sigmoid",
                 correction_bias: torch.Tensor | None = None,
                 routed_scaling_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """As pykernels.moe.ref.grouped_topk; arguments checked by the caller, M >= 1."""
    m, e = gating_logits.shape
    weights, ids = _routing_outputs(m, topk, gating_logits.device)
    group_size = e // num_expert_group
    g_p2 = triton.next_power_of_2(num_expert_group)
    gs_p2 = triton.next_power_of_2(group_size)
    block_m = _topk_block_m(g_p2 * gs_p2)
    bias = correction_bias if correction_bias is not None else gating_logits
    _grouped_topk_kernel[(triton.cdiv(m, block_m),)](
        gating_logits, bias, weights, ids, m, gating_logits.stride(0), gating_logits.stride(1),
        float(routed_scaling_factor), GROUPS=num_expert_group, GROUP_SIZE=group_size,
        TOPK_GROUP=topk_group, TOPK=topk, TOPK_P2=triton.next_power_of_2(topk), G_P2=g_p2,
        GS_P2=gs_p2, BLOCK_M=block_m, SOFTMAX=scoring == "softmax", RENORM=bool(renormalize),
        HAS_BIAS=correction_bias is not None, num_warps=4)
    return weights, ids
