"""``PagedDecode`` / ``PagedPrefill``: the plan/run objects of the public API."""

from __future__ import annotations

import torch

from pykernels.attention import _common
from pykernels.attention._dispatch import DECODE, PREFILL, attn_params, check_run, runner


def _spec(num_q_heads, num_kv_heads, head_dim, page_size, dtype, kv_dtype,
          device) -> _common.Spec:
    if num_kv_heads < 1 or num_q_heads % num_kv_heads != 0:
        raise ValueError(f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads "
                         f"({num_kv_heads})")
    if head_dim not in _common.HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {_common.HEAD_DIMS}, got {head_dim}")
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")
    if dtype not in _common.Q_DTYPES:
        raise TypeError(f"dtype must be bfloat16 or float16, got {dtype}")
    kv_dtype = dtype if kv_dtype is None else kv_dtype
    if kv_dtype not in (dtype, _common.FP8):
        raise TypeError(f"kv_dtype must be {dtype} or float8_e4m3fn, got {kv_dtype}")
    return _common.Spec(num_q_heads, num_kv_heads, head_dim, page_size, dtype, kv_dtype,
                        torch.device(device))


class PagedDecode:
    """Batched paged decode, planned once per step and run per layer.

    Parameters
    ----------
    num_q_heads, num_kv_heads, head_dim, page_size : int
    dtype : q's dtype (bfloat16/float16); kv_dtype: the cache's (default dtype, or
        torch.float8_e4m3fn).
    device : where q and the cache live.
    sm_scale, logits_soft_cap, window_left : as :func:`pykernels.attention.paged_decode`.
    max_batch, max_pages : give both for CUDA-graph use: fixed page-table buffers and workspace
        sized for them, filled by every ``plan``.
    backend : "auto", "triton", "cuda", "fi", "fa", "torch"; None: VLLM_ATTENTION_BACKEND.
    config : launch config for the triton/cuda kernels (e.g. ``{"num_splits": 8}``).

    Examples
    --------
    >>> import torch
    >>> from pykernels.attention import PagedDecode, page_table
    >>> dec = PagedDecode(4, 2, 64, 16, dtype=torch.float16, device="cpu", backend="torch")
    >>> dec.plan(*page_table(torch.tensor([[0, 1]]), torch.tensor([20]), 16))
    >>> cache = torch.randn(2, 2, 16, 2, 64, dtype=torch.float16)
    >>> dec.run(torch.randn(1, 4, 64, dtype=torch.float16), cache).shape
    torch.Size([1, 4, 64])

    With CUDA graphs (on a GPU)::

        dec = PagedDecode(32, 8, 128, 16, device="cuda", max_batch=64, max_pages=64 * 256)
        dec.plan(indptr, indices, last)               # outside the graph, every step
        with torch.cuda.graph(g):
            dec.run(q, cache, out=out)                # captured once
        g.replay()
    """

    def __init__(self, num_q_heads: int, num_kv_heads: int, head_dim: int, page_size: int, *,
                 dtype: torch.dtype = torch.bfloat16, kv_dtype: torch.dtype | None = None,
                 device="cuda", sm_scale: float | None = None, logits_soft_cap: float = 0.0,
                 window_left: int = -1, max_batch: int | None = None,
                 max_pages: int | None = None, backend: str | None = None,
                 config: dict | None = None):
        self.spec = _spec(num_q_heads, num_kv_heads, head_dim, page_size, dtype, kv_dtype,
                          device)
        attn = attn_params(head_dim, sm_scale, logits_soft_cap, window_left)
        self._runner = runner(DECODE, "decode", backend, self.spec, attn, max_batch=max_batch,
                              max_pages=max_pages, config=config)
        self._batch: int | None = None

    @property
    def num_splits(self) -> int:
        """Split-KV count of the last plan (1 for backends that do not split)."""
        return getattr(self._runner, "cfg", {}).get("num_splits", 1)

    def plan(self, kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
             kv_last_page_len: torch.Tensor) -> None:
        """Take this step's page table (host tensors are validated; GPU ones are not read)."""
        self._batch = _common.check_table(kv_indptr, kv_indices, kv_last_page_len)
        self._runner.plan(kv_indptr, kv_indices, kv_last_page_len)

    def run(self, q: torch.Tensor, kv_cache: torch.Tensor, *, out: torch.Tensor | None = None,
            k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
        """Attention of ``q [batch, num_q_heads, head_dim]`` over ``kv_cache`` (one layer)."""
        if self._batch is None:
            raise RuntimeError("PagedDecode.run called before plan")
        check_run(self.spec, q, kv_cache, self._runner.max_page, self._batch)
        out = _common.check_out(out, q)
        return self._runner.run(q, kv_cache, out, float(k_scale), float(v_scale))


class PagedPrefill:
    """Batched paged prefill (causal by default, cached prefixes allowed), planned once per step.

    Parameters as :class:`PagedDecode`, plus ``causal`` and, for CUDA-graph use, ``max_tokens``
    (the most query rows of a step) next to ``max_batch`` and ``max_pages``.
    ``plan(qo_indptr, kv_indptr, kv_indices, kv_last_page_len, num_tokens=None)``: give
    ``num_tokens`` (= ``qo_indptr[-1]``) when qo_indptr is on the GPU to avoid reading it back.

    Examples
    --------
    >>> import torch
    >>> from pykernels.attention import PagedPrefill
    >>> pre = PagedPrefill(4, 2, 64, 16, dtype=torch.float16, device="cpu", backend="torch")
    >>> i32 = lambda *v: torch.tensor(v, dtype=torch.int32)
    >>> pre.plan(i32(0, 3), i32(0, 1), i32(1), i32(3))
    >>> cache = torch.randn(2, 2, 16, 2, 64, dtype=torch.float16)
    >>> pre.run(torch.randn(3, 4, 64, dtype=torch.float16), cache).shape
    torch.Size([3, 4, 64])
    """

    def __init__(self, num_q_heads: int, num_kv_heads: int, head_dim: int, page_size: int, *,
                 dtype: torch.dtype = torch.bfloat16, kv_dtype: torch.dtype | None = None,
                 device="cuda", causal: bool = True, sm_scale: float | None = None,
                 logits_soft_cap: float = 0.0, window_left: int = -1,
                 max_batch: int | None = None, max_pages: int | None = None,
                 max_tokens: int | None = None, backend: str | None = None,
                 config: dict | None = None):
        self.spec = _spec(num_q_heads, num_kv_heads, head_dim, page_size, dtype, kv_dtype,
                          device)
        attn = attn_params(head_dim, sm_scale, logits_soft_cap, window_left)
        self._runner = runner(PREFILL, "prefill", backend, self.spec, attn, causal=bool(causal),
                              max_batch=max_batch, max_pages=max_pages, max_tokens=max_tokens,
                              config=config)
        self._fixed = max_batch is not None
        self._rows: int | None = None

    def plan(self, qo_indptr: torch.Tensor, kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
             kv_last_page_len: torch.Tensor, num_tokens: int | None = None) -> None:
        batch = _common.check_table(kv_indptr, kv_indices, kv_last_page_len)
        _common.index_tensor("qo_indptr", qo_indptr, batch + 1)
        self._runner.plan(qo_indptr, kv_indptr, kv_indices, kv_last_page_len,
                          num_tokens=num_tokens)
        self._rows = self._runner.num_tokens

    def run(self, q: torch.Tensor, kv_cache: torch.Tensor, *, out: torch.Tensor | None = None,
            k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
        """Attention of ``q [num_tokens, num_q_heads, head_dim]`` over ``kv_cache``."""
        if self._rows is None:
            raise RuntimeError("PagedPrefill.run called before plan")
        # Fixed buffers: q may hold padding rows past the planned tokens (a graph's max size).
        check_run(self.spec, q, kv_cache, self._runner.max_page, self._rows,
                  exact=not self._fixed)
        out = _common.check_out(out, q)
        return self._runner.run(q, kv_cache, out, float(k_scale), float(v_scale))
