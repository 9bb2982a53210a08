"""Activations of gated MLPs."""

from __future__ import annotations

import torch

from pykernels import _checks
from pykernels._backends import Family

# auto: Triton (with its shipped tuned configs), then CUDA. bench.activation on the H200, graph
# replay, 14336 wide (2026-11-21): 1 row 1.22 us vs CUDA 2.22, 64 rows 3.27 vs 3.86, 1024 rows
# 23.03 vs 23.06, 16384 rows 331.8 vs 331.2 (FlashInfer 3.51 / 4.48 / 25.6 / 344).
_FAMILY = Family(
    name="silu_and_mul",
    modules={
        "cuda": "pykernels.activation.cuda",
        "triton": "pykernels.activation.triton",
        "torch": "pykernels.activation.ref",
    },
    auto_order=("triton", "cuda"),
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
    impl = _FAMILY.get(backend, x.device)
    impl.silu_and_mul(_checks.rows_view(out, "out"), _checks.rows_view(x))
    return out


def backends() -> dict[str, str | None]:
    """Each backend with None when it can run here, else the reason it cannot."""
    return _FAMILY.available()
