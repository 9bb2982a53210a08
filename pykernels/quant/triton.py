"""The Triton twin of the FP8 W8A16 GEMM: ``out [M, N] = x [M, K] @ dequant(qweight, scales).T``.

Swap-AB: a program computes an ``out^T`` tile ``[BLOCK_N weight rows, BLOCK_M tokens]`` as
``dot(w [BLOCK_N, BLOCK_K], x^T [BLOCK_K, BLOCK_M])``, so the weight rows fill the MMA's 64/128-row
side and a decode batch of a few tokens only pads the narrow side (16 columns), not 64 rows.

The weight is read straight from the packed layout (docs/quant.md): a K tile of BLOCK_K in
{32, 64, 128} never straddles a 128-wide panel, so the tile of rows n at K offset k0 is rows of
BLOCK_K contiguous bytes at ``kt * N * 128 + n * 128 + k0 % 128``. The e4m3 codes are converted
to x's dtype in registers (exact: every e4m3 value is a bf16 and an fp16 value) and accumulated
in fp32. On the GPU the conversion is the CUDA kernel's bit moves (``_cvt_asm``: the weight times
2^-120 / 2^-8, undone on the fp32 accumulator): triton's own cast costs one conversion-pipe F2F
per weight. Scales stay fp32: per channel on the accumulator at the end, per 128-group on each K
tile's dot result (``acc += dot * s``), so group mode is exact up to fp32 summation.

Split-K (``SPLIT_K > 1``, grid axis 2): each split writes fp32 partials ``[SPLIT_K, M, N]``
reduced by one ``sum(0)`` in a fixed order (bitwise reproducible), or, with
``VLLM_MARLIN_USE_ATOMIC_ADD=1`` and not ``deterministic``, atomically adds into a zeroed fp32
``[M, N]``. Either way a single small cast copies the result into ``out``. ``SPLIT_K`` 0 picks
the split at launch so that the grid covers every SM about twice (decode: N / BLOCK_N programs
alone leave half an H200 idle at N 4096).

``TMA`` (a tuned config key, Hopper and newer, x 16-byte aligned): x and the weight panels come
in by tensor-memory-access tiles (out-of-range rows and K zero-filled) instead of per-element
pointers. On an H200 (triton 3.6) the pointer version spilled its address registers at large
tiles (136 local loads a K step at 128 x 256 x 64); with TMA the main loop is a third as long, and
the whole kernel 1.1-1.3x faster at M >= 256.

The wgmma wait (``PIN_ACC``): triton 3.6 lets the wgmma that reads the converted weight from
registers run on into the next K step, and ptxas put that step's weight loads into the same
registers: on an H200 a 64 x 256 x 64, 3-stage tile at M = 1024 (two programs an SM) summed the
raw next tile (inf in 7% of the outputs). An identity op on the accumulator after each dot makes
triton wait for the wgmma there; ``test_wgmma_register_reuse`` holds that case.

Interpreter (TRITON_INTERPRET=1, CPU): float8e4nv loads and ``.to(fp16/fp32)`` decode every
finite e4m3 code exactly, subnormals included (checked against torch on all 256 codes, Triton
3.9); only the two NaN codes come out as +-480, and the packer never produces them. So one
kernel serves both. bf16 ``tl.dot`` is broken in the interpreter: CPU tests use fp16/fp32 x.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from pykernels import envs
from pykernels._backends import tma_ready
from pykernels.quant import tunables

PANEL = 128  # the packed K panel width (and the group size)
_PANEL = tl.constexpr(PANEL)  # the same, as the kernel sees it
_BLOCK_K = (32, 64, 128)  # divisors of the panel: a K tile stays within one panel


# e4m3 -> bf16 / fp16 by bit moves, 4 weights per 32-bit register (the CUDA kernel's dequant2):
# a byte permute puts two codes in the low bytes of two 16-bit lanes, a multiply by 2^4 (bf16) or
# 2^7 (fp16) moves exponent and mantissa into place, and the sign bit (now at 11 / 14) moves to 15.
# The result is the weight times 2^-120 (bf16) / 2^-8 (fp16), exact, subnormals included; the
# kernel multiplies the fp32 accumulator back. triton's own `.to(bfloat16)` goes e4m3 -> f16
# (F2FP) then one F2F.BF16.F16 per weight, a conversion-pipe instruction: 3 per pair against 4
# integer ones here that issue on the ALU and FMA pipes.
@functools.cache
def _cvt_asm(dtype: torch.dtype) -> str:
    """The PTX for 4 codes (one 32-bit register $2) -> 4 values (registers $0, $1)."""
    shift, sign_bits, sign_mul = (("16", "0x08000800", "15") if dtype == torch.bfloat16
                                  else ("128", "0x40004000", "1"))
    half = ("prmt.b32 v, $2, 0, {perm};\n"  # codes at bits 7..0 and 23..16
            f"mad.lo.u32 t, v, {shift}, 0;\n"  # mad, not shl: keeps it on the FMA pipe
            f"and.b32 s, t, {sign_bits};\n"
            f"mad.lo.u32 {{dst}}, s, {sign_mul}, t;\n")  # sign bit up to bit 15
    return ("{\n.reg .b32 v, t, s;\n" + half.format(perm="0x4140", dst="$0")
            + half.format(perm="0x4342", dst="$1") + "}")


_CVT_BIAS = {torch.bfloat16: 2.0 ** 120, torch.float16: 2.0 ** 8}  # 2^(bias(dtype) - 7)


@triton.jit
def _fp8_gemm_kernel(
    x_ptr, w_ptr, s_ptr, c_ptr,
    M, N, K, tiles_per_split,
    stride_xm, stride_cs, stride_cm, stride_cn,
    GROUP: tl.constexpr, EVEN_K: tl.constexpr, ATOMIC: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    CVT_ASM: tl.constexpr = "", CVT_BIAS: tl.constexpr = 1.0, TMA: tl.constexpr = False,
    PIN_ACC: tl.constexpr = False,
):
    """c[split, m, n] (or out[m, n]) = sum over this split's K tiles of x[m, k] * w[n, k], scaled.
    x [M, K] has unit stride on K; w is the packed [KT, N, 128] e4m3 tensor. With TMA, x_ptr and
    w_ptr are tensor descriptors of x [M, K] and of w viewed as [KT * N, 128] (tiles past M, K
    and the last panel's N come back zero-filled)."""
    pid_m = tl.program_id(0)  # fastest: neighbouring programs share the weight tile in L2
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows past N wrap onto real rows (never stored): weight loads need no mask.
    rows = offs_n % N
    if not TMA:
        w_tile = w_ptr + rows[:, None] * _PANEL + offs_k[None, :]
        x_tile = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
        in_m = offs_m[:, None] < M
        panel_stride = N.to(tl.int64) * _PANEL

    start = pid_k * tiles_per_split
    end = tl.minimum(start + tiles_per_split, tl.cdiv(K, BLOCK_K))
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for t in range(start, end):
        k0 = t * BLOCK_K
        kt = k0 // _PANEL
        # Not k0 % PANEL: triton 3.6's alignment analysis loses the offset's 16-byte alignment
        # through a remainder (byte-wise weight loads, 255 registers at 64x16x128).
        j0 = k0 - kt * _PANEL
        if TMA:
            x = x_ptr.load([pid_m * BLOCK_M, k0])
            w8 = w_ptr.load([kt * N + pid_n * BLOCK_N, j0])
        else:
            # Padding k >= K is zero in the packed weight, but x there is out of bounds (or the
            # next row): masked to 0 so no NaN * 0 can reach the sum.
            x_mask = in_m if EVEN_K else in_m & (k0 + offs_k[None, :] < K)
            x = tl.load(x_tile + k0, mask=x_mask, other=0.0)
            w8 = tl.load(w_tile + kt * panel_stride + j0)
        # Packed layout 2 (docs/quant.md): byte 4t + 2h + e of a 16-byte group is k 8h + 2t + e.
        # Back to k order in registers; triton folds the permute into the shared-memory load,
        # which becomes ldmatrix (sm_90 compile, triton 3.6: 1037 PTX lines against 1281 for
        # layout 1 at the 64 x 16 x 128 decode tile).
        w8 = tl.reshape(tl.permute(tl.reshape(w8, (BLOCK_N, BLOCK_K // 16, 4, 2, 2)),
                                   (0, 1, 3, 2, 4)), (BLOCK_N, BLOCK_K))
        if CVT_ASM != "":
            w = tl.inline_asm_elementwise(CVT_ASM, "=r,=r,r", [w8.to(tl.uint8, bitcast=True)],
                                          dtype=x.dtype, is_pure=True, pack=4)
        else:
            w = w8.to(x.dtype)
        if GROUP:
            s = tl.load(s_ptr + kt * N + rows)
            # CVT_BIAS first (exact), then the scale: the product 2^120 * s is never formed
            acc += tl.dot(w, tl.trans(x), input_precision=DOT_PRECISION) * CVT_BIAS * s[:, None]
        else:
            acc = tl.dot(w, tl.trans(x), acc, input_precision=DOT_PRECISION)
            if PIN_ACC:
                # The weight is the wgmma's register operand. triton pipelines such a wgmma
                # (its wait comes after the next tile's dequant), and ptxas was seen to put that
                # next tile into the registers the previous wgmma still reads (wrong sums on an
                # H200, triton 3.6, 2 CTAs per SM). A use of acc outside a dot makes triton wait
                # for the wgmma here; the mov itself is free.
                # (GROUP needs no pin: its multiply by the scale already uses the dot result.)
                acc = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [acc],
                                                dtype=tl.float32, is_pure=True, pack=1)
    if not GROUP:
        acc = acc * CVT_BIAS  # exact (a power of two), before the scale: never 2^120 * s
        acc = acc * tl.load(s_ptr + rows)[:, None]

    c = c_ptr + pid_k.to(tl.int64) * stride_cs + offs_m[None, :].to(tl.int64) * stride_cm \
        + offs_n[:, None] * stride_cn
    mask = (offs_m[None, :] < M) & (offs_n[:, None] < N)
    if ATOMIC:
        tl.atomic_add(c, acc, mask=mask, sem="relaxed")
    else:
        tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=mask)


# ---- configs ------------------------------------------------------------------------------------

_KEYS = ("BLOCK_N", "BLOCK_M", "BLOCK_K", "SPLIT_K", "num_warps", "num_stages", "prefetch",
         "TMA")


def _config(m: int, n: int, k: int, dtype: torch.dtype, group_size: int,
            config: dict | None, stages: int | None) -> dict:
    """The launch config: looked up (or the caller's `config` over it), then `stages` and
    TRITON_DISABLE_MACA_OPT_MMA_PREFETCH fold into num_stages (prefetch off = 1 stage)."""
    cfg = tunables.GEMM_TRITON.lookup(m=m, n=n, k=k, dtype=dtype, group_size=group_size)
    if config is not None:
        _check_config(config)
        cfg.update(config)
    if not cfg.get("prefetch", True):
        cfg["num_stages"] = 1
    if stages is not None:
        cfg["num_stages"] = stages
    if envs.TRITON_DISABLE_MACA_OPT_MMA_PREFETCH:
        cfg["num_stages"], cfg["prefetch"] = 1, False
    return cfg


def _check_config(config) -> None:
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    unknown = sorted(set(config) - set(_KEYS))
    if unknown:
        raise ValueError(f"config has unknown keys {unknown}; known: {list(_KEYS)}")
    for key in ("BLOCK_N", "BLOCK_M"):
        v = config.get(key, 16)
        if not isinstance(v, int) or v < 16 or v & (v - 1):
            raise ValueError(f"config[{key!r}] must be a power of two >= 16, got {v!r}")
    if config.get("BLOCK_K", 128) not in _BLOCK_K:
        raise ValueError(f"config['BLOCK_K'] must be one of {_BLOCK_K}, got "
                         f"{config['BLOCK_K']!r}")
    split_k = config.get("SPLIT_K", 1)
    if not isinstance(split_k, int) or split_k < 0:
        raise ValueError(f"config['SPLIT_K'] must be an int >= 0 (0: fill the GPU), got "
                         f"{split_k!r}")
    for key in ("num_warps", "num_stages"):
        v = config.get(key, 1)
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"config[{key!r}] must be a positive int, got {v!r}")


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # the interpreter: no GPU to fill
    return torch.cuda.get_device_properties(device).multi_processor_count


