"""The torch reference of the FP8 W8A16 GEMM: dequantize the packed weight to fp32, fp32 matmul,
cast. Obviously correct and slow (the fp32 weight is materialized); tests and the CPU path use it.
"""

from __future__ import annotations

import torch

from pykernels.quant.pack import Fp8Weight, dequantize


def gemm(x2d: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, out: torch.Tensor, *,
         stages: int | None = None, deterministic: bool = False) -> None:
    """``out [M, N] = x2d [M, K] @ dequant(qweight, scales).T`` in fp32, cast to out's dtype.

    ``stages`` and ``deterministic`` are accepted for the backend contract and ignored: the
    reference has no pipeline and no split-K reduction.
    """
    del stages, deterministic
    w = dequantize(qweight, scales, x2d.shape[1])  # fp32 [N, K]
    out.copy_(x2d.float() @ w.t())


def fp8_gemm_ref(x: torch.Tensor, packed: Fp8Weight) -> torch.Tensor:
    """``x [..., K] @ dequant(packed).T`` -> ``[..., N]`` in x's dtype (fp32 accumulation).

    Example
    -------
    >>> import torch
    >>> from pykernels.quant.pack import fp8_weight_pack
    >>> p = fp8_weight_pack(torch.randn(64, 128))
    >>> fp8_gemm_ref(torch.randn(2, 3, 128), p).shape
    torch.Size([2, 3, 64])
    """
    k = x.shape[-1]
    if k != packed.k:
        raise ValueError(f"x's last dimension K={k} does not match the packed weight's "
                         f"k={packed.k}")
    x2d = x.reshape(-1, k)
    out = torch.empty(x2d.shape[0], packed.qweight.shape[1], dtype=x.dtype, device=x.device)
    gemm(x2d, packed.qweight, packed.scales, out)
    return out.view(*x.shape[:-1], out.shape[1])
