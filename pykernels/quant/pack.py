"""FP8 e4m3 weight packing for the W8A16 GEMM (the contract is docs/quant.md).

``w [N, K]`` becomes ``qweight [KT, N, 128]`` (``KT = ceil(K / 128)``): each 128-wide K panel is
stored contiguously across all N, so a CTA's pipeline stage (BN channels x 128 k) is one run of
BN x 128 bytes. Within each 16-byte group (16 k) the bytes are in the tensor-core fragment
order (layout 2): byte ``4t + 2h + e`` holds k ``8h + 2t + e`` (t < 4, h, e < 2), so the 4 bytes
that ``ldmatrix`` hands lane t are its mma A-fragment k's (2t, 2t + 1, 2t + 8, 2t + 9) and the
activations stay in natural k order (what the CUDA kernel's wgmma path reads from shared
memory; layout 1, natural k order, needed them reordered: +32-43% time at M = 64, H200).
Scales are fp32, per output channel ``[N]`` or per channel and 128-group ``[KT, N]``;
``w ~= dequant(qweight) * scale``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from pykernels import _checks

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # float8_e4m3fn's largest finite value
PANEL = 128  # the packed panel width and the only K-group size
ALIGN = 64  # N and K must be multiples of this (the CUDA kernel's tile, half a panel)
LAYOUT = 2  # the byte order inside 16-byte groups (module docstring); 1 = natural k order


def to_fragment_order(q: torch.Tensor) -> torch.Tensor:
    """Natural k order -> layout 2 along the last dim (a multiple of 16), any 1-byte dtype."""
    shape = q.shape
    g = q.reshape(*shape[:-1], shape[-1] // 16, 2, 4, 2)  # (.., group, h, t, e): k = 8h + 2t + e
    return _bytes_contiguous(g.transpose(-3, -2)).reshape(shape)  # position 4t + 2h + e


def from_fragment_order(q: torch.Tensor) -> torch.Tensor:
    """Layout 2 -> natural k order along the last dim (the inverse of to_fragment_order)."""
    shape = q.shape
    g = q.reshape(*shape[:-1], shape[-1] // 16, 4, 2, 2)  # (.., group, t, h, e)
    return _bytes_contiguous(g.transpose(-3, -2)).reshape(shape)


class Fp8Weight(NamedTuple):
    """A packed FP8 weight: see the module docstring and docs/quant.md."""

    qweight: torch.Tensor  # float8_e4m3fn [KT, N, 128], zero where 128 kt + j >= k
    scales: torch.Tensor  # float32 [N] (group_size -1) or [KT, N] (group_size 128)
    k: int  # the logical K
    group_size: int  # -1 or 128


def fp8_weight_pack(w: torch.Tensor, group_size: int = -1) -> Fp8Weight:
    """Quantize ``w [N, K]`` to FP8 e4m3 with fp32 scales and lay it out in 128-wide K panels.

    Parameters
    ----------
    w : Tensor ``[N, K]``
        bfloat16, float16 or float32, finite, any device; N and K multiples of 64.
    group_size : {-1, 128}
        -1: one scale per output channel; 128: one per channel and 128-wide K group.

    Returns
    -------
    Fp8Weight
        ``scale = amax(|w|) / 448`` over the channel (or group), 1.0 where that is all zero;
        ``q = clamp(w / scale, -448, 448)`` rounded to nearest e4m3, computed in fp32.

    Example
    -------
    >>> import torch
    >>> from pykernels.quant import fp8_weight_pack, fp8_weight_unpack
    >>> p = fp8_weight_pack(torch.randn(128, 192), group_size=128)
    >>> p.qweight.shape, p.scales.shape, p.k
    (torch.Size([2, 128, 128]), torch.Size([2, 128]), 192)
    >>> fp8_weight_unpack(p).shape
    torch.Size([128, 192])
    """
    n, k = _check(w, group_size)
    kt = -(-k // PANEL)
    # [N, KT, 128] panels in fp32; the zero padding never raises an amax.
    wf = torch.nn.functional.pad(w.float(), (0, kt * PANEL - k)).view(n, kt, PANEL)
    amax = wf.abs().amax(dim=(1, 2) if group_size == -1 else 2)  # [N] or [N, KT]
    # tiny: an amax in fp32's subnormals would give scale 0 and 0/0 below.
    scale = torch.where(amax > 0, amax / FP8_MAX, 1.0).clamp_min(torch.finfo(torch.float32).tiny)
    s = scale[:, None, None] if group_size == -1 else scale[:, :, None]
    q = (wf / s).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    scales = scale if group_size == -1 else scale.t()
    return Fp8Weight(to_fragment_order(q.permute(1, 0, 2)), scales.contiguous(), k, group_size)


def _check(w, group_size) -> tuple[int, int]:
    _checks.tensor("w", w)
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D [N, K], got shape {tuple(w.shape)}")
    if isinstance(group_size, bool) or group_size not in (-1, PANEL):
        raise ValueError(f"group_size must be -1 (per channel) or {PANEL}, got {group_size!r}")
    n, k = w.shape
    if n == 0 or k == 0:
        raise ValueError(f"w must not be empty, got shape {tuple(w.shape)}")
    for name, size in (("N (w.shape[0])", n), ("K (w.shape[1])", k)):
        if size % ALIGN != 0:
            raise ValueError(f"{name} must be a multiple of {ALIGN}, got {size}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError("w must be finite, got inf or nan values")
    return n, k


def _bytes_contiguous(t: torch.Tensor) -> torch.Tensor:
    # Byte copies through uint8: permuted copies of float8 tensors are not supported by every
    # torch build and device.
    return t.view(torch.uint8).contiguous().view(t.dtype)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, k: int) -> torch.Tensor:
    """The fp32 weight ``[N, k]`` from the packed layout (``q * scale`` in fp32)."""
    kt, n, _ = qweight.shape
    s = scales[None, :, None] if scales.dim() == 1 else scales[:, :, None]
    w = from_fragment_order(qweight).float() * s  # [KT, N, 128]
    return w.permute(1, 0, 2).reshape(n, kt * PANEL)[:, :k]


def fp8_weight_unpack(packed: Fp8Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dequantized weight ``[N, K]`` (``q * scale`` in fp32, then cast to ``dtype``).

    Example
    -------
    >>> import torch
    >>> from pykernels.quant import fp8_weight_pack, fp8_weight_unpack
    >>> w = torch.tensor([[448.0, -2.0] * 32] * 64)
    >>> bool((fp8_weight_unpack(fp8_weight_pack(w)) == w).all())
    True
    """
    return dequantize(packed.qweight, packed.scales, packed.k).to(dtype)


def fp8_weight_codes(packed: Fp8Weight) -> torch.Tensor:
    """The raw e4m3 codes ``[N, K]`` in the plain (unpacked) layout, for tests.

    Example
    -------
    >>> import torch
    >>> p = fp8_weight_pack(torch.ones(64, 64))
    >>> fp8_weight_codes(p).float().unique().tolist()
    [448.0]
    """
    kt, n, _ = packed.qweight.shape
    codes = from_fragment_order(packed.qweight.view(torch.uint8)).permute(1, 0, 2)
    codes = codes.reshape(n, kt * PANEL)
    return codes[:, :packed.k].contiguous().view(FP8)
