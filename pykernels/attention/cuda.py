"""The "cuda" attention backend: paged decode and KV append through the CUDA op library
(csrc/attention); importing this module loads it. No prefill kernel here (use triton or fi).

The decode kernel merges split-KV partials in the last CTA of each (request, head group) to
finish, counted by int32 counters that every launch leaves at zero. Plans own theirs; plain
``paged_decode`` calls share one zeroed buffer per device (grown outside graph capture), which is
why concurrent plain calls on two streams of one device must not overlap: give each stream its
own ``PagedDecode``.
"""

from __future__ import annotations

import torch

from pykernels import _ops
from pykernels.attention import _common, tunables

_ops.load()

_EMPTY: dict[torch.device, torch.Tensor] = {}
_COUNTERS: dict[torch.device, torch.Tensor] = {}


@torch.library.register_fake("pykernels::paged_decode")
def _paged_decode_fake(out, q, kv_cache, kv_indptr, kv_indices, kv_last_page_len, partial_o,
                       partial_lse, counters, num_splits, num_stages, sm_scale, logits_soft_cap,
                       window_left, k_scale, v_scale) -> None:
    return None


@torch.library.register_fake("pykernels::append_paged_kv")
def _append_paged_kv_fake(k, v, kv_cache, slot_mapping, k_scale, v_scale) -> None:
    return None


def decode_plan(spec: _common.Spec, batch: int, total_pages: int, config: dict | None) -> dict:
    """``num_splits`` and ``num_stages``: the tile shapes are compiled in
    (csrc/attention/decode_utils.cuh).
    From ``config``, else the tuned value (Tunable ``paged_decode_cuda``, memoized per bucket);
    0 means the heuristic."""
    if not config:
        config = tunables.DECODE_CUDA.lookup(batch=max(batch, 1),
                                             **tunables.spec_key(spec, total_pages, batch))
    splits = config.get("num_splits", 0)
    if not splits:
        avg_len = total_pages * spec.page_size / max(batch, 1)
        chunks = -(-spec.group // 16)  # 16 q heads per CTA (csrc/attention/decode.cuh)
        splits = _common.choose_splits(batch, spec.num_kv_heads * chunks, avg_len,
                                       _common.sm_count(spec.device))
    # num_stages: cp.async pipeline depth, 2 or 3 (0: the kernel's default for the head_dim)
    return {"num_splits": int(min(splits, _common.CUDA_MAX_SPLITS)),
            "num_stages": int(config.get("num_stages", 0))}


def _empty(device: torch.device) -> torch.Tensor:
    t = _EMPTY.get(device)
    if t is None:
        t = _EMPTY[device] = torch.empty(0, dtype=torch.float32, device=device)
    return t


def _shared_counters(device: torch.device, n: int) -> torch.Tensor:
    t = _COUNTERS.get(device)
    if t is None or t.numel() < n:
        if torch.cuda.is_current_stream_capturing():
            # Memory allocated during capture belongs to the graph: keep it out of the cache.
            return torch.zeros(n, dtype=torch.int32, device=device)
        t = _COUNTERS[device] = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
    return t


def decode(out, q, kv_cache, table: _common.Table, params: _common.Params,
           work: _common.DecodeWork, cfg: dict) -> None:
    splits = work.num_splits
    if splits > 1:
        counters = work.counters
        if counters is None:
            counters = _shared_counters(q.device, q.shape[0] * q.shape[1])
        po, plse = work.partial_o, work.partial_lse
    else:  # one split: the launcher reads no workspace
        po = plse = counters = _empty(q.device)
    torch.ops.pykernels.paged_decode(
        out, q, kv_cache, table.kv_indptr, table.kv_indices, table.kv_last_page_len, po, plse,
        counters, splits, cfg.get("num_stages", 0), params.sm_scale, params.logits_soft_cap,
        params.window_left, params.k_scale, params.v_scale)


def append(k, v, kv_cache, slot_mapping, k_scale: float, v_scale: float) -> None:
    torch.ops.pykernels.append_paged_kv(k, v, kv_cache, slot_mapping, k_scale, v_scale)
