"""fp8_marlin_gemm: the public W8A16 op (input checks, backend dispatch).

Every backend module (cuda.py, triton.py, ref.py) exposes ``gemm(x2d, qweight, scales, out, *,
stages, deterministic)`` that writes ``out [M, N]``; the checks live here, once.
"""

from __future__ import annotations

import torch

from pykernels import _checks
from pykernels._backends import Family
from pykernels.quant import tunables

_ACT_DTYPES = (torch.bfloat16, torch.float16)
GROUP = 128  # the only K-group size (and the packed panel width)

# auto: the backend tuned fastest for the shape (tunables.GEMM_BACKEND), else CUDA then Triton.
_FAMILY = Family(
    name="fp8_marlin_gemm",
    modules={"cuda": "pykernels.quant.cuda", "triton": "pykernels.quant.triton",
             "torch": "pykernels.quant.ref"},
    auto_order=("cuda", "triton"),
)


def fp8_marlin_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, *,
                    out: torch.Tensor | None = None, backend: str = "auto",
                    deterministic: bool = False, stages: int | None = None) -> torch.Tensor:
    """``y = x @ dequant(w).T`` with an FP8 e4m3 weight from ``fp8_weight_pack``.

    Parameters
    ----------
    x : Tensor ``[..., K]``
        bfloat16 or float16; unit stride on K (rows may be strided).
    qweight : float8_e4m3fn ``[ceil(K / 128), N, 128]``
        The packed weight (docs/quant.md): ``qweight[kt, n, j] = q(w[n, 128 kt + j])``.
    scales : float32 ``[N]`` (per output channel) or ``[ceil(K / 128), N]`` (per 128-group).
    out : Tensor ``[..., N]``, optional
        Written in place (x's dtype and device).
    backend : {"auto", "cuda", "triton", "torch"}
    deterministic : bool
        Never reduce split-K partials with atomics (bitwise identical runs), whatever
        ``VLLM_MARLIN_USE_ATOMIC_ADD`` says.
    stages : int, optional
        Main-loop pipeline depth; 1 turns the prefetch of the next tile off. None: tuned.

    Returns
    -------
    Tensor ``[..., N]`` in x's dtype.

    Example
    -------
    >>> import torch
    >>> from pykernels.quant import fp8_weight_pack, fp8_marlin_gemm
    >>> w = fp8_weight_pack(torch.randn(128, 256) * 0.02)
    >>> y = fp8_marlin_gemm(torch.randn(3, 256, dtype=torch.float16), w.qweight, w.scales)
    >>> y.shape
    torch.Size([3, 128])
    """
    n = _check(x, qweight, scales, stages)
    x2d = _checks.rows_view(x)
    if out is None:
        out = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    else:
        _checks.like("out", out, "x", x, shape=(*x.shape[:-1], n))
    out2d = _checks.rows_view(out, written_name="out")
    if x2d.shape[0] == 0:
        return out
    module = _FAMILY.get(_choose(backend, x2d, n, scales), x.device)
    module.gemm(x2d, qweight, scales, out2d, stages=stages, deterministic=deterministic)
    return out


def _choose(backend: str, x2d: torch.Tensor, n: int, scales: torch.Tensor) -> str:
    if backend != "auto" or x2d.device.type != "cuda":
        return backend
    group = GROUP if scales.dim() == 2 else -1
    cfg = tunables.GEMM_BACKEND.lookup(m=x2d.shape[0], n=n, k=x2d.shape[1], dtype=x2d.dtype,
                                       group_size=group)
    return cfg["backend"] if cfg["backend"] in tunables.BACKEND_CHOICES else "auto"


def _check(x, qweight, scales, stages) -> int:
    """Validates the operands; returns N."""
    _checks.tensor("x", x, dtypes=_ACT_DTYPES)
    _checks.last_dim_contiguous("x", x)
    _checks.tensor("qweight", qweight, dtypes=(torch.float8_e4m3fn,), min_dim=3)
    _checks.tensor("scales", scales, dtypes=(torch.float32,))
    if qweight.dim() != 3 or qweight.shape[2] != GROUP or not qweight.is_contiguous():
        raise ValueError(f"qweight must be a contiguous [ceil(K/128), N, 128] tensor from "
                         f"fp8_weight_pack, got shape {tuple(qweight.shape)}")
    kt, n = qweight.shape[0], qweight.shape[1]
    k = x.shape[-1]
    if k % 64 != 0 or (k + GROUP - 1) // GROUP != kt:
        raise ValueError(f"x's last dimension K={k} does not match qweight (packed for "
                         f"K in ({(kt - 1) * GROUP}, {kt * GROUP}], a multiple of 64)")
    if n % 64 != 0:
        raise ValueError(f"qweight's N={n} must be a multiple of 64")
    if tuple(scales.shape) not in ((n,), (kt, n)) or not scales.is_contiguous():
        raise ValueError(f"scales must be a contiguous [N]={[n]} (per channel) or "
                         f"[ceil(K/128), N]={[kt, n]} (per group) tensor, got shape "
                         f"{tuple(scales.shape)}")
    for name, t in (("qweight", qweight), ("scales", scales)):
        if t.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")
    if stages is not None and not (isinstance(stages, int) and 1 <= stages <= 8):
        raise ValueError(f"stages must be an int in [1, 8] or None, got {stages!r}")
    return n
