"""RMSNorm and fused add + RMSNorm in Triton: one program per row, fp32 statistics.

Rows that fit one block (BLOCK >= hidden) are read once; longer rows are read in BLOCK-wide chunks,
twice (statistics, then scale)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from autotune import Tunable


@triton.jit
def _rms_norm_kernel(out_ptr, in_ptr, w_ptr, hidden, out_stride, in_stride, eps,
                     BLOCK: tl.constexpr, ONE_PASS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    src = in_ptr + row * in_stride
    dst = out_ptr + row * out_stride
    if ONE_PASS:
        cols = tl.arange(0, BLOCK)
        mask = cols < hidden
        x = tl.load(src + cols, mask=mask, other=0.0).to(tl.float32)
        inv_rms = tl.rsqrt(tl.sum(x * x, axis=0) / hidden + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(dst + cols, (x * inv_rms * w).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, hidden, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(src + cols, mask=cols < hidden, other=0.0).to(tl.float32)
            acc += x * x
        inv_rms = tl.rsqrt(tl.sum(acc, axis=0) / hidden + eps)
        for start in range(0, hidden, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < hidden
            x = tl.load(src + cols, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(dst + cols, (x * inv_rms * w).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fused_add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, hidden, x_stride, res_stride, eps,
                               BLOCK: tl.constexpr, ONE_PASS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    xr = x_ptr + row * x_stride
    rr = res_ptr + row * res_stride
    if ONE_PASS:
        cols = tl.arange(0, BLOCK)
        mask = cols < hidden
        s = tl.load(xr + cols, mask=mask, other=0.0).to(tl.float32)
        s += tl.load(rr + cols, mask=mask, other=0.0).to(tl.float32)
        s = s.to(res_ptr.dtype.element_ty)  # statistics of the rounded sum, as stored
        tl.store(rr + cols, s, mask=mask)
        s = s.to(tl.float32)
        inv_rms = tl.rsqrt(tl.sum(s * s, axis=0) / hidden + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(xr + cols, (s * inv_rms * w).to(x_ptr.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, hidden, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < hidden
            s = tl.load(xr + cols, mask=mask, other=0.0).to(tl.float32)
            s += tl.load(rr + cols, mask=mask, other=0.0).to(tl.float32)
            s = s.to(res_ptr.dtype.element_ty)
            tl.store(rr + cols, s, mask=mask)
            s = s.to(tl.float32)
            acc += s * s
        inv_rms = tl.rsqrt(tl.sum(acc, axis=0) / hidden + eps)
        # The second pass reads back residual values this program stored: order them.
        tl.debug_barrier()
        for start in range(0, hidden, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < hidden
            s = tl.load(rr + cols, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(xr + cols, (s * inv_rms * w).to(x_ptr.dtype.element_ty), mask=mask)


# Rows up to this many elements are normalized from registers in one pass.
ONE_PASS_MAX = 16384


def default_config(hidden: int) -> dict:
    block = min(triton.next_power_of_2(max(hidden, 1)), ONE_PASS_MAX)
    # ~8 elements per thread: 16 B of bf16 per load.
    warps = max(1, min(16, block // 256))
    return {"BLOCK": block, "num_warps": warps}


def _default(hidden, **_):
    return default_config(hidden)


# Tuned by `python -m autotune.norm`; config=None launches look their config up here.
RMS_NORM = Tunable("rms_norm", family="norm", key=("hidden", "dtype"), bucket="tokens",
                   default=_default, sources=(__file__,))
FUSED_ADD_RMS_NORM = Tunable("fused_add_rms_norm", family="norm", key=("hidden", "dtype"),
                             bucket="tokens", default=_default, sources=(__file__,))


def _launch(kernel, tunable, a, b, weight, eps, config):
    rows, hidden = a.shape
    if rows == 0:
        return
    cfg = config or tunable.lookup(tokens=rows, hidden=hidden, dtype=a.dtype)
    kernel[(rows,)](
        a, b, weight, hidden, a.stride(0), b.stride(0), eps,
        BLOCK=cfg["BLOCK"], ONE_PASS=cfg["BLOCK"] >= hidden, num_warps=cfg["num_warps"],
    )


def rms_norm(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float,
             config: dict | None = None) -> None:
    """out, x: [rows, hidden] with a contiguous last dimension; weight [hidden]."""
    _launch(_rms_norm_kernel, RMS_NORM, out, x, weight, eps, config)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float, config: dict | None = None) -> None:
    """In place: residual <- x + residual; x <- rms_norm(residual) * weight."""
    _launch(_fused_add_rms_norm_kernel, FUSED_ADD_RMS_NORM, x, residual, weight, eps, config)
