"""Device ceilings, measured once per process, and the roofline floor every row is judged by.

- copy bandwidth: ``dst.copy_(src)`` on 1 GiB buffers, counting bytes read + written (4.27 TB/s
  on the H200, ../shared/ANCHORS.md); a memory-bound kernel's fraction is its bytes over time
  divided by this.
- bf16 GEMM: ``torch.matmul`` 8192^3 (694 TFLOP/s on the H200).
- fp8 e4m3 GEMM: ``torch._scaled_mm`` 8192^3 (1257 TFLOP/s on the H200); None where unsupported.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import torch

from bench.timing import measure

COPY_BYTES = 1 << 30  # 1 GiB per buffer: 18x the H200's 60 MB L2, so no call hits cache
GEMM_N = 8192


@dataclass(frozen=True)
class Ceilings:
    """Measured ceilings of one device; a field is None when it could not be measured."""

    copy_tbps: float | None = None
    bf16_tflops: float | None = None
    fp8_tflops: float | None = None
    notes: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        return asdict(self)

    def compute_tflops(self, dtype: torch.dtype) -> tuple[str, float | None]:
        """(name, TFLOP/s) of the tensor-core ceiling for dtype; fp32 has none we measure."""
        if dtype in (torch.bfloat16, torch.float16):
            return "bf16_gemm", self.bf16_tflops
        if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            return "fp8_gemm", self.fp8_tflops
        return "none", None

    def floor_us(self, nbytes: float, flops: float, dtype: torch.dtype) -> float | None:
        """Roofline floor of one call: the slower of moving nbytes and doing flops."""
        floors = []
        if nbytes and self.copy_tbps:
            floors.append(nbytes / (self.copy_tbps * 1e12) * 1e6)
        peak = self.compute_tflops(dtype)[1]
        if flops and peak:
            floors.append(flops / (peak * 1e12) * 1e6)
        return max(floors) if floors else None


def copy_tbps(device: str = "cuda", nbytes: int = COPY_BYTES) -> float:
    """Device-to-device copy bandwidth in TB/s, counting bytes read + written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    t = measure(lambda i: dst.copy_(src), graph=False, device=device)
    return 2 * nbytes / (t.median_us * 1e-6) / 1e12


def bf16_gemm_tflops(device: str = "cuda", n: int = GEMM_N) -> float:
    """torch.matmul n^3 bf16 throughput in TFLOP/s."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    c = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    t = measure(lambda i: torch.matmul(a, b, out=c), graph=False, device=device)
    return 2 * n**3 / (t.median_us * 1e-6) / 1e12


def fp8_gemm_tflops(device: str = "cuda", n: int = GEMM_N) -> float:
    """torch._scaled_mm n^3 e4m3 throughput in TFLOP/s (bf16 out, per-tensor scales).

    Raises whatever torch raises where fp8 GEMM is unsupported (pre-sm_89, old torch)."""
    fp8 = torch.float8_e4m3fn
    a = torch.randn(n, n, device=device).to(fp8)
    b = torch.randn(n, n, device=device).to(fp8).t()  # _scaled_mm wants b column-major
    one = torch.ones((), device=device, dtype=torch.float32)

    def call(i):
        return torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)

    t = measure(call, graph=False, device=device)
    return 2 * n**3 / (t.median_us * 1e-6) / 1e12


def _try(name: str, fn, device: str, notes: list[str]) -> float | None:
    try:
        return fn(device)
    except Exception as err:  # a ceiling that cannot be measured is reported, not fatal
        notes.append(f"{name}: {type(err).__name__}: {str(err).splitlines()[0][:120]}")
        return None
    finally:
        torch.cuda.empty_cache()


@functools.lru_cache(maxsize=8)
def get(device: str = "cuda") -> Ceilings:
    """The device's ceilings, measured on first call and cached for the process.

    On a machine without CUDA (or device="cpu") every ceiling is None: CPU smoke rows carry no
    fraction.
    """
    if device == "cpu" or not torch.cuda.is_available():
        return Ceilings(notes=("no CUDA device: ceilings not measured",))
    notes: list[str] = []
    return Ceilings(
        copy_tbps=_try("copy", copy_tbps, device, notes),
        bf16_tflops=_try("bf16_gemm", bf16_gemm_tflops, device, notes),
        fp8_tflops=_try("fp8_gemm", fp8_gemm_tflops, device, notes),
        notes=tuple(notes),
    )
