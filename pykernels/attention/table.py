"""Building the CSR page table and the append slots from what a serving engine keeps.

An engine usually holds, per request, a block table (the page ids it owns, padded) and a length.
``page_table(block_tables, seq_lens, page_size)`` turns that into FlashInfer's CSR form;
``append_slots(...)`` gives the flat cache slot (``page * page_size + offset``) of each new token,
the input of ``append_paged_kv``.
"""

from __future__ import annotations

import torch

from pykernels.attention import _common
from pykernels.attention.ref import seq_lens


def _pages_per_request(seq_lens: torch.Tensor, page_size: int) -> torch.Tensor:
    return (seq_lens.long() + page_size - 1) // page_size


def page_table(block_tables: torch.Tensor, seq_lens: torch.Tensor,
               page_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(kv_indptr, kv_indices, kv_last_page_len)`` (int32) from padded per-request block
    tables.

    Parameters
    ----------
    block_tables : int Tensor ``[batch, max_pages]``; row r lists request r's pages in order
        (entries past ``ceil(seq_lens[r] / page_size)`` are ignored).
    seq_lens : int Tensor ``[batch]``, tokens per request (0 allowed).
    page_size : int

    On CUDA tensors the compaction reads the total page count back (one host sync); build the
    table from host tensors to keep the step free of syncs.

    Examples
    --------
    >>> import torch
    >>> indptr, indices, last = page_table(torch.tensor([[3, 1], [0, 9]]), torch.tensor([17, 5]),
    ...                                    16)
    >>> indptr.tolist(), indices.tolist(), last.tolist()
    ([0, 2, 3], [3, 1, 0], [1, 5])
    """
    if block_tables.dim() != 2:
        raise ValueError(f"block_tables must be 2-D [batch, max_pages], got shape "
                         f"{tuple(block_tables.shape)}")
    _common.index_tensor("seq_lens", seq_lens, block_tables.shape[0])
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")
    pages = _pages_per_request(seq_lens, page_size)
    if block_tables.shape[0] and int(pages.max()) > block_tables.shape[1]:
        raise ValueError(f"block_tables has {block_tables.shape[1]} columns, fewer than the "
                         f"{int(pages.max())} pages the longest request needs")
    cols = torch.arange(block_tables.shape[1], device=block_tables.device)
    kv_indices = block_tables[cols[None, :] < pages[:, None]].to(torch.int32)
    kv_indptr = torch.zeros(block_tables.shape[0] + 1, dtype=torch.int32,
                            device=block_tables.device)
    torch.cumsum(pages, 0, out=kv_indptr[1:])
    last = seq_lens.long() - (pages - 1).clamp(min=0) * page_size
    return kv_indptr, kv_indices, last.to(torch.int32)


def append_slots(kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
                 kv_last_page_len: torch.Tensor, append_indptr: torch.Tensor, page_size: int,
                 num_tokens: int | None = None) -> torch.Tensor:
    """Flat cache slots (int64 ``[num_tokens]``) of appended tokens.

    The page table already counts the new tokens: request r appends
    ``append_indptr[r + 1] - append_indptr[r]`` tokens, which are the last ones of its sequence.
    Token i of request r (in append order) lands at position ``kv_len[r] - n_r + i``.
    ``num_tokens`` (the row count of k/v) keeps this free of host syncs; default: read back.
    """
    _common.check_table(kv_indptr, kv_indices, kv_last_page_len)
    _common.index_tensor("append_indptr", append_indptr, kv_indptr.shape[0])
    device = kv_indptr.device
    if num_tokens is None:
        num_tokens = int(append_indptr[-1] - append_indptr[0])
    lens = seq_lens(kv_indptr, kv_last_page_len, page_size)
    n_app = (append_indptr[1:] - append_indptr[:-1]).long()
    tok = torch.arange(num_tokens, device=device) + append_indptr[0].long()
    # Request of each appended token: append_indptr[r] <= tok < append_indptr[r + 1].
    req = torch.searchsorted(append_indptr[1:].long().contiguous(), tok, right=True)
    req = req.clamp(max=max(kv_indptr.shape[0] - 2, 0))
    pos = lens[req] - n_app[req] + (tok - append_indptr[:-1].long()[req])
    page = kv_indices.long()[kv_indptr.long()[req] + pos // page_size]
    return page * page_size + pos % page_size

