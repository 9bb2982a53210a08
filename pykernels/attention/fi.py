"""The "fi" attention backend: FlashInfer's paged wrappers behind our plan/run interface.

flashinfer is imported when this backend is first used (it is absent on CPU boxes). Decode uses
``BatchDecodeWithPagedKVCacheWrapper`` on tensor cores when VLLM_FLASHINFER_FORCE_TENSOR_CORES=1
or the GQA group is >= 4: at 32 q / 8 kv heads its tensor-core path beat the CUDA-core one on
every H200 anchor row (e.g. bs=64, kv 4096: 257 vs 418 us under graph replay, ANCHORS.md).
Prefill uses ``BatchPrefillWithPagedKVCacheWrapper``.

CUDA graphs: FlashInfer fixes the batch size of a graph-mode decode wrapper, so a fixed-buffer
runner keeps one wrapper per batch size (sharing one float workspace, as vLLM does). Prefill
plans are eager-only (its graph mode needs more fixed buffers than this adapter sets up).
"""

from __future__ import annotations

import torch

from pykernels import envs
from pykernels._ops import BackendUnavailable
from pykernels.attention import _common

try:
    import flashinfer
except ImportError as err:
    raise BackendUnavailable(
        "flashinfer is not installed (pip install flashinfer-python)") from err

# Float workspace for FlashInfer's split-KV partials, vLLM's size: the 128 MB FlashInfer suggests
# overflowed on the tensor-core decode at bs=512 (167.5 MB of batch_prefill_tmp_v; H200, results/
# nvidia-h200/attention/attention_gpu-20261121-346540e.log).
WORKSPACE_BYTES = 394 << 20
_SHARED: dict[torch.device, torch.Tensor] = {}
# Eager wrappers reused by plain paged_decode/paged_prefill calls (a new wrapper pins host memory).
_PLAIN: dict[tuple, object] = {}


def _workspace(device: torch.device, shared: bool) -> torch.Tensor:
    if not shared:
        return torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
    if device not in _SHARED:
        _SHARED[device] = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
    return _SHARED[device]


def use_tensor_cores(group: int) -> bool:
    return bool(envs.VLLM_FLASHINFER_FORCE_TENSOR_CORES) or group >= 4


def _host_check(kv_indptr, kv_indices, kv_last_page_len, page_size) -> int:
    if kv_indptr.device.type != "cpu":
        return -1
    return _common.validate_table_values(kv_indptr, kv_indices, kv_last_page_len, page_size,
                                         None)


def _plan_kwargs(spec: _common.Spec, attn: _common.Params) -> dict:
    return {"window_left": attn.window_left,
            "logits_soft_cap": attn.logits_soft_cap or None, "sm_scale": attn.sm_scale,
            "q_data_type": spec.q_dtype, "kv_data_type": spec.kv_dtype}


def _i32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.int32 else t.to(torch.int32)


def _scale(x: float) -> float | None:
    return None if x == 1.0 else x


class DecodeRunner:
    def __init__(self, spec: _common.Spec, attn: _common.Params, *, max_batch=None,
                 max_pages=None, config=None):
        self.spec, self.attn = spec, attn
        self.fixed = max_batch is not None
        self.max_batch, self.max_pages = max_batch, max_pages
        self.workspace = _workspace(spec.device, shared=not self.fixed)
        self.tensor_cores = use_tensor_cores(spec.group)
        self._wrappers: dict[int, object] = {}
        self.cfg = {"num_splits": 1, "tensor_cores": self.tensor_cores}
        self.max_page = -1

    def _wrapper(self, batch: int):
        cache = self._wrappers if self.fixed else _PLAIN
        key = batch if self.fixed else ("decode", self.spec.device, self.tensor_cores)
        w = cache.get(key)
        if w is None:
            kw = {}
            if self.fixed:
                dev = self.spec.device
                kw = {"paged_kv_indptr_buffer": torch.empty(batch + 1, dtype=torch.int32,
                                                            device=dev),
                      "paged_kv_indices_buffer": torch.empty(max(self.max_pages, 1),
                                                             dtype=torch.int32, device=dev),
                      "paged_kv_last_page_len_buffer": torch.empty(batch, dtype=torch.int32,
                                                                   device=dev)}
            w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                self.workspace, "NHD", use_cuda_graph=self.fixed,
                use_tensor_cores=self.tensor_cores, **kw)
            cache[key] = w
        return w

    def plan(self, kv_indptr, kv_indices, kv_last_page_len) -> None:
        batch = kv_indptr.shape[0] - 1
        if self.fixed and batch > self.max_batch:
            raise ValueError(f"batch {batch} exceeds max_batch {self.max_batch} of this plan")
        self.max_page = _host_check(kv_indptr, kv_indices, kv_last_page_len, self.spec.page_size)
        self.w = self._wrapper(batch)
        s = self.spec
        self.w.plan(_i32(kv_indptr), _i32(kv_indices), _i32(kv_last_page_len), s.num_q_heads,
                    s.num_kv_heads, s.head_dim, s.page_size, pos_encoding_mode="NONE",
                    **_plan_kwargs(s, self.attn))

    def run(self, q, kv_cache, out, k_scale: float, v_scale: float):
        self.w.run(q, kv_cache, out=out, k_scale=_scale(k_scale), v_scale=_scale(v_scale))
        return out


class PrefillRunner:
    def __init__(self, spec: _common.Spec, attn: _common.Params, *, causal=True, max_batch=None,
                 max_pages=None, max_tokens=None, config=None):
        self.spec, self.attn, self.causal = spec, attn, causal
        key = ("prefill", spec.device)
        if max_batch is None and key in _PLAIN:
            self.w = _PLAIN[key]
        else:
            self.w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
                _workspace(spec.device, shared=max_batch is None), "NHD")
            if max_batch is None:
                _PLAIN[key] = self.w
        self.cfg = {}
        self.max_page = -1

    def plan(self, qo_indptr, kv_indptr, kv_indices, kv_last_page_len,
             num_tokens: int | None = None) -> None:
        if num_tokens is None:
            num_tokens = int(qo_indptr[-1] - qo_indptr[0])
        self.num_tokens = num_tokens
        self.max_page = _host_check(kv_indptr, kv_indices, kv_last_page_len, self.spec.page_size)
        s = self.spec
        self.w.plan(_i32(qo_indptr), _i32(kv_indptr), _i32(kv_indices), _i32(kv_last_page_len),
                    s.num_q_heads, s.num_kv_heads, s.head_dim, s.page_size, causal=self.causal,
                    **_plan_kwargs(s, self.attn))

    def run(self, q, kv_cache, out, k_scale: float, v_scale: float):
        self.w.run(q, kv_cache, out=out, k_scale=_scale(k_scale), v_scale=_scale(v_scale))
        return out
