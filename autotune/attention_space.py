"""Search spaces of `python -m autotune.attention`: which launch configs each attention op tries
per shape, and why the rest are pruned (docs/attention.md, "Config knobs").

- paged_decode_triton: num_splits x BLOCK_N x num_warps x num_stages; a split count only if it
  leaves each split a block and keeps the programs within MAX_WAVES waves of the SMs; tiles
  within the shared-memory budget.
- paged_decode_cuda: num_splits x num_stages (tile shapes are compiled in).
- paged_prefill_triton: BLOCK_M x BLOCK_N x num_warps x num_stages x HEADS_INNER within the
  register and shared-memory budgets.
- paged_{decode,prefill}_backend: every backend importable here.
"""

from __future__ import annotations

import functools

import torch

from autotune.space import Space
from pykernels import envs
from pykernels.attention import _common, _dispatch, triton_decode, tunables

# 3, 6, 12, 24: a single wave where a power of two leaves a tail (bs=16, 8 kv heads: 3 splits
# are 384 programs, within 3 per SM x 132); 96, 128: bs=1 with 32k keys (256-token splits).
SPLITS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)
# The split-KV workspace of a fixed-buffer plan holds ~4 x (2 CTAs per SM) programs
# (plan.GenericDecodeRunner): past 8 waves a plan clamps the split count anyway.
MAX_WAVES = 8
# Shared memory a launch may plan on: 227 KB per block on H100/H200, less ~27 KB that Triton
# keeps for layout conversions and the softmax reductions.
SMEM_BUDGET = 200 * 1024
# Registers per thread for a prefill tile's fp32 accumulator (BLOCK_M x d) plus logits
# (BLOCK_M x BLOCK_N): 192 keeps the measured-best 256 x 64 x 8 warps at d=128 (docs/attention.md)
# and drops 256 x 128 (256 registers: spills).
PREFILL_REGS = 192


# ---- search spaces ------------------------------------------------------------------------------


@functools.cache
def _sms() -> int:
    if envs.TRITON_INTERPRET or not torch.cuda.is_available():
        return _common.sm_count(torch.device("cpu"))  # the H200's 132
    return _common.sm_count(torch.device("cuda"))


def _elt(name: str) -> int:
    return getattr(torch, name).itemsize


def splits_ok(splits: int, programs: int, blocks: int, sms: int) -> bool:
    """A split count worth timing for `programs` CTAs per split and `blocks` key blocks a
    request: never more splits than blocks, at most MAX_WAVES waves of programs, and not under
    half a wave while a larger valid count exists (bs=1 with 1-8 splits leaves most SMs idle)."""
    def fits(s):
        return s <= blocks and (s == 1 or programs * s <= MAX_WAVES * sms)

    if not fits(splits):
        return False
    larger = any(fits(s) for s in SPLITS if s > splits)
    return not (larger and 2 * programs * splits < sms)


