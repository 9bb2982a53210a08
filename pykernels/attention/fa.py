"""The "fa" attention backend: flash-attn 2's paged varlen kernel, when flash-attn is installed.

UNTESTED: flash-attn is not installed on our CPU or GPU machines; this adapter follows the
documented flash-attn >= 2.6 API (``flash_attn_varlen_func(..., block_table=...)``), whose paged
mode requires a page size that is a multiple of 256. The CSR page table is turned into flash-attn's
padded block table at plan time (one host read), so plans are eager-only, not graph-capturable.
fp8 caches are refused.
"""

from __future__ import annotations

import torch

from pykernels._ops import BackendUnavailable
from pykernels.attention import _common
from pykernels.attention.ref import seq_lens

try:
    from flash_attn import flash_attn_varlen_func
except ImportError as err:
    raise BackendUnavailable("flash-attn is not installed (pip install flash-attn); "
                             "use backend 'fi', 'triton' or 'cuda'") from err

PAGE_MULTIPLE = 256  # flash-attn 2 paged KV: page_block_size % 256 == 0


def _check(spec: _common.Spec) -> None:
    if spec.page_size % PAGE_MULTIPLE:
        raise ValueError(f"fa: flash-attn's paged kernel needs page_size % {PAGE_MULTIPLE} == 0, "
                         f"got {spec.page_size}")
    if spec.kv_dtype != spec.q_dtype:
        raise TypeError("fa: flash-attn has no fp8 KV cache path here; use 'fi' or 'triton'")


class PrefillRunner:
    def __init__(self, spec: _common.Spec, attn: _common.Params, *, causal: bool = True,
                 **_unused):
        _check(spec)
        self.spec, self.attn, self.causal = spec, attn, causal
        self.cfg: dict = {"num_splits": 1}
        self.max_page = -1

    def plan(self, qo_indptr, kv_indptr, kv_indices, kv_last_page_len, num_tokens=None):
        dev = self.spec.device
        indptr, indices = kv_indptr.cpu().long(), kv_indices.cpu()
        lens = seq_lens(indptr, kv_last_page_len.cpu(), self.spec.page_size)
        counts = (indptr[1:] - indptr[:-1]).tolist()
        table = torch.zeros(len(counts), max(counts + [1]), dtype=torch.int32)
        for r, n in enumerate(counts):
            table[r, :n] = indices[int(indptr[r]):int(indptr[r]) + n]
        qo = qo_indptr.cpu().long()
        self.num_tokens = int(qo[-1] - qo[0]) if num_tokens is None else num_tokens
        self.block_table = table.to(dev)
        self.cu_q = qo.to(torch.int32).to(dev)
        self.cu_k = torch.cat([lens.new_zeros(1), lens.cumsum(0)]).to(torch.int32).to(dev)
        self.max_q = int((qo[1:] - qo[:-1]).max()) if len(counts) else 0
        self.max_k = int(lens.max()) if len(counts) else 0

    def run(self, q, kv_cache, out, k_scale: float, v_scale: float):
        if k_scale != 1.0 or v_scale != 1.0:
            raise ValueError("fa: k_scale/v_scale are not supported")
        a = self.attn
        window = (a.window_left, 0 if self.causal else -1)
        o = flash_attn_varlen_func(
            q, kv_cache[:, 0], kv_cache[:, 1], self.cu_q, self.cu_k, self.max_q, self.max_k,
            softmax_scale=a.sm_scale, causal=self.causal, window_size=window,
            softcap=a.logits_soft_cap, block_table=self.block_table)
        return out.copy_(o)


class DecodeRunner(PrefillRunner):
    """Decode as prefill with one query per request."""

    def plan(self, kv_indptr, kv_indices, kv_last_page_len):
        qo = torch.arange(kv_indptr.shape[0], dtype=torch.int32)
        super().plan(qo, kv_indptr, kv_indices, kv_last_page_len)
