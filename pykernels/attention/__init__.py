"""Paged attention: decode, causal prefill (with a cached prefix) and the KV append.

KV cache ``[num_pages, 2, page_size, num_kv_heads, head_dim]`` (K then V, "NHD" within a page),
bfloat16/float16 like q, or float8_e4m3fn with per-tensor ``k_scale`` / ``v_scale``. Page table
in FlashInfer's CSR form: request r owns pages ``kv_indices[kv_indptr[r]:kv_indptr[r + 1]]``, the
last holding ``kv_last_page_len[r]`` tokens (``table.page_table`` builds it from block tables).
Conventions of masks, scales and GQA in ``ref.py``; a guide in docs/attention.md.

Two ways in:

- plain functions ``paged_decode`` / ``paged_prefill`` (plan + run in one call; no host sync when
  the page table is on the GPU) and ``append_paged_kv``;
- ``PagedDecode`` / ``PagedPrefill``: plan once per batch step, run per layer; with ``max_batch``
  they own fixed buffers and ``run`` is CUDA-graph capturable.

Backends: ``triton``, ``cuda`` (decode and append), ``fi`` (FlashInfer), ``fa`` (flash-attn, when
installed), ``torch`` (the reference). ``backend=None`` reads VLLM_ATTENTION_BACKEND, else
``auto``.
"""

from __future__ import annotations

import torch

from pykernels import _checks
from pykernels.attention import _common
from pykernels.attention._dispatch import (
    APPEND,
    DECODE,
    PREFILL,
    attn_params,
    backend_name,
    check_pages,
    runner,
    spec_from,
)
from pykernels.attention.table import append_slots, page_table
from pykernels.attention.wrappers import PagedDecode, PagedPrefill

__all__ = ["paged_decode", "paged_prefill", "append_paged_kv", "PagedDecode", "PagedPrefill",
           "page_table", "append_slots", "backends"]


def paged_decode(q, kv_cache, kv_indptr, kv_indices, kv_last_page_len, *, sm_scale=None,
                 logits_soft_cap: float = 0.0, window_left: int = -1, k_scale=1.0, v_scale=1.0,
                 out=None, backend: str | None = None, config: dict | None = None):
    """Attention of one new query token per request over its paged KV.

    Parameters
    ----------
    q : Tensor ``[batch, num_q_heads, head_dim]``, bfloat16/float16, last dim contiguous (rows
        and heads may be strided). head_dim 64, 128 or 256; num_q_heads a multiple of
        num_kv_heads (q head h reads kv head ``h // group``).
    kv_cache : Tensor ``[num_pages, 2, page_size, num_kv_heads, head_dim]``, q's dtype or
        float8_e4m3fn.
    kv_indptr, kv_indices, kv_last_page_len : int32/int64 CSR page table (``[batch + 1]``,
        ``[>= kv_indptr[-1]]``, ``[batch]``). Host tensors are validated (page index range);
        GPU tensors are used as they are, without a sync.
    sm_scale : float, default ``1 / sqrt(head_dim)``.
    logits_soft_cap : float, ``c * tanh(s / c)`` on the scaled logits when > 0.
    window_left : int, keys older than ``pos - window_left`` are dropped; -1: no window.
    k_scale, v_scale : float, dequantization scales of an fp8 cache.
    out : Tensor like q, optional.
    backend : "auto", "triton", "cuda", "fi", "fa", "torch"; None: VLLM_ATTENTION_BACKEND.
    config : dict, launch config of the triton/cuda kernels (``num_splits``, block sizes...).

    Returns
    -------
    Tensor like q (``out`` when given). A request with no keys gets zeros.

    Examples
    --------
    >>> import torch
    >>> from pykernels.attention import paged_decode, page_table
    >>> cache = torch.randn(8, 2, 16, 2, 64, dtype=torch.float16)
    >>> indptr, indices, last = page_table(torch.tensor([[5, 2], [7, 0]]),
    ...                                    torch.tensor([20, 3]), 16)
    >>> q = torch.randn(2, 4, 64, dtype=torch.float16)
    >>> paged_decode(q, cache, indptr, indices, last, backend="torch").shape
    torch.Size([2, 4, 64])
    """
    spec = spec_from(q, kv_cache)
    _common.check_table(kv_indptr, kv_indices, kv_last_page_len, q.shape[0])
    out = _common.check_out(out, q)
    attn = attn_params(spec.head_dim, sm_scale, logits_soft_cap, window_left)
    if q.shape[0] == 0:
        return out
    r = runner(DECODE, "decode", backend, spec, attn, config=config)
    r.plan(kv_indptr, kv_indices, kv_last_page_len)
    check_pages(r.max_page, kv_cache)
    return r.run(q, kv_cache, out, _common.scalar("k_scale", k_scale),
                      _common.scalar("v_scale", v_scale))


