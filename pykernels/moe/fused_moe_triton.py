"""Fused MoE in Triton: two grouped GEMMs over expert-sorted token slots.

A token's k routed copies are "slots" ``t * topk + j``. ``moe_align_block_size`` groups the slots
by expert and pads each group to a multiple of BLOCK_SIZE_M, so every block of BLOCK_SIZE_M
sorted slots belongs to one expert. Per chunk of tokens:

1. up: ``act[i] = silu(x[t] W1g_e^T) * (x[t] W1u_e^T)`` for the BLOCK_SIZE_N act columns of
   the program, where i is the slot's position in the sorted order (padding positions are
   left unwritten: GEMM 2 reads them only into rows it does not store). The program's B tile
   interleaves the gate and up rows (n and I + n of w1) in one accumulator, so SiLU-and-mul
   runs in the epilogue on fp32 values: the [slots, 2I] pre-activation never reaches memory and
   one launch is saved.
2. down: ``y[slot] = w[slot] * act[i] W2_e^T`` (routed weight in the epilogue, fp32). A block's
   act rows are contiguous, so with ``TMA`` they come in by tensor-memory-access tiles like the
   weights (the up GEMM's rows, gathered from x, cannot: Hopper's TMA has no row gather).
3. ``out[t] = sum_j y[t * topk + j]`` in fp32 over the slots whose id is in range: a token
   routed nowhere (id -1, or out of range) adds nothing, though no GEMM wrote its slot.

A program owns one (block of sorted slots, block of N columns) tile; programs run in grouped
order (GROUP_SIZE_M blocks of slots per column sweep) so neighbours share weight tiles in L2.
Blocks past the padded total exit at once; blocks whose expert id is -1 (not local under an
expert map) write zeros. The grid is sized from the worst-case padded total on the host, the
real total stays on the device: no host sync, CUDA-graph capturable.

FP8 w8a8: weights float8_e4m3fn with one scale per expert ``[E]`` or per output channel
``[E, N]``; activations quantized per token on the device (quant.py) or by a given per-tensor
scale; fp32 accumulation, dequantized in the epilogue (before SiLU).

Configs: two Tunables. ``fused_moe_triton`` tunes the up GEMM and owns BLOCK_SIZE_M (the align
block size); ``fused_moe_triton_down`` tunes the down GEMM's other fields and always runs at the
up config's BLOCK_SIZE_M, since both GEMMs read one align.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
from triton.tools.tensor_descriptor import TensorDescriptor

from autotune import Tunable
from autotune.space import force_prefetch_off
from pykernels import envs
from pykernels._backends import pdl_ready, tma_ready
from pykernels.moe import quant
from pykernels.moe.quant import Fp8

KEY = ("E", "H", "I", "topk", "dtype", "quant")


@triton.jit
def _tile(pid, em, n, BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr,
          GROUP_SIZE_M: tl.constexpr):
    """Grouped order: GROUP_SIZE_M slot blocks sweep the columns together (L2 reuse)."""
    num_pid_m = tl.cdiv(em, BLOCK_SIZE_M)
    num_pid_n = tl.cdiv(n, BLOCK_SIZE_N)
    width = GROUP_SIZE_M * num_pid_n
    first_m = (pid // width) * GROUP_SIZE_M
    rows = tl.minimum(num_pid_m - first_m, GROUP_SIZE_M)
    pid_m = first_m + (pid % width) % rows
    pid_n = (pid % width) // rows
    return pid_m, pid_n


@triton.jit(do_not_specialize=["em", "num_valid"])
def _moe_gemm_kernel(
    a_ptr, a_half_ptr, b_ptr, c_ptr, a_scale_ptr, b_scale_ptr, topk_w_ptr,
    sorted_ids_ptr, expert_ids_ptr, total_ptr,
    N, K, em, num_valid,
    stride_am, stride_be, stride_bn, stride_cm, stride_asm, stride_bse, stride_bsn,
    ROW_DIV: tl.constexpr, GATED: tl.constexpr, MUL_ROUTED_WEIGHT: tl.constexpr,
    USE_FP8: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr, B_TMA: tl.constexpr,
    A_TMA: tl.constexpr, BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr,
    BLOCK_SIZE_K: tl.constexpr, GROUP_SIZE_M: tl.constexpr, HALF_TAIL: tl.constexpr = False,
    PDL: tl.constexpr = False,
):
    """Row i of the sorted order holds slot s_i of expert e. GATED (GEMM 1):
    C[i, n] = silu(g) * u with g, u = A[s_i // ROW_DIV] . B[e, n], B[e, N + n] (A gathered).
    Else (GEMM 2): C[s_i, n] = A[i] . B[e, n] (times the routed weight of s_i): A's rows are the
    block's own, contiguous. A, B have a contiguous K dimension; B is [E, N (2N if GATED), K].
    a_half_ptr: A again (A_TMA: a descriptor of BLOCK_SIZE_M // 2 rows) for HALF_TAIL."""
    pid_m, pid_n = _tile(tl.program_id(0), em, N, BLOCK_SIZE_M, BLOCK_SIZE_N, GROUP_SIZE_M)
    if PDL:  # launched early: wait for the kernels before us (align, GEMM 1's act) first
        gdc_wait()
    # The block's expert id and middle row are loaded with the padded total, not after the
    # exit test, so the half-tile choice adds no memory round trip before the tiles' loads
    # (H200, Mixtral at 4096 tokens, half tiles on vs off: 0.97x with the middle row loaded
    # after the test, 0.99x here). expert_ids has a row for every block of the grid (align
    # sizes it for the worst case).
    first_row = pid_m * BLOCK_SIZE_M
    total = tl.load(total_ptr)
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    if HALF_TAIL:
        mid = first_row + BLOCK_SIZE_M // 2
        mid_slot = tl.load(sorted_ids_ptr + mid, mask=mid < em, other=num_valid)
    if first_row >= total:
        return
    if expert == -1:  # not a local expert: its slots contribute zero
        if not GATED:  # (GEMM 1 writes nothing: GEMM 2 never reads such a block's rows)
            slot = tl.load(sorted_ids_ptr + first_row + tl.arange(0, BLOCK_SIZE_M)).to(tl.int64)
            offs_cn = pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
            zeros = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=c_ptr.dtype.element_ty)
            tl.store(c_ptr + slot[:, None] * stride_cm + offs_cn[None, :], zeros,
                     mask=(slot < num_valid)[:, None] & (offs_cn[None, :] < N))
        return
    # HALF_TAIL: an expert's padding sits at the end of its group, so when row BLOCK_SIZE_M / 2
    # of the block is padding, the whole second half is: a half-height tile does the block with
    # half the MMAs. Under uniform routing half of the experts' last blocks qualify (their
    # padding averages BLOCK_SIZE_M / 2 rows). Three call sites, not `half = False` rebound
    # under `if HALF_TAIL:` and one `if half:`: triton 3.6 then compiles the half branch even
    # without HALF_TAIL (H200: 18 GPU tests failed, a TMA load on a plain pointer).
    if HALF_TAIL:
        if mid_slot >= num_valid:
            _gemm_tile(a_half_ptr, b_ptr, c_ptr, a_scale_ptr, b_scale_ptr, topk_w_ptr,
                       sorted_ids_ptr, first_row, pid_n, expert, N, K, num_valid,
                       stride_am, stride_be, stride_bn, stride_cm, stride_asm, stride_bse,
                       stride_bsn, ROW_DIV, GATED, MUL_ROUTED_WEIGHT, USE_FP8, EVEN_K,
                       DOT_PRECISION, B_TMA, A_TMA, BLOCK_SIZE_M // 2, BLOCK_SIZE_N,
                       BLOCK_SIZE_K, PDL)
        else:
            _gemm_tile(a_ptr, b_ptr, c_ptr, a_scale_ptr, b_scale_ptr, topk_w_ptr,
                       sorted_ids_ptr, first_row, pid_n, expert, N, K, num_valid,
                       stride_am, stride_be, stride_bn, stride_cm, stride_asm, stride_bse,
                       stride_bsn, ROW_DIV, GATED, MUL_ROUTED_WEIGHT, USE_FP8, EVEN_K,
                       DOT_PRECISION, B_TMA, A_TMA, BLOCK_SIZE_M, BLOCK_SIZE_N, BLOCK_SIZE_K,
                       PDL)
    else:
        _gemm_tile(a_ptr, b_ptr, c_ptr, a_scale_ptr, b_scale_ptr, topk_w_ptr, sorted_ids_ptr,
                   first_row, pid_n, expert, N, K, num_valid,
                   stride_am, stride_be, stride_bn, stride_cm, stride_asm, stride_bse,
                   stride_bsn, ROW_DIV, GATED, MUL_ROUTED_WEIGHT, USE_FP8, EVEN_K,
                   DOT_PRECISION, B_TMA, A_TMA, BLOCK_SIZE_M, BLOCK_SIZE_N, BLOCK_SIZE_K, PDL)


@triton.jit
def _gemm_tile(a_ptr, b_ptr, c_ptr, a_scale_ptr, b_scale_ptr, topk_w_ptr, sorted_ids_ptr,
               first_row, pid_n, expert, N, K, num_valid,
               stride_am, stride_be, stride_bn, stride_cm, stride_asm, stride_bse, stride_bsn,
               ROW_DIV: tl.constexpr, GATED: tl.constexpr, MUL_ROUTED_WEIGHT: tl.constexpr,
               USE_FP8: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
               B_TMA: tl.constexpr, A_TMA: tl.constexpr, BLOCK_SIZE_M: tl.constexpr,
               BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr, PDL: tl.constexpr):
    """One tile: sorted rows first_row .. + BLOCK_SIZE_M (one expert's) x BLOCK_SIZE_N columns."""
    offs_m = first_row + tl.arange(0, BLOCK_SIZE_M)
    slot = tl.load(sorted_ids_ptr + offs_m).to(tl.int64)
    valid = slot < num_valid
    offs_cn = pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
    if GATED:
        # Padding slots read row 0 (in bounds; their act rows are not written).
        row = tl.where(valid, slot // ROW_DIV, 0)
        # One B tile of 2 * BLOCK_SIZE_N w1 rows: BLOCK_SIZE_N gate rows n_j, then the up rows
        # N + n_j. One dot, so each warpgroup issues a wgmma twice as wide (n128/n256 instead
        # of two n64/n128 reading the same A from shared memory); the wgmma accumulator holds
        # columns j and BLOCK_SIZE_N + j in one thread, so the split in the epilogue moves no
        # data. Two dots of BLOCK_SIZE_N ran GEMM 1 of Mixtral at 4096 tokens at ~320-500
        # TFLOP/s where GEMM 2 reached ~540.
        offs_b = tl.arange(0, 2 * BLOCK_SIZE_N)
        offs_bn = (pid_n * BLOCK_SIZE_N + offs_b % BLOCK_SIZE_N) % N + (offs_b // BLOCK_SIZE_N) * N
    else:
        row = offs_m.to(tl.int64)
        offs_bn = offs_cn % N  # columns past N wrap onto real rows (masked at the store)
    BN_B: tl.constexpr = 2 * BLOCK_SIZE_N if GATED else BLOCK_SIZE_N
    offs_k = tl.arange(0, BLOCK_SIZE_K)
    if not A_TMA:
        a_ptrs = a_ptr + row[:, None] * stride_am + offs_k[None, :]
    if not B_TMA:
        b_ptrs = b_ptr + expert * stride_be + offs_bn[None, :] * stride_bn + offs_k[:, None]
    acc = tl.zeros((BLOCK_SIZE_M, BN_B), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_SIZE_K)):
        if A_TMA:  # a_ptr: a descriptor of A [em, K]; columns past K read as zero
            a = a_ptr.load([first_row, kb * BLOCK_SIZE_K])
        elif EVEN_K:
            a = tl.load(a_ptrs)
        else:
            a = tl.load(a_ptrs, mask=offs_k[None, :] < K - kb * BLOCK_SIZE_K, other=0.0)
        if B_TMA:
            # b_ptr: a descriptor of B viewed as [E, 2, N, K] (GATED: gate, up) or [E, N, K].
            # Rows past N and columns past K read as zero.
            if GATED:
                b = b_ptr.load([expert.to(tl.int32), 0, pid_n * BLOCK_SIZE_N, kb * BLOCK_SIZE_K])
            else:
                b = b_ptr.load([expert.to(tl.int32), pid_n * BLOCK_SIZE_N, kb * BLOCK_SIZE_K])
            b = tl.reshape(b, (BN_B, BLOCK_SIZE_K)).T
        elif EVEN_K:
            b = tl.load(b_ptrs)
        else:
            b = tl.load(b_ptrs, mask=offs_k[:, None] < K - kb * BLOCK_SIZE_K, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if not A_TMA:
            a_ptrs += BLOCK_SIZE_K
        if not B_TMA:
            b_ptrs += BLOCK_SIZE_K
    if PDL:  # the next kernel may launch once every program is past its main loop
        gdc_launch_dependents()
    if USE_FP8:  # per-tensor scales come with stride 0
        a_s = tl.load(a_scale_ptr + row * stride_asm)[:, None]
        acc = acc * a_s * tl.load(b_scale_ptr + expert * stride_bse + offs_bn * stride_bsn)[None, :]
    if GATED:
        gate, up = tl.split(tl.permute(tl.reshape(acc, (BLOCK_SIZE_M, 2, BLOCK_SIZE_N)),
                                       (0, 2, 1)))
        acc = gate * tl.sigmoid(gate) * up
        # Padding rows are not written: GEMM 2 reads them (whatever they hold) only into
        # output rows it never stores. Writing them cost Qwen3-30B-A3B 0.6 us at 1 token
        # (128 blocks of 16 rows, one slot each: 16x the act bytes; H200).
        c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_cn[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty),
                 mask=valid[:, None] & (offs_cn[None, :] < N))
    else:
        if MUL_ROUTED_WEIGHT:
            acc = acc * tl.load(topk_w_ptr + slot, mask=valid, other=0.0)[:, None]
        # The [BLOCK_SIZE_M, BLOCK_SIZE_N] output pointers are formed here, not before the
        # loop: live through it they cost registers the accumulator needs (128x256 tiles
        # spilled).
        c_ptrs = c_ptr + slot[:, None] * stride_cm + offs_cn[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty),
                 mask=valid[:, None] & (offs_cn[None, :] < N))


@triton.jit
def _moe_sum_kernel(y_ptr, ids_ptr, out_ptr, H, num_experts, stride_out,
                    TOPK: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    """out[t, cols] = sum over j of y[t * TOPK + j, cols] where ids[t, j] is a real expert."""
    if PDL:  # let the next kernel launch, then wait for GEMM 2's rows
        gdc_launch_dependents()
        gdc_wait()
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < H
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in tl.static_range(TOPK):
        e = tl.load(ids_ptr + t * TOPK + j)
        width = tl.where((e >= 0) & (e < num_experts), H, 0)  # unrouted: load nothing
        y = tl.load(y_ptr + (t * TOPK + j) * H + cols, mask=cols < width, other=0.0)
        acc += y.to(tl.float32)
    tl.store(out_ptr + t * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ---- configs ------------------------------------------------------------------------------------

def slots_per_expert(tokens: int, E: int, topk: int) -> float:
    """Expected slots per expert under uniform routing: what BLOCK_SIZE_M should cover."""
    return tokens * topk / max(E, 1)


def default_config(tokens: int, E: int, topk: int, quant: str = "none", down: bool = False,
                   **_) -> dict:
    """The untuned heuristic, after vLLM's default (decode: thin, deep tiles; prefill: large
    tiles, 8 warps), with BLOCK_SIZE_M from slots per expert rather than tokens: at 128 experts
    x top-8, 64 tokens give each expert ~4 slots, where a 64-row block would be 94% padding."""
    per_expert = slots_per_expert(tokens, E, topk)
    bm = 16 if per_expert <= 16 else 32 if per_expert <= 48 else 64 if per_expert <= 192 else 128
    bn = 64 if tokens <= 64 else 128
    cfg = {
        "BLOCK_SIZE_M": bm,
        # The up GEMM's tile covers BLOCK_SIZE_N act columns = 2 * BLOCK_SIZE_N rows of w1.
        "BLOCK_SIZE_N": bn if down else bn // 2,
        "BLOCK_SIZE_K": 128 if quant != "none" or tokens <= 64 else 64,
        "GROUP_SIZE_M": 16 if per_expert > 128 else 1,
        "num_warps": 4 if tokens <= 128 else 8,
        "num_stages": 4 if tokens <= 32 else 3,
        "prefetch": True,
        # Weight tiles by TMA where the GPU and the strides allow (Hopper+): 4-13% faster
        # from 256 tokens on the H200, no gain at decode (~20 us more host time a launch).
        "TMA": bm > 16,
        "HALF_TAIL": True,  # see half_tail()
    }
    if down:
        del cfg["BLOCK_SIZE_M"]
    return cfg


def _up_default(**shape) -> dict:
    return default_config(**shape)


def _down_default(**shape) -> dict:
    return default_config(**shape, down=True)


# Tuned by `python -m autotune.moe`. Shape (one for both GEMMs): E local experts, hidden H,
# expert width I, topk, activation dtype, quant "none" or "fp8_w8a8"; bucketed by tokens.
FUSED_MOE_UP = Tunable("fused_moe_triton", family="moe", key=KEY, bucket="tokens",
                       default=_up_default, gemm_like=True, sources=(__file__,))
FUSED_MOE_DOWN = Tunable("fused_moe_triton_down", family="moe", key=KEY, bucket="tokens",
                         default=_down_default, gemm_like=True, sources=(__file__,))

_REQUIRED = ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K")


def split_config(config: dict, up_default: dict, down_default: dict) -> tuple[dict, dict]:
    """A user config -> (up, down) configs. Either one vLLM-style dict for both GEMMs
    (BLOCK_SIZE_M/N/K required; GROUP_SIZE_M, num_warps, num_stages, TMA optional) or
    {"up": {...}, "down": {...}}. Missing fields take the defaults; down gets up's
    BLOCK_SIZE_M."""
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    up, down = (config.get("up"), config.get("down")) if "up" in config else (config, config)
    if not isinstance(up, dict) or not isinstance(down, dict):
        raise TypeError("config['up'] and config['down'] must both be dicts")
    missing = [k for k in _REQUIRED if k not in up] + \
              [k for k in _REQUIRED[1:] if k not in down]
    if missing:
        raise ValueError(f"config needs {', '.join(_REQUIRED)}; missing {sorted(set(missing))}")
    for name, cfg in (("up", up), ("down", down)):
        for k in _REQUIRED + ("GROUP_SIZE_M", "num_warps", "num_stages"):
            v = cfg.get(k, 16 if k in _REQUIRED else 1)
            block = k in _REQUIRED
            if not isinstance(v, int) or v < (16 if block else 1) or (block and v & (v - 1)):
                raise ValueError(f"config[{name!r}][{k!r}] must be a positive int (a power of "
                                 f"two >= 16 for block sizes), got {v!r}")
        for flag in ("TMA", "HALF_TAIL"):
            if not isinstance(cfg.get(flag, False), bool):
                raise ValueError(f"config[{name!r}][{flag!r}] must be a bool, got {cfg[flag]!r}")
    if down is not up and down.get("BLOCK_SIZE_M", up["BLOCK_SIZE_M"]) != up["BLOCK_SIZE_M"]:
        raise ValueError(f"config['down']['BLOCK_SIZE_M'] ({down['BLOCK_SIZE_M']}) must equal "
                         f"config['up']'s ({up['BLOCK_SIZE_M']}): both GEMMs read one align")
    # A config stored before the TMA option existed lacks its key: the user's value still counts.
    up_cfg = {k: up.get(k, v) for k, v in {"TMA": False, **up_default}.items()}
    down_cfg = {k: down.get(k, v) for k, v in {"TMA": False, **down_default}.items()}
    return up_cfg, down_cfg


# ---- launch -------------------------------------------------------------------------------------

class Routing(NamedTuple):
    sorted_ids: torch.Tensor  # [capacity] int32 slots, expert-grouped, sentinel = num_valid
    expert_ids: torch.Tensor  # [capacity / block_m] int32, -1 = skip
    total: torch.Tensor  # [1] int32 padded total (device)
    em: int  # host upper bound of the padded total: the grid's slot extent
    block_m: int
    num_valid: int  # slots = tokens * topk
    topk_ids: torch.Tensor  # [tokens, topk] int32, contiguous
    num_experts: int  # global ids are [0, num_experts)


@functools.lru_cache(maxsize=1)
def _align_op():
    """moe_align_block_size: the family's kernel (pykernels.moe.align) when present, else the
    torch reference (host syncs: CPU tests only)."""
    import importlib.util

    if importlib.util.find_spec("pykernels.moe.align") is not None:
        from pykernels.moe.align import moe_align_block_size
    else:
        from pykernels.moe.ref import moe_align_block_size
    return moe_align_block_size


def route(topk_ids: torch.Tensor, block_m: int, num_experts: int,
          expert_map: torch.Tensor | None = None) -> Routing:
    """Align the chunk's slots into blocks of block_m for both GEMMs."""
    topk_ids = topk_ids.contiguous()
    sorted_ids, expert_ids, total = _align_op()(topk_ids, num_experts, block_m, expert_map)
    numel = topk_ids.numel()
    # Each expert that gets a slot pads at most block_m - 1: at most min(E, numel) of them.
    em = numel + min(num_experts, numel) * (block_m - 1)
    return Routing(sorted_ids, expert_ids, total, em, block_m, numel, topk_ids, num_experts)


def half_tail(cfg: dict, block_m: int, fp8: bool) -> bool:
    """Whether blocks padded past their middle row run as half-height tiles: from 64-row
    blocks (at decode's 16/32-row blocks the weights, not the MMAs, set the time), fp8 from
    128-row blocks. A 32-row fp8 half is not a wgmma tile: triton compiles it to other MMA
    instructions, whose sums differ in the last bits from the 64-row tile's (H200: 152 of 664
    act rows, up to 0.03), and by TMA differently again; 64-row halves gave the same bits as
    full tiles in bf16 and fp8. Configs stored before the option existed get it on."""
    return block_m >= (128 if fp8 else 64) and cfg.get("HALF_TAIL", True)


def _stages(cfg: dict) -> int:
    return cfg["num_stages"] if cfg.get("prefetch", True) else 1


def _gemm(a, b, c, a_scale, b_scale, topk_w, r: Routing, n: int, k: int, *, row_div: int,
          gated: bool, cfg: dict) -> None:
    bn, bk = cfg["BLOCK_SIZE_N"], cfg["BLOCK_SIZE_K"]
    grid = (triton.cdiv(r.em, r.block_m) * triton.cdiv(n, bn),)
    fp8 = b_scale is not None
    stride_asm = a_scale.stride(0) if fp8 and a_scale.numel() > 1 else 0
    stride_bse = b_scale.stride(0) if fp8 else 0
    stride_bsn = b_scale.stride(1) if fp8 and b_scale.dim() == 2 else 0
    ad, bd = a, b
    pdl = pdl_ready(c.device)
    tma = cfg.get("TMA", False) and tma_ready(b) and k * b.element_size() >= 16
    if tma:
        e = b.shape[0]
        if gated:
            bd = TensorDescriptor(b, [e, 2, n, k], [b.stride(0), n * b.stride(1), b.stride(1), 1],
                                  [1, 2, bn, bk])
        else:
            bd = TensorDescriptor(b, [e, n, k], [b.stride(0), b.stride(1), 1], [1, bn, bk])
    # GEMM 2's rows are the block's own (sorted order): one TMA tile a K step.
    a_tma = tma and not gated and tma_ready(a)
    half = half_tail(cfg, r.block_m, fp8)
    ad_half = a
    if a_tma:
        ad = TensorDescriptor(a, [a.shape[0], k], [a.stride(0), 1], [r.block_m, bk])
        if half:
            ad_half = TensorDescriptor(a, [a.shape[0], k], [a.stride(0), 1], [r.block_m // 2, bk])
    _moe_gemm_kernel[grid](
        ad, ad_half, bd, c, a_scale if fp8 else c, b_scale if fp8 else c,
        topk_w if topk_w is not None else c, r.sorted_ids, r.expert_ids, r.total,
        n, k, r.em, r.num_valid,
        a.stride(0), b.stride(0), b.stride(1), c.stride(0), stride_asm, stride_bse, stride_bsn,
        ROW_DIV=row_div, GATED=gated, MUL_ROUTED_WEIGHT=topk_w is not None, USE_FP8=fp8,
        EVEN_K=k % bk == 0, DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        B_TMA=tma, A_TMA=a_tma, BLOCK_SIZE_M=r.block_m, BLOCK_SIZE_N=bn, BLOCK_SIZE_K=bk,
        GROUP_SIZE_M=cfg["GROUP_SIZE_M"], HALF_TAIL=half, PDL=pdl, num_warps=cfg["num_warps"],
        num_stages=_stages(cfg), launch_pdl=pdl,
    )


def _check_act_rows(act: torch.Tensor, r: Routing) -> None:
    """act holds a row per sorted slot position: a shorter one would be read past its end (or,
    by TMA, as zeros) without an error."""
    if act.shape[0] < r.em:
        raise ValueError(f"act needs {r.em} rows (the padded slot bound), has {act.shape[0]}")


def up_stage(x, w1, act, r: Routing, topk: int, cfg: dict, fp8: Fp8 | None = None,
             xq=None, xs=None) -> None:
    """act [r.em, I]: row i = silu(x W1g^T) * (x W1u^T) of sorted slot i's token and expert
    (x [m, H] rows); padding rows are left as they were."""
    _check_act_rows(act, r)
    a, a_scale = x, None
    if fp8 is not None:
        a, a_scale = quant.quantize_fp8(x, fp8.a_scale, out=xq, out_scale=xs)
    _gemm(a, w1, act[:r.em], a_scale, None if fp8 is None else fp8.w_scale, None, r,
          w1.shape[1] // 2, w1.shape[2], row_div=topk, gated=True, cfg=cfg)


def down_stage(act, w2, y, topk_weights, r: Routing, cfg: dict, fp8: Fp8 | None = None,
               aq=None, as_=None) -> None:
    """y [slots, H]: row s = topk_weight[s] * act[i] W2^T for the sorted position i of slot s
    (act as up_stage wrote it; aq, as_: its fp8 copy and row scales, r.em rows)."""
    _check_act_rows(act, r)
    a, a_scale = act[:r.em], None
    if fp8 is not None:
        a, a_scale = quant.quantize_fp8(a, fp8.a_scale, out=_rows(aq, r.em),
                                        out_scale=_rows(as_, r.em))
    _gemm(a, w2, y, a_scale, None if fp8 is None else fp8.w_scale, topk_weights, r,
          w2.shape[1], w2.shape[2], row_div=1, gated=False, cfg=cfg)


def lookup(tokens: int, w1: torch.Tensor, w2: torch.Tensor, topk: int, dtype: torch.dtype,
           quant_name: str) -> tuple[dict, dict]:
    """The (up, down) configs for a chunk of `tokens` tokens (the shape from w2 [E, H, I])."""
    E, H, I = w2.shape  # noqa: E741 (the MoE literature's names)
    shape = dict(tokens=tokens, E=E, H=H, I=I, topk=topk, dtype=dtype, quant=quant_name)
    return FUSED_MOE_UP.lookup(**shape), FUSED_MOE_DOWN.lookup(**shape)


class Workspace:
    """Intermediate buffers for chunks of up to `rows` tokens, allocated once per call; the
    act buffers (one row per sorted slot position, so up to r.em rows: slots plus each expert's
    padding) grow to the largest routing they meet (`act_rows`)."""

    def __init__(self, rows: int, topk: int, inter: int, hidden: int, dtype: torch.dtype,
                 device: torch.device, fp8: bool):
        slots = rows * topk
        self.y = torch.empty(slots, hidden, dtype=dtype, device=device)
        self._inter, self._dtype, self._device, self._fp8 = inter, dtype, device, fp8
        self.act = self.aq = self.as_ = None
        self.xq = self.xs = None
        if fp8:
            self.xq = torch.empty(rows, hidden, dtype=quant.FP8_DTYPE, device=device)
            self.xs = torch.empty(rows, dtype=torch.float32, device=device)

    def act_rows(self, em: int) -> None:
        """Makes act (and the fp8 copy and scales) at least `em` rows."""
        if self.act is not None and self.act.shape[0] >= em:
            return
        self.act = torch.empty(em, self._inter, dtype=self._dtype, device=self._device)
        if self._fp8:
            self.aq = torch.empty(em, self._inter, dtype=quant.FP8_DTYPE, device=self._device)
            self.as_ = torch.empty(em, dtype=torch.float32, device=self._device)


def topk_sum(out: torch.Tensor, y: torch.Tensor, r: Routing) -> None:
    """out [m, H] = the fp32 sum of each token's routed rows of y [m * topk, H]."""
    m, topk = r.topk_ids.shape
    hidden = y.shape[1]
    block = 1024  # 8 bf16 values (16 B) a thread at 4 warps
    while block > 128 and m * triton.cdiv(hidden, block) < 4 * 132:  # ~4 programs an SM
        block //= 2
    pdl = pdl_ready(out.device)
    _moe_sum_kernel[(m, triton.cdiv(hidden, block))](
        y, r.topk_ids, out, hidden, r.num_experts, out.stride(0), TOPK=topk, BLOCK=block,
        PDL=pdl, num_warps=max(1, block // 256), launch_pdl=pdl,
    )


def run_routed(out, x, w1, w2, topk_weights, r: Routing, ws: Workspace, up_cfg: dict,
               down_cfg: dict, fp8_1: Fp8 | None = None, fp8_2: Fp8 | None = None) -> None:
    """The timed part (align done): up (+SiLU), down (+routed weight), top-k sum into out."""
    m, topk = topk_weights.shape
    ws.act_rows(r.em)
    y = ws.y[:m * topk]
    up_stage(x, w1, ws.act, r, topk, up_cfg, fp8_1, _rows(ws.xq, m), _rows(ws.xs, m))
    down_stage(ws.act, w2, y, topk_weights, r, down_cfg, fp8_2, ws.aq, ws.as_)
    topk_sum(out, y, r)


def _rows(t: torch.Tensor | None, n: int):
    return None if t is None else t[:n]


def chunk_configs(tokens: int, w1, w2, topk: int, dtype, quant_name: str,
                  config: dict | None) -> tuple[dict, dict]:
    """The (up, down) configs of a chunk: tuned/looked up, or the caller's `config` over the
    defaults (prefetch forced off under TRITON_DISABLE_MACA_OPT_MMA_PREFETCH, as lookups do)."""
    up_cfg, down_cfg = lookup(tokens, w1, w2, topk, dtype, quant_name)
    if config is None:
        return up_cfg, down_cfg
    up_cfg, down_cfg = split_config(config, up_cfg, down_cfg)
    if envs.TRITON_DISABLE_MACA_OPT_MMA_PREFETCH:
        return force_prefetch_off(up_cfg), force_prefetch_off(down_cfg)
    return up_cfg, down_cfg


def fused_experts(out, x, w1, w2, topk_weights, topk_ids, *, num_experts: int,
                  expert_map=None, fp8_1: Fp8 | None = None, fp8_2: Fp8 | None = None,
                  config: dict | None = None) -> None:
    """The Triton backend of pykernels.moe.fused_moe on validated inputs: out [M, H] (may alias
    x), x [M, H] (contiguous last dim), topk_weights fp32 [M, k] contiguous, topk_ids int32."""
    m, topk = topk_ids.shape
    chunk = envs.VLLM_FUSED_MOE_CHUNK_SIZE
    if chunk < 1:
        raise ValueError(f"VLLM_FUSED_MOE_CHUNK_SIZE must be >= 1, got {chunk}")
    quant_name = "none" if fp8_1 is None else "fp8_w8a8"
    ws = Workspace(min(m, chunk), topk, w2.shape[2], w2.shape[1], x.dtype, x.device,
                   fp8_1 is not None)
    # The kernels write rows with a contiguous last dimension; any other out gets a copy.
    dst = out if out.stride(1) == 1 else torch.empty(out.shape, dtype=out.dtype,
                                                      device=out.device)
    for start in range(0, m, chunk):
        end = min(start + chunk, m)
        up_cfg, down_cfg = chunk_configs(end - start, w1, w2, topk, x.dtype, quant_name, config)
        r = route(topk_ids[start:end], up_cfg["BLOCK_SIZE_M"], num_experts, expert_map)
        run_routed(dst[start:end], x[start:end], w1, w2, topk_weights[start:end], r, ws,
                   up_cfg, down_cfg, fp8_1, fp8_2)
    if dst is not out:
        out.copy_(dst)
