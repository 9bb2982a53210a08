"""FP8 weight-only GEMM Tunables, declared apart from the kernel modules so that the CUDA wrapper,
the Triton launcher and ``autotune.gemm`` share them without importing each other.

Key: ``n``, ``k`` (the logical K), activation ``dtype`` and ``group_size``; bucket: ``m``, the
activation rows (powers of two). Tuned by ``python -m autotune.gemm``.
"""

from __future__ import annotations

from pathlib import Path

from autotune import Tunable

_HERE = Path(__file__).resolve().parent
_CSRC = _HERE.parent.parent / "csrc" / "quant"  # absent from a wheel: hashed by name then

KEY = ("n", "k", "dtype", "group_size")
BACKEND_CHOICES = ("cuda", "triton")

# The CUDA kernel's tiles: 64 or 128 output channels (4 warps x 1 or 2 m16 tiles) by a
# 128-wide K panel, 8..64 tokens; `wgmma` (a config key; the default turns it on from m = 64):
# the panel on warpgroup MMAs (sm_90) instead of mma.sync.
CUDA_BLOCK_N = (64, 128)
CUDA_BLOCK_K = 128
CUDA_BLOCK_M = (8, 16, 32, 64)


def _cuda_sources() -> tuple[str, ...]:
    return (*sorted(str(p) for p in _CSRC.glob("*.cu*")), str(_HERE / "cuda.py"))


def cuda_default(m: int, **_) -> dict:
    """Tokens per CTA: the smallest n8 multiple that holds m, capped at 64; 128 channels per CTA
    (each activation fragment feeds two mma); splits 0 = chosen at launch to fill the GPU;
    wgmma from m = 64 (1.10-1.36x mma.sync at m >= 64 on every bench shape, H200; the launcher
    turns it off on GPUs other than sm_90)."""
    block_m = next((b for b in CUDA_BLOCK_M if b >= m), CUDA_BLOCK_M[-1])
    return {"block_n": 128, "block_m": block_m, "splits": 0, "num_stages": 4, "prefetch": True,
            "wgmma": m >= 64}


def triton_default(m: int, **_) -> dict:
    """Swap-AB tile: BLOCK_N weight rows are the MMA's M side, BLOCK_M tokens its N side. The
    large-m tile is the one an H200 sweep put first at m = 1024 (64 x 256 x 64, 4 warps, 3
    stages: two programs an SM)."""
    if m <= 64:
        # SPLIT_K 0: split at launch to fill the GPU (N / BLOCK_N tiles alone leave SMs idle)
        return {"BLOCK_N": 64, "BLOCK_M": 16 if m <= 16 else 32 if m <= 32 else 64,
                "BLOCK_K": 128, "SPLIT_K": 0, "num_warps": 4, "num_stages": 4,
                "prefetch": True, "TMA": False}  # TMA: +20 us host a launch, too much here
    return {"BLOCK_N": 64, "BLOCK_M": 128 if m <= 128 else 256, "BLOCK_K": 64, "SPLIT_K": 1,
            "num_warps": 4, "num_stages": 3, "prefetch": True, "TMA": True}


GEMM_CUDA = Tunable("fp8_gemm_cuda", family="quant", key=KEY, bucket="m",
                    default=cuda_default, gemm_like=True, sources=_cuda_sources())
GEMM_TRITON = Tunable("fp8_gemm_triton", family="quant", key=KEY, bucket="m",
                      default=triton_default, gemm_like=True,
                      sources=(str(_HERE / "triton.py"),))
# {"backend": "auto"}: nothing tuned, `auto` follows the fixed order in __init__.
GEMM_BACKEND = Tunable("fp8_gemm_backend", family="quant", key=KEY, bucket="m",
                       default=lambda **_: {"backend": "auto"},
                       sources=(str(_HERE / "triton.py"), *_cuda_sources()))