def decode_triton_valid(cfg: dict, shape: dict) -> bool:
    d, bn, warps = shape["head_dim"], cfg["BLOCK_N"], cfg["num_warps"]
    if bn * d > 16384:  # a 128 x 128 K tile at most (32 KB in bf16)
        return False
    if not 16 <= bn * d / (32 * warps) <= 128:  # K-tile values per thread: idle lanes or spills
        return False
    # K and V each get num_stages - 1 shared buffers (the page index is carried in registers;
    # sm_90 compile, triton 3.6/3.9), one when unpipelined.
    if max(cfg["num_stages"] - 1, 1) * 2 * bn * d * _elt(shape["kv_dtype"]) > SMEM_BUDGET:
        return False
    group = shape["num_q_heads"] // shape["num_kv_heads"]
    chunks = -(-group // triton_decode.default_config(d, group)["BLOCK_H"])
    programs = shape["batch"] * shape["num_kv_heads"] * chunks
    return splits_ok(cfg["num_splits"], programs, -(-shape["kv_len"] // bn), _sms())


# Keys the CUDA kernel streams per pipeline stage at d=128 (32 KB of 16-bit K and V): the unit
# "kv blocks" counts for its splits.
CUDA_TILE_KEYS = 64


def decode_cuda_valid(cfg: dict, shape: dict) -> bool:
    if cfg["num_splits"] > _common.CUDA_MAX_SPLITS:  # the plan would clamp it
        return False
    programs = shape["batch"] * shape["num_kv_heads"]
    blocks = -(-shape["kv_len"] // CUDA_TILE_KEYS)
    return splits_ok(cfg["num_splits"], programs, blocks, _sms())


def prefill_triton_valid(cfg: dict, shape: dict) -> bool:
    d, bm, bn, warps = shape["head_dim"], cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["num_warps"]
    if bm // warps < 16:  # an mma tile has 16 rows: fewer rows per warp idle its lanes
        return False
    if (bm * d + bm * bn) / (32 * warps) > PREFILL_REGS:
        return False
    smem = cfg["num_stages"] * 2 * bn * d * _elt(shape["kv_dtype"]) + bm * d * _elt(shape["dtype"])
    return smem <= SMEM_BUDGET


@functools.cache
def usable_backends(kind: str, cpu: bool = False) -> tuple[str, ...]:
    """Backends the `kind` ("decode"/"prefill") choice can time here: importable ones, triton
    alone on the CPU (the interpreter)."""
    choices = tunables.DECODE_CHOICES if kind == "decode" else tunables.PREFILL_CHOICES
    if cpu:
        return ("triton",)
    family = _dispatch.DECODE if kind == "decode" else _dispatch.PREFILL
    why = family.available()
    return tuple(n for n in choices if why.get(n) is None)


def _backend_valid(kind: str, cpu: bool):
    return lambda cfg, shape: cfg["backend"] in usable_backends(kind, cpu)


def spaces(kind: str = "full") -> dict[str, Space]:
    """Search spaces per op: "full" (the tune), "quick" (a GPU smoke run), "cpu" (interpreter)."""
    cpu = kind == "cpu"
    backends = {f"paged_{k}_backend": Space({"backend": choices}, valid=_backend_valid(k, cpu))
                for k, choices in (("decode", tunables.DECODE_CHOICES),
                                   ("prefill", tunables.PREFILL_CHOICES))}
    if cpu:  # the interpreter ignores warps and stages; its time grows with the blocks
        return {"paged_decode_triton": Space(
                    {"num_splits": (1, 2), "BLOCK_N": (16,), "num_warps": (4,),
                     "num_stages": (1,)},
                    valid=lambda c, s: c["num_splits"] <= -(-s["kv_len"] // c["BLOCK_N"])),
                "paged_decode_cuda": Space({"num_splits": (1, 2)}),
                "paged_prefill_triton": Space({"BLOCK_M": (16, 32), "BLOCK_N": (16,),
                                               "num_warps": (4,), "num_stages": (1,),
                                               "HEADS_INNER": (False, True)}),
                **backends}
    quick = kind == "quick"
    return {
        "paged_decode_triton": Space(
            {"num_splits": SPLITS, "BLOCK_N": (64,) if quick else (32, 64, 128),
             "num_warps": (4,) if quick else (2, 4, 8),
             "num_stages": (2,) if quick else (1, 2, 3, 4)}, valid=decode_triton_valid),
        "paged_decode_cuda": Space({"num_splits": SPLITS, "num_stages": (2, 3)},
                                   valid=decode_cuda_valid),
        "paged_prefill_triton": Space(
            {"BLOCK_M": (64, 128) if quick else (64, 128, 256),
             "BLOCK_N": (64,) if quick else (32, 64, 128),
             # 16 warps: four warpgroups of 64 rows at 256-row tiles (the row rule drops it
             # elsewhere); 32x512 ran 326 -> 316 us with it on an H200 (docs/attention.md)
             "num_warps": (4,) if quick else (4, 8, 16),
             "num_stages": (2,) if quick else (1, 2, 3, 4),
             "HEADS_INNER": (False,) if quick else (False, True)}, valid=prefill_triton_valid),
        **backends,
    }