def paged_prefill(q, kv_cache, qo_indptr, kv_indptr, kv_indices, kv_last_page_len, *,
                  causal: bool = True, sm_scale=None, logits_soft_cap: float = 0.0,
                  window_left: int = -1, k_scale=1.0, v_scale=1.0, out=None,
                  backend: str | None = None, config: dict | None = None):
    """Attention of ragged new queries over each request's paged KV (which already holds them).

    ``q [total_q, num_q_heads, head_dim]``: request r owns rows
    ``qo_indptr[r]:qo_indptr[r + 1]``, its last ``q_len`` tokens, so query i sits at position
    ``kv_len - q_len + i`` and, when ``causal``, sees keys up to it (a cached prefix is simply
    ``kv_len > q_len``). Other arguments as :func:`paged_decode`; ``qo_indptr`` int32/int64
    ``[batch + 1]``. Backends: "auto", "triton", "fi", "fa", "torch".

    Examples
    --------
    >>> import torch
    >>> from pykernels.attention import paged_prefill
    >>> cache = torch.randn(4, 2, 16, 2, 64, dtype=torch.float16)
    >>> q = torch.randn(5, 4, 64, dtype=torch.float16)          # 5 new tokens of 1 request
    >>> ptr = lambda *v: torch.tensor(v, dtype=torch.int32)
    >>> paged_prefill(q, cache, ptr(0, 5), ptr(0, 2), ptr(3, 1), ptr(4),   # 20 keys, 15 cached
    ...               backend="torch").shape
    torch.Size([5, 4, 64])
    """
    spec = spec_from(q, kv_cache)
    batch = _common.check_table(kv_indptr, kv_indices, kv_last_page_len)
    _common.index_tensor("qo_indptr", qo_indptr, batch + 1)
    out = _common.check_out(out, q)
    attn = attn_params(spec.head_dim, sm_scale, logits_soft_cap, window_left)
    if q.shape[0] == 0:
        return out
    r = runner(PREFILL, "prefill", backend, spec, attn, causal=bool(causal), config=config)
    r.plan(qo_indptr, kv_indptr, kv_indices, kv_last_page_len, num_tokens=q.shape[0])
    check_pages(r.max_page, kv_cache)
    return r.run(q, kv_cache, out, _common.scalar("k_scale", k_scale),
                      _common.scalar("v_scale", v_scale))


def append_paged_kv(k, v, kv_cache, slot_mapping, *, k_scale=1.0, v_scale=1.0,
                    backend: str | None = None) -> torch.Tensor:
    """Write new keys/values into their cache slots: ``kv_cache[s // page_size, 0, s % page_size]
    = k / k_scale`` (and V), for ``s = slot_mapping[i]``; slots < 0 are skipped (padding).

    Parameters
    ----------
    k, v : Tensor ``[num_tokens, num_kv_heads, head_dim]``, bfloat16/float16, last dim
        contiguous (rows may be strided, e.g. slices of a fused qkv output).
    kv_cache : Tensor ``[num_pages, 2, page_size, num_kv_heads, head_dim]``, k's dtype or
        float8_e4m3fn (quantized as ``k / k_scale``, saturating at +-448).
    slot_mapping : int32/int64 ``[num_tokens]``, ``page * page_size + offset`` (see
        :func:`append_slots`).
    backend : "auto", "cuda", "triton", "torch"; None: VLLM_ATTENTION_BACKEND (when it names one).

    Returns ``kv_cache``.
    """
    _common.check_q(k, "k")
    _checks.like("v", v, "k", k, k.shape)
    _checks.last_dim_contiguous("v", v)
    if isinstance(kv_cache, torch.Tensor) and kv_cache.dim() == 5 and \
            kv_cache.shape[3] != k.shape[1]:
        raise ValueError(f"k has {k.shape[1]} heads but kv_cache has {kv_cache.shape[3]} kv "
                         "heads (dim 3)")
    _common.check_cache(kv_cache, k)
    _common.index_tensor("slot_mapping", slot_mapping, k.shape[0])
    if k.shape[0] == 0:
        return kv_cache
    if slot_mapping.device != k.device:
        slot_mapping = slot_mapping.to(k.device, non_blocking=True)
    name = backend_name(APPEND, backend)
    APPEND.get(name, k.device).append(k, v, kv_cache, slot_mapping.long(),
                                      _common.scalar("k_scale", k_scale, positive=True),
                                      _common.scalar("v_scale", v_scale, positive=True))
    return kv_cache


def backends() -> dict[str, str | None]:
    """Each backend with None when it can run here, else the reason it cannot."""
    return DECODE.available()
