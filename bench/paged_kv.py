"""Paged KV-cache inputs for the attention benchmarks (FlashInfer's layout, which ours follows).

Cache: ``[num_pages, 2, page_size, num_kv_heads, head_dim]`` (K then V, "NHD" within a page).
Page table in CSR form: request r owns pages ``kv_indices[kv_indptr[r]:kv_indptr[r + 1]]``, the
last of them holding ``kv_last_page_len[r]`` (1..page_size) tokens. Pages are handed out in a
random order so no kernel is flattered by neighbouring pages being contiguous.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PageTable:
    kv_indptr: torch.Tensor  # int32 [batch + 1]
    kv_indices: torch.Tensor  # int32 [num_pages]
    kv_last_page_len: torch.Tensor  # int32 [batch]
    qo_indptr: torch.Tensor  # int32 [batch + 1], rows of q per request (prefill)
    page_ids: torch.Tensor  # int64 [batch, pages_per_seq], the reference's gather index
    batch: int
    kv_len: int
    page_size: int

    @property
    def pages_per_seq(self) -> int:
        return -(-self.kv_len // self.page_size)

    @property
    def num_pages(self) -> int:
        return self.batch * self.pages_per_seq


def uniform_page_table(batch: int, kv_len: int, page_size: int, q_len: int = 1,
                       device: str = "cuda", seed: int = 0) -> PageTable:
    """Page table of ``batch`` requests of ``kv_len`` tokens each (the bench grids are
    uniform), pages in a seeded random order."""
    if kv_len < 1 or batch < 1:
        raise ValueError(f"batch and kv_len must be >= 1, got batch={batch}, kv_len={kv_len}")
    pages = -(-kv_len // page_size)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(batch * pages, generator=gen, dtype=torch.int64)
    i32 = {"dtype": torch.int32, "device": device}
    return PageTable(
        kv_indptr=torch.arange(batch + 1, **i32) * pages,
        kv_indices=order.to(**i32),
        kv_last_page_len=torch.full((batch,), kv_len - (pages - 1) * page_size, **i32),
        qo_indptr=torch.arange(batch + 1, **i32) * q_len,
        page_ids=order.view(batch, pages).to(device),
        batch=batch, kv_len=kv_len, page_size=page_size,
    )


def kv_cache(num_pages: int, page_size: int, num_kv_heads: int, head_dim: int,
             dtype: torch.dtype, device: str = "cuda") -> torch.Tensor:
    """A random cache ``[num_pages, 2, page_size, num_kv_heads, head_dim]``."""
    return torch.randn(num_pages, 2, page_size, num_kv_heads, head_dim, dtype=dtype,
                       device=device)


def gather_kv(cache: torch.Tensor, table: PageTable) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of every request as ``[batch, kv_len, num_kv_heads, head_dim]`` (a copy).

    No host sync (the uniform page count is known on the host), so it can be graph-captured.
    """
    b, p, n = table.batch, table.pages_per_seq, table.kv_len
    pages = cache[table.page_ids]  # [b, p, 2, page, h, d]
    h, d = cache.shape[-2:]
    k = pages[:, :, 0].reshape(b, p * table.page_size, h, d)[:, :n]
    v = pages[:, :, 1].reshape(b, p * table.page_size, h, d)[:, :n]
    return k, v


def torch_decode(q: torch.Tensor, cache: torch.Tensor, table: PageTable,
                 out: torch.Tensor) -> torch.Tensor:
    """Reference paged decode: gather the pages, then SDPA. q and out ``[batch, q_heads, d]``.

    GQA without copying K/V per q head: the ``group`` q heads sharing a kv head (q head h reads
    kv head h // group, FlashInfer's mapping) become ``group`` query rows of that kv head.
    """
    k, v = gather_kv(cache, table)
    b, hq, d = q.shape
    hkv = k.shape[2]
    o = F.scaled_dot_product_attention(q.view(b, hkv, hq // hkv, d), k.transpose(1, 2),
                                       v.transpose(1, 2))
    return out.copy_(o.reshape(b, hq, d))


def torch_prefill(q: torch.Tensor, cache: torch.Tensor, table: PageTable,
                  out: torch.Tensor) -> torch.Tensor:
    """Reference paged causal prefill with q_len == kv_len: gather, expand kv heads, SDPA.
    q and out ``[batch * q_len, q_heads, d]``."""
    k, v = gather_kv(cache, table)
    b, n = table.batch, table.kv_len
    hq, d = q.shape[1:]
    group = hq // k.shape[2]
    qb = q.view(b, n, hq, d).transpose(1, 2)
    k = k.transpose(1, 2).repeat_interleave(group, dim=1)
    v = v.transpose(1, 2).repeat_interleave(group, dim=1)
    o = F.scaled_dot_product_attention(qb, k, v, is_causal=True)
    return out.copy_(o.transpose(1, 2).reshape(b * n, hq, d))
