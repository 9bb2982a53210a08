"""Activations of gated MLPs."""

from __future__ import annotations

import torch

from pykernels import _checks
from pykernels._backends import Family

# auto, from bench.activation (results/nvidia-h200, results/nvidia-h100-80gb-hbm3, graph replay):
# at 1-64 rows of 14336 Triton takes 1.25/3.27 us against CUDA's 2.04/3.81 on the H200; from
# 1024 rows on they tie within 1% (23.1 vs 23.4 us; 343 vs 341 us), and the CUDA op costs less
# host time outside CUDA graphs.
_FAMILY = Family(
    name="silu_and_mul",
    modules={
        "cuda": "pykernels.activation.cuda",
        "triton": "pykernels.activation.triton",
        "torch": "pykernels.activation.ref",
    },
    auto_order=("cuda", "triton"),
    small_rows=(64, ("triton", "cuda")),
)


def silu_and_mul(
    x: torch.Tensor, *, out: torch.Tensor | None = None, backend: str = "auto"
) -> torch.Tensor:
    """SiLU-and-mul of a fused gate/up projection: ``silu(x[..., :d]) * x[..., d:]``.

    Parameters
    ----------
    x : Tensor ``[..., 2 * d]``
        bfloat16, float16 or float32; the last dimension must be contiguous (stride 1), the
        leading ones may be strided (e.g. a row slice of a larger buffer). Any ``d`` (odd too).
    out : Tensor ``[..., d]``, optional
        Written in place when given (same dtype and device as ``x``).
    backend : {"auto", "cuda", "triton", "torch"}
        ``auto`` picks the fastest available for CUDA tensors and ``torch`` on the CPU.

    Returns
    -------
    Tensor ``[..., d]``: ``out`` when given. Math in fp32, rounded once to ``x.dtype``.

    Examples
    --------
    >>> import torch, pykernels
    >>> x = torch.randn(4, 2 * 11)
    >>> pykernels.silu_and_mul(x).shape
    torch.Size([4, 11])
    """
    _checks.tensor("x", x)
    _checks.last_dim_contiguous("x", x)
    if x.shape[-1] % 2:
        raise ValueError(f"x's last dimension holds gate and up halves and must be even, "
                         f"got {x.shape[-1]}")
    shape = (*x.shape[:-1], x.shape[-1] // 2)
    if out is None:
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
    else:
        _checks.like("out", out, "x", x, shape)
        _checks.last_dim_contiguous("out", out)
    if x.numel() == 0:
        return out
    impl = _FAMILY.get(backend, x.device, x.numel() // max(x.shape[-1], 1))
    impl.silu_and_mul(_checks.rows_view(out, "out"), _checks.rows_view(x))
    return out


def backends() -> dict[str, str | None]:
    """Each backend with None when it can run here, else the reason it cannot."""
    return _FAMILY.available()
