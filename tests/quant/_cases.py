"""FP8 W8A16 GEMM test inputs: packed weights, activations (optionally strided or surrounded by
NaN), poisoned outputs, an fp64 oracle and the tolerance check."""

from __future__ import annotations

import pytest
import torch

import autotune
from pykernels.quant.pack import fp8_weight_codes, fp8_weight_pack

# (atol, rtol) of a backend against the fp32 reference cast to the dtype, on outputs of magnitude
# ~1 (x ~ randn, w ~ randn * 0.02): both round one fp32 sum to the dtype, so what remains is one
# rounding step of the output plus the fp32 summation order.
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (5e-3, 5e-3),
       torch.bfloat16: (2e-2, 2e-2)}
# The CUDA kernel rounds group scales to the activation dtype (bf16: 2^-9 relative per group).
CUDA_GROUP_TOL = {torch.float16: (5e-3, 5e-3), torch.bfloat16: (3e-2, 3e-2)}


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """No user cache: configs come from the defaults (or the shipped ones)."""
    monkeypatch.setenv("PYKERNELS_CACHE_DIR", str(tmp_path / "cache"))
    autotune.invalidate()
    yield
    autotune.invalidate()


def make_weight(n: int, k: int, group_size: int = -1, device="cpu", dtype=torch.float32):
    return fp8_weight_pack((torch.randn(n, k, device=device) * 0.02).to(dtype), group_size)


def make_x(m: int, k: int, dtype, device="cpu", strided: bool = False,
           nan_around: bool = False) -> torch.Tensor:
    """x [m, k]. strided: a row-strided view (unit K stride) of a wider buffer. nan_around: that
    buffer's extra columns and rows (past k and past m) hold NaN, so a kernel that reads outside
    x without masking it shows."""
    if not (strided or nan_around):
        return torch.randn(m, k, device=device).to(dtype)
    buf = torch.full((m + 16, k + 64), float("nan"), device=device, dtype=dtype)
    buf[:m, :k] = torch.randn(m, k, device=device).to(dtype)
    if not nan_around:
        buf.normal_()
    return buf[:m, :k]


def poisoned(*shape: int, dtype, device="cpu") -> torch.Tensor:
    """An output of `shape` full of NaN: whatever the kernel does not write shows."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def oracle(x: torch.Tensor, packed) -> torch.Tensor:
    """x @ (codes * scale).T in fp64 from the plain-layout codes (independent of the packed
    layout and of ref.py), cast to x's dtype."""
    n, k = packed.qweight.shape[1], packed.k
    codes = fp8_weight_codes(packed).double()
    s = packed.scales.double()
    if s.dim() == 1:
        w = codes * s[:, None]
    else:
        w = codes * s.t().repeat_interleave(128, dim=1)[:, :k]
    assert w.shape == (n, k)
    return (x.double() @ w.t()).to(x.dtype)


def close(got: torch.Tensor, want: torch.Tensor, tol) -> None:
    """assert_close with atol scaled by the output's magnitude (so O(1) or not, one table)."""
    atol, rtol = tol
    scale = max(1.0, want.float().abs().max().item()) if want.numel() else 1.0
    torch.testing.assert_close(got.float(), want.float(), atol=atol * scale, rtol=rtol)
