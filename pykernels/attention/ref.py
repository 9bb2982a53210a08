"""Pure-torch reference of paged attention (fp32 math, one request at a time); also the "torch"
backend.

Written to be obviously correct rather than fast: every request's pages are gathered into dense
K/V, each query row gets its own visibility mask, and a plain softmax runs over it. The host loop
reads the page table back (a sync), so this backend is not CUDA-graph capturable.

Conventions (FlashInfer's, which the kernels follow):

- cache ``[num_pages, 2, page_size, num_kv_heads, head_dim]``; request r owns pages
  ``kv_indices[kv_indptr[r]:kv_indptr[r + 1]]``, the last holding ``kv_last_page_len[r]`` tokens;
  a request with no pages has length 0.
- q head h reads kv head ``h // (num_q_heads // num_kv_heads)``.
- query i of a request with q_len queries and kv_len keys sits at position
  ``kv_len - q_len + i`` (bottom-right aligned); causal: it sees keys ``j <= pos``; a sliding
  window ``window_left >= 0`` also drops keys ``j < pos - window_left``.
- logits: ``s = (q . k) * k_scale * sm_scale``; with a soft cap ``c > 0``: ``c * tanh(s / c)``.
- output: ``softmax(s) @ v * v_scale``; a query that sees no key gets zeros.
"""

from __future__ import annotations

import math

import torch


def seq_lens(kv_indptr: torch.Tensor, kv_last_page_len: torch.Tensor,
             page_size: int) -> torch.Tensor:
    """kv length of every request (int64, same device): 0 for a request with no pages."""
    pages = (kv_indptr[1:] - kv_indptr[:-1]).long()
    lens = (pages - 1) * page_size + kv_last_page_len.long()
    return torch.where(pages > 0, lens, torch.zeros_like(lens))


def gather_request(kv_cache: torch.Tensor, pages: torch.Tensor,
                   kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense fp32 K and V ``[kv_len, num_kv_heads, head_dim]`` of one request's pages."""
    hkv, d = kv_cache.shape[-2:]
    blocks = kv_cache[pages.long()].float()  # [n_pages, 2, page_size, hkv, d]
    k = blocks[:, 0].reshape(-1, hkv, d)[:kv_len]
    v = blocks[:, 1].reshape(-1, hkv, d)[:kv_len]
    return k, v


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, *,
           causal: bool, sm_scale: float, logits_soft_cap: float = 0.0, window_left: int = -1,
           k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """Dense attention of query rows ``q [n, hq, d]`` at ``positions [n]`` over keys
    ``k, v [kv_len, hkv, d]`` (fp32 math); returns fp32 ``[n, hq, d]``."""
    n, hq, d = q.shape
    kv_len, hkv = k.shape[0], k.shape[1]
    group = hq // hkv
    kh = k.float().repeat_interleave(group, dim=1)  # [kv_len, hq, d]
    vh = v.float().repeat_interleave(group, dim=1)
    s = torch.einsum("nhd,khd->hnk", q.float(), kh) * (k_scale * sm_scale)
    if logits_soft_cap > 0:
        s = logits_soft_cap * torch.tanh(s / logits_soft_cap)
    keys = torch.arange(kv_len, device=q.device)
    visible = torch.ones(n, kv_len, dtype=torch.bool, device=q.device)
    if causal:
        visible &= keys[None, :] <= positions[:, None]
    if window_left >= 0:
        visible &= keys[None, :] >= positions[:, None] - window_left
    s = s.masked_fill(~visible[None], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # rows that see nothing: all -inf -> zeros
    return torch.einsum("hnk,khd->nhd", p, vh) * v_scale


def prefill_ref(q: torch.Tensor, kv_cache: torch.Tensor, qo_indptr: torch.Tensor,
                kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
                kv_last_page_len: torch.Tensor, *, causal: bool = True,
                sm_scale: float | None = None, logits_soft_cap: float = 0.0,
                window_left: int = -1, k_scale: float = 1.0,
                v_scale: float = 1.0) -> torch.Tensor:
    """Paged attention of ragged queries ``q [total_q, hq, d]`` (request r owns rows
    ``qo_indptr[r]:qo_indptr[r + 1]``); returns fp32 ``[total_q, hq, d]``."""
    page_size = kv_cache.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
    lens = seq_lens(kv_indptr, kv_last_page_len, page_size).tolist()
    qo, ind = qo_indptr.tolist(), kv_indptr.tolist()
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    for r, kv_len in enumerate(lens):
        q0, q1 = qo[r], qo[r + 1]
        if q1 == q0:
            continue
        k, v = gather_request(kv_cache, kv_indices[ind[r]:ind[r + 1]], kv_len)
        positions = torch.arange(kv_len - (q1 - q0), kv_len, device=q.device)
        out[q0:q1] = attend(q[q0:q1], k, v, positions, causal=causal, sm_scale=scale,
                            logits_soft_cap=logits_soft_cap, window_left=window_left,
                            k_scale=k_scale, v_scale=v_scale)
    return out


def decode_ref(q: torch.Tensor, kv_cache: torch.Tensor, kv_indptr: torch.Tensor,
               kv_indices: torch.Tensor, kv_last_page_len: torch.Tensor, **kwargs) -> torch.Tensor:
    """One query per request, ``q [batch, hq, d]``, at the last position; fp32 out. Keyword
    arguments as :func:`prefill_ref` (``causal`` excluded: the last position sees every key)."""
    qo_indptr = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=q.device)
    return prefill_ref(q, kv_cache, qo_indptr, kv_indptr, kv_indices, kv_last_page_len,
                       causal=True, **kwargs)


def append_ref(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
               slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """kv_cache[slot // page_size, 0/1, slot % page_size] = k / k_scale, v / v_scale (rounded
    to the cache dtype, fp8 saturating at +-448); slots < 0 are skipped."""
    page_size = kv_cache.shape[2]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    pages, offs = slots // page_size, slots % page_size
    for which, x, scale in ((0, k, k_scale), (1, v, v_scale)):
        vals = x[keep].float() / scale
        if kv_cache.dtype == torch.float8_e4m3fn:
            vals = vals.clamp(-448.0, 448.0)
        kv_cache[pages, which, offs] = vals.to(kv_cache.dtype)


# ---- the "torch" backend (see pykernels.attention._common for the backend interface) ---------


def decode_plan(spec, batch: int, total_pages: int, config: dict | None) -> dict:
    return {"num_splits": 1}


def decode(out, q, kv_cache, table, params, work, config) -> None:
    o = decode_ref(q, kv_cache, table.kv_indptr, table.kv_indices, table.kv_last_page_len,
                   **params.ref_kwargs())
    out.copy_(o)


def prefill_plan(spec, qo_indptr, total_q: int, config: dict | None, max_batch=None,
                 kv_len: int = 1):
    return {}, None


def prefill(out, q, kv_cache, qo_indptr, table, params, causal, work, config) -> None:
    o = prefill_ref(q, kv_cache, qo_indptr, table.kv_indptr, table.kv_indices,
                    table.kv_last_page_len, causal=causal, **params.ref_kwargs())
    out.copy_(o)


def append(k, v, kv_cache, slot_mapping, k_scale: float, v_scale: float) -> None:
    append_ref(k, v, kv_cache, slot_mapping, k_scale, v_scale)
