"""The "triton" attention backend: decode (triton_decode.py), prefill (triton_prefill.py) and the
KV append kernel below."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pykernels.attention import triton_decode, triton_prefill

# fp8 e4m3 (OCP, "fn") saturates here; larger magnitudes would become NaN.
FP8_MAX = tl.constexpr(448.0)


@triton.jit
def _append_kernel(k_ptr, v_ptr, cache_ptr, slot_ptr, stride_kt, stride_kh, stride_vt,
                   stride_vh, stride_page, stride_kv, stride_tok, stride_head,
                   num_kv_heads, inv_k_scale, inv_v_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, PAGE_SIZE: tl.constexpr,
                   FP8: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    if slot < 0:  # padding token
        return
    page = slot // PAGE_SIZE
    dst = cache_ptr + page * stride_page + (slot % PAGE_SIZE) * stride_tok
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM)
    mask = offs_h[:, None] < num_kv_heads
    dst_off = offs_h[:, None] * stride_head + offs_d[None, :]
    k = tl.load(k_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    k = k.to(tl.float32) * inv_k_scale
    v = v.to(tl.float32) * inv_v_scale
    if FP8:
        k = tl.clamp(k, -FP8_MAX, FP8_MAX)
        v = tl.clamp(v, -FP8_MAX, FP8_MAX)
    tl.store(dst + dst_off, k.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + stride_kv + dst_off, v.to(cache_ptr.dtype.element_ty), mask=mask)


def append(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
           k_scale: float, v_scale: float) -> None:
    nnz, hkv, d = k.shape
    if nnz == 0:
        return
    block_h = min(triton.next_power_of_2(hkv), max(1, 2048 // d))
    fp8 = kv_cache.dtype == torch.float8_e4m3fn
    _append_kernel[(nnz, triton.cdiv(hkv, block_h))](
        k, v, kv_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        hkv, 1.0 / k_scale, 1.0 / v_scale,
        HEAD_DIM=d, BLOCK_H=block_h, PAGE_SIZE=kv_cache.shape[2], FP8=fp8, num_warps=4,
    )


decode_plan = triton_decode.plan
decode = triton_decode.decode
prefill_plan = triton_prefill.plan
prefill = triton_prefill.prefill
