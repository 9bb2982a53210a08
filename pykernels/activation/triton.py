"""silu_and_mul in Triton: one program per (row, column block), fp32 math."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from autotune import Tunable


@triton.jit
def _silu_and_mul_kernel(out_ptr, in_ptr, d, in_stride, out_stride, BLOCK: tl.constexpr):
    # Rows on grid axis 0 (up to 2^31 - 1); axes 1 and 2 stop at 65535.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    src = in_ptr + row * in_stride
    gate = tl.load(src + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(src + d + cols, mask=mask, other=0.0).to(tl.float32)
    y = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * out_stride + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def default_config(d: int) -> dict:
    # 1024 columns x 4 warps: 8 bf16 values (16 B) per thread per operand.
    return {"BLOCK": min(triton.next_power_of_2(max(d, 1)), 1024), "num_warps": 4}


# Tuned by `python -m autotune.activation`; config=None launches look their config up here.
SILU_AND_MUL = Tunable("silu_and_mul", family="activation", key=("d", "dtype"), bucket="tokens",
                       default=lambda d, **_: default_config(d), sources=(__file__,))


def silu_and_mul(out: torch.Tensor, x: torch.Tensor, config: dict | None = None) -> None:
    """out [rows, d], x [rows, 2d], both with a contiguous last dimension."""
    rows, d = out.shape
    if rows == 0 or d == 0:
        return
    cfg = config or SILU_AND_MUL.lookup(tokens=rows, d=d, dtype=out.dtype)
    grid = (rows, triton.cdiv(d, cfg["BLOCK"]))
    _silu_and_mul_kernel[grid](
        out, x, d, x.stride(0), out.stride(0), BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"]
    )
