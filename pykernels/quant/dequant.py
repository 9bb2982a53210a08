"""The large-M backend of fp8_marlin_gemm: dequantize a slab of weight rows to the activation
dtype (Triton), then multiply on cuBLAS (``torch.mm``), slab by slab.

At M >= ~256 the GEMM is compute-bound, and cuBLAS's wgmma kernels reach ~700 TFLOP/s on an H200
where our mma.sync kernel with in-loop dequant reaches ~330 and the Triton twin ~520
(docs/quant.md). The fp8 weight is still what sits in memory: each slab (~16 MB of bf16, so it
stays in the 60 MB L2 for the GEMM that reads it) costs one read of its fp8 bytes and one L2
write. Scales fold into the slab in fp32 before the cast, so the weight is rounded once to the
activation dtype (2^-9 relative for bf16), like the CUDA kernel's group mode.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

PANEL = 128
SLAB_BYTES = 16 << 20  # bf16 bytes per slab: L2-resident while the GEMM reads it
BLOCK_N = 32


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, o_ptr, N, K, n0, n1,
                    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, PANEL: tl.constexpr):
    """o[n - n0, k] = q[n, k] * scale (fp32, then o's dtype) for rows [n0, n1) and one panel."""
    rows = n0 + tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    kt = tl.program_id(1)
    j = tl.arange(0, PANEL)
    in_rows = rows < n1
    q = tl.load(w_ptr + kt.to(tl.int64) * N * PANEL + rows[:, None] * PANEL + j[None, :],
                mask=in_rows[:, None], other=0.0)
    if GROUP:
        s = tl.load(s_ptr + kt * N + rows, mask=in_rows, other=0.0)
    else:
        s = tl.load(s_ptr + rows, mask=in_rows, other=0.0)
    w = (q.to(tl.float32) * s[:, None]).to(o_ptr.dtype.element_ty)
    k = kt * PANEL + j
    o = o_ptr + (rows - n0)[:, None].to(tl.int64) * K + k[None, :]
    tl.store(o, w, mask=in_rows[:, None] & (k < K)[None, :])


def dequantize_rows(qweight: torch.Tensor, scales: torch.Tensor, k: int, n0: int, n1: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """Rows [n0, n1) of the weight, dequantized: [n1 - n0, k] in `dtype`."""
    kt, n = qweight.shape[0], qweight.shape[1]
    out = torch.empty(n1 - n0, k, dtype=dtype, device=qweight.device)
    grid = (triton.cdiv(n1 - n0, BLOCK_N), kt)
    _dequant_kernel[grid](qweight, scales, out, n, k, n0, n1, GROUP=scales.dim() == 2,
                          BLOCK_N=BLOCK_N, PANEL=PANEL, num_warps=4)
    return out


def gemm(x2d: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, out: torch.Tensor, *,
         stages: int | None = None, deterministic: bool = False) -> None:
    """Writes ``out [M, N]``; checked inputs (gemm.py). ``stages`` has no meaning here (cuBLAS
    pipelines itself) and cuBLAS is deterministic for a fixed shape, so both are accepted."""
    k, n = x2d.shape[1], qweight.shape[1]
    rows = max(64, SLAB_BYTES // (2 * k) // 64 * 64)
    for n0 in range(0, n, rows):
        n1 = min(n, n0 + rows)
        w = dequantize_rows(qweight, scales, k, n0, n1, x2d.dtype)
        if n0 == 0 and n1 == n and out.is_contiguous():
            torch.mm(x2d, w.t(), out=out)
        else:
            out[:, n0:n1].copy_(torch.mm(x2d, w.t()))
