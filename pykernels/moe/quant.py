"""FP8 (e4m3) activation quantization for the fused-MoE w8a8 path: one scale per row (token),
computed on the device from the row's absolute maximum, or one given per-tensor scale.

    q, scale = quantize_fp8(x)                 # dynamic: scale[r] = max|x[r]| / 448
    q, scale = quantize_fp8(x, a_scale)        # static: q = x / a_scale, scale is a_scale

``q = clamp(x / scale, -448, 448)`` rounded to float8_e4m3fn; the GEMM multiplies its fp32
accumulator by ``scale[row] * w_scale`` in the epilogue. No host sync: CUDA-graph capturable.
Divisions round to nearest (div_rn, not Triton's approximate ``/``), so the kernel and the torch
path agree bit for bit.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
# A row of zeros gets this scale, not 0 (0 / 0 would poison the row with NaNs).
MIN_SCALE = 1e-12
# Rows up to this many columns are quantized from registers in one pass (H = 7168, I = 14336
# of the bench models fit); longer rows are read twice.
ONE_PASS_MAX = 16384



class Fp8(NamedTuple):
    """The w8a8 arguments of one GEMM: weight scale ``[E]`` (per tensor) or ``[E, N]`` (per
    output channel), fp32; ``a_scale``: a static per-tensor activation scale ``[1]``, or None
    for dynamic per-token scales."""

    w_scale: torch.Tensor
    a_scale: torch.Tensor | None


try:  # the kernel is optional: the torch path below serves CPU tensors
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a dependency on GPU machines
    triton = None

if triton is not None:

    @triton.jit
    def _quant_fp8_kernel(x_ptr, q_ptr, s_ptr, static_ptr, cols, x_stride, q_stride,
                          STATIC: tl.constexpr, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr,
                          QMAX: tl.constexpr, SMIN: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        src = x_ptr + row * x_stride
        dst = q_ptr + row * q_stride
        offs = tl.arange(0, BLOCK)
        if ONE_PASS:
            mask = offs < cols
            x = tl.load(src + offs, mask=mask, other=0.0).to(tl.float32)
            if STATIC:
                scale = tl.load(static_ptr).to(tl.float32)
            else:
                scale = tl.maximum(tl.div_rn(tl.max(tl.abs(x), axis=0), QMAX), SMIN)
                tl.store(s_ptr + row, scale)
            q = tl.clamp(tl.div_rn(x, scale), -QMAX, QMAX)
            tl.store(dst + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
        else:
            if STATIC:
                scale = tl.load(static_ptr).to(tl.float32)
            else:
                amax = tl.zeros([BLOCK], dtype=tl.float32)
                for start in range(0, cols, BLOCK):
                    x = tl.load(src + start + offs, mask=start + offs < cols, other=0.0)
                    amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
                scale = tl.maximum(tl.div_rn(tl.max(amax, axis=0), QMAX), SMIN)
                tl.store(s_ptr + row, scale)
            for start in range(0, cols, BLOCK):
                mask = start + offs < cols
                x = tl.load(src + start + offs, mask=mask, other=0.0).to(tl.float32)
                q = tl.clamp(tl.div_rn(x, scale), -QMAX, QMAX)
                tl.store(dst + start + offs, q.to(q_ptr.dtype.element_ty), mask=mask)

def quantize_fp8_torch(x: torch.Tensor, a_scale: torch.Tensor | None = None):
    """The same quantization in torch: (q [rows, cols] fp8, scale [rows] or a_scale [1] fp32)."""
    xf = x.float()
    if a_scale is None:
        amax = xf.abs().amax(dim=-1)
        # by a tensor: torch divides by a Python number as a multiply by its (inexact)
        # reciprocal, which is 1 ulp off div_rn for some amax
        scale = (amax / torch.full_like(amax, FP8_MAX)).clamp_min(MIN_SCALE)
        q = (xf / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        return q, scale
    scale = a_scale.float().reshape(1)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def quantize_fp8(x: torch.Tensor, a_scale: torch.Tensor | None = None, *,
                 out: torch.Tensor | None = None, out_scale: torch.Tensor | None = None,
                 backend: str = "auto"):
    """Quantize rows of ``x [rows, cols]`` (last dimension contiguous) to float8_e4m3fn.

    Parameters
    ----------
    a_scale : 1-element fp32 tensor, optional
        Static per-tensor scale; None computes one scale per row.
    out, out_scale : preallocated ``[rows, cols]`` fp8 and ``[rows]`` fp32 buffers (optional).
    backend : {"auto", "triton", "torch"}; auto = Triton on CUDA tensors, torch elsewhere.

    Returns
    -------
    (q, scale): scale is ``[rows]`` (dynamic) or ``a_scale`` viewed as ``[1]`` (static).
    """
    rows, cols = x.shape
    use_triton = backend == "triton" or (backend == "auto" and x.is_cuda and triton is not None)
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if not use_triton:
        q, scale = quantize_fp8_torch(x, a_scale)
        if out is not None:
            q = out.copy_(q)
        if out_scale is not None and a_scale is None:
            scale = out_scale.copy_(scale)
        return q, scale
    q = out if out is not None else torch.empty(rows, cols, dtype=FP8_DTYPE, device=x.device)
    if a_scale is not None:
        scale = a_scale.reshape(1)
    else:
        scale = out_scale if out_scale is not None else torch.empty(
            rows, dtype=torch.float32, device=x.device)
    if rows and cols:
        _launch(x, q, scale, a_scale is not None)
    return q, scale


def _launch(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, static: bool) -> None:
    rows, cols = x.shape
    block = min(triton.next_power_of_2(cols), ONE_PASS_MAX)
    # ~8 values per thread at full width: 16 B of bf16 per load.
    warps = max(1, min(16, block // 256))
    _quant_fp8_kernel[(rows,)](
        x, q, scale, scale, cols, x.stride(0), q.stride(0), STATIC=static, BLOCK=block,
        ONE_PASS=block >= cols, QMAX=FP8_MAX, SMIN=MIN_SCALE, num_warps=warps,
    )