def _auto_split(tiles: int, k_tiles: int, device: torch.device) -> int:
    """SPLIT_K 0: split K until the grid covers every SM about twice (a decode GEMM has few
    N tiles and a long K), keeping at least 4 K tiles a split."""
    return max(1, min(k_tiles // 4, 2 * _sm_count(device) // max(tiles, 1)))


def _splits(k_tiles: int, split_k: int) -> tuple[int, int]:
    """(splits, K tiles per split) with no empty split."""
    per = triton.cdiv(k_tiles, max(1, min(split_k, k_tiles)))
    return triton.cdiv(k_tiles, per), per


def _reduction(splits: int, deterministic: bool) -> str:
    """How split-K partials meet: "none" (one split), "atomic" (VLLM_MARLIN_USE_ATOMIC_ADD and
    not deterministic) or "partials" (an fp32 workspace summed in a fixed order)."""
    if splits == 1:
        return "none"
    return "atomic" if envs.VLLM_MARLIN_USE_ATOMIC_ADD and not deterministic else "partials"


# ---- launch -------------------------------------------------------------------------------------

def gemm(x2d: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, out: torch.Tensor, *,
         stages: int | None = None, deterministic: bool = False,
         config: dict | None = None) -> None:
    """``out [M, N] = x2d [M, K] @ dequant(qweight, scales).T`` on inputs validated by
    ``fp8_marlin_gemm``: x2d unit stride on K, qweight ``[KT, N, 128]`` e4m3 contiguous, scales
    fp32 ``[N]`` (per channel) or ``[KT, N]`` (per 128-group) contiguous, out ``[M, N]``.

    ``config``: a dict of any of BLOCK_N, BLOCK_M, BLOCK_K (32/64/128), SPLIT_K (0: chosen to
    fill the GPU), num_warps, num_stages, prefetch over the tuned one. ``stages`` overrides
    num_stages (1: no prefetch).
    ``deterministic``: split-K partials are never reduced with atomics.
    """
    m, k = x2d.shape
    n = qweight.shape[1]
    if m == 0:
        return
    group = scales.dim() == 2
    cfg = _config(m, n, k, x2d.dtype, PANEL if group else -1, config, stages)
    bn, bm, bk = cfg["BLOCK_N"], cfg["BLOCK_M"], cfg["BLOCK_K"]
    k_tiles, tiles = triton.cdiv(k, bk), triton.cdiv(m, bm) * triton.cdiv(n, bn)
    split_k = cfg["SPLIT_K"] or _auto_split(tiles, k_tiles, out.device)
    splits, per = _splits(k_tiles, split_k)
    mode = _reduction(splits, deterministic)
    atomic = mode == "atomic"
    if mode == "none":
        c = out
    elif atomic:
        c = torch.zeros((m, n), dtype=torch.float32, device=out.device)
    else:
        c = torch.empty((splits, m, n), dtype=torch.float32, device=out.device)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn), splits)
    # The bit-move dequant and the acc pin are PTX, not for the interpreter (nor fp32 x, a test
    # dtype only).
    gpu = x2d.is_cuda and x2d.dtype in _CVT_BIAS
    xa, wa = x2d, qweight
    tma = cfg.get("TMA", False) and tma_ready(x2d)
    if tma:
        xa = TensorDescriptor(x2d, [m, k], [x2d.stride(0), 1], [bm, bk])
        w2d = qweight.view(-1, PANEL)
        wa = TensorDescriptor(w2d, list(w2d.shape), [PANEL, 1], [bn, bk])
    _fp8_gemm_kernel[grid](
        xa, wa, scales, c, m, n, k, per,
        x2d.stride(0), c.stride(0) if c.dim() == 3 else 0, c.stride(-2), c.stride(-1),
        GROUP=group, EVEN_K=k % bk == 0, ATOMIC=atomic,
        DOT_PRECISION="ieee" if x2d.dtype == torch.float32 else "tf32",
        BLOCK_N=bn, BLOCK_M=bm, BLOCK_K=bk,
        CVT_ASM=_cvt_asm(x2d.dtype) if gpu else "", CVT_BIAS=_CVT_BIAS[x2d.dtype] if gpu else 1.0,
        TMA=tma, PIN_ACC=gpu,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if c is not out:
        out.copy_(c if atomic else c.sum(0))
