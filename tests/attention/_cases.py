"""Paged-attention test inputs: ragged page tables in random page order, caches, naive oracle."""

from __future__ import annotations

import math

import torch

from pykernels.attention import page_table

# (atol, rtol) of a backend against the fp32 reference: P rounded to the dtype before P.V in the
# tensor-core kernels, one output rounding; fp8 caches compare against the reference fed the
# same fp8 values, so only the kernel's own roundings count.
TOL = {
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


class Paged:
    """A batch of requests with kv lengths `kv_lens` (0 allowed) and `q_lens` new queries each,
    pages of `page_size` handed out in a seeded random order, a few spare pages unused."""

    def __init__(self, kv_lens, page_size, num_kv_heads, head_dim, dtype, device="cpu",
                 q_lens=None, kv_dtype=None, spare=3, seed=0):
        self.kv_lens = list(kv_lens)
        self.q_lens = list(q_lens) if q_lens is not None else [1] * len(self.kv_lens)
        self.page_size = page_size
        gen = torch.Generator().manual_seed(seed)
        pages = [math.ceil(n / page_size) for n in self.kv_lens]
        self.num_pages = sum(pages) + spare
        order = torch.randperm(self.num_pages, generator=gen)
        blocks = torch.zeros(len(pages), max(pages + [1]), dtype=torch.int64)
        at = 0
        for r, n in enumerate(pages):
            blocks[r, :n] = order[at:at + n]
            at += n
        indptr, indices, last = page_table(blocks, torch.tensor(self.kv_lens, dtype=torch.long),
                                           page_size)
        self.kv_indptr, self.kv_indices, self.kv_last_page_len = (
            t.to(device) for t in (indptr, indices, last))
        qo = torch.zeros(len(self.q_lens) + 1, dtype=torch.int32)
        qo[1:] = torch.tensor(self.q_lens, dtype=torch.int32).cumsum(0)
        self.qo_indptr = qo.to(device)
        shape = (self.num_pages, 2, page_size, num_kv_heads, head_dim)
        cache = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
        if kv_dtype is not None and kv_dtype != dtype:
            cache = (cache.float() * 4).to(kv_dtype)  # spread over e4m3's range
        self.cache = cache

    @property
    def table(self):
        return self.kv_indptr, self.kv_indices, self.kv_last_page_len

    def q(self, num_q_heads, head_dim, dtype, rows=None, strided=False):
        rows = sum(self.q_lens) if rows is None else rows
        device = self.cache.device
        if strided:  # heads and rows strided: a slice of a wider qkv projection
            big = torch.randn(rows, num_q_heads * 2, head_dim + 64, device=device, dtype=dtype)
            return big[:, ::2, 32:32 + head_dim]
        return torch.randn(rows, num_q_heads, head_dim, device=device, dtype=dtype)


def naive(q, cache, kv_lens, q_lens, blocks_of, *, causal=True, sm_scale=None, soft_cap=0.0,
          window_left=-1, k_scale=1.0, v_scale=1.0):
    """float64, one query row and one head at a time, straight from the definitions: the oracle
    of the reference. `blocks_of(r)` lists request r's pages."""
    hq, d = q.shape[1], q.shape[2]
    hkv, ps = cache.shape[3], cache.shape[2]
    scale = 1 / math.sqrt(d) if sm_scale is None else sm_scale
    out = torch.zeros(q.shape, dtype=torch.float64)
    row = 0
    for r, (kv_len, q_len) in enumerate(zip(kv_lens, q_lens)):
        pages = blocks_of(r)
        keys = [(pages[j // ps], j % ps) for j in range(kv_len)]
        for i in range(q_len):
            pos = kv_len - q_len + i
            for h in range(hq):
                kh = h // (hq // hkv)
                logits, values = [], []
                for j, (pg, off) in enumerate(keys):
                    if (causal and j > pos) or (window_left >= 0 and j < pos - window_left):
                        continue
                    k = cache[pg, 0, off, kh].double() * k_scale
                    s = float(q[row + i, h].double() @ k) * scale
                    if soft_cap > 0:
                        s = soft_cap * math.tanh(s / soft_cap)
                    logits.append(s)
                    values.append(cache[pg, 1, off, kh].double() * v_scale)
                if logits:
                    w = torch.softmax(torch.tensor(logits, dtype=torch.float64), 0)
                    out[row + i, h] = (w[:, None] * torch.stack(values)).sum(0)
        row += q_len
    return out
