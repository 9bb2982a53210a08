"""FP8 weight-only GEMM through the CUDA op library (csrc/quant); importing this module loads it.

Split-K tiles meet through per-tile counters that the last CTA of each tile resets, so one
zeroed buffer per device serves every call (and CUDA-graph replay) with no memset. Two GEMMs
running at once on different streams of one device would share it: pass each its own
``locks`` (``new_locks``) if you do that.
"""

from __future__ import annotations

import torch

from pykernels import _ops, envs
from pykernels._backends import wgmma_ready
from pykernels.quant import tunables

_ops.load()

MAX_TILES = 1 << 16  # counters per device (256 KB): tiles beyond that run without split-K
_LOCKS: dict[torch.device, torch.Tensor] = {}


@torch.library.register_fake("pykernels::fp8_marlin_gemm")
def _fp8_marlin_gemm_fake(out, x, qweight, scales, locks, block_n, block_m, splits, num_stages,
                          use_atomic_add, wgmma=False) -> None:
    return None


def new_locks(device: torch.device) -> torch.Tensor:
    return torch.zeros(MAX_TILES, dtype=torch.int32, device=device)


def _locks(device: torch.device) -> torch.Tensor:
    locks = _LOCKS.get(device)
    if locks is None:
        locks = _LOCKS[device] = new_locks(device)
    return locks


def config_for(x2d: torch.Tensor, n: int, scales: torch.Tensor, stages: int | None,
               config: dict | None = None) -> dict:
    """`config` (the tuner's) or the tuned/default one, with the prefetch overrides applied:
    `stages`, then TRITON_DISABLE_MACA_OPT_MMA_PREFETCH (1 stage) over everything."""
    if config is not None:
        cfg = dict(config)
    else:
        group = 128 if scales.dim() == 2 else -1
        cfg = tunables.GEMM_CUDA.lookup(m=x2d.shape[0], n=n, k=x2d.shape[1], dtype=x2d.dtype,
                                        group_size=group)
    if stages is not None:
        cfg["num_stages"] = stages
    if envs.TRITON_DISABLE_MACA_OPT_MMA_PREFETCH:
        cfg["num_stages"] = 1
    if cfg.get("wgmma") and not wgmma_ready(x2d.device):
        cfg["wgmma"] = False  # sm_90a instructions (a config shipped for an H100 / H200)
    return cfg


def gemm(x2d: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, out: torch.Tensor, *,
         stages: int | None = None, deterministic: bool = False, config: dict | None = None,
         locks: torch.Tensor | None = None) -> None:
    """Writes ``out [M, N] = x2d @ dequant(qweight, scales).T``; checked inputs (gemm.py). Rows
    that are not 16-byte aligned (cp.async) are copied by the op itself, so this stays traceable."""
    cfg = config_for(x2d, qweight.shape[1], scales, stages, config)
    atomic = envs.VLLM_MARLIN_USE_ATOMIC_ADD and not deterministic
    torch.ops.pykernels.fp8_marlin_gemm(
        out, x2d, qweight, scales, _locks(x2d.device) if locks is None else locks,
        int(cfg["block_n"]), int(cfg["block_m"]), int(cfg["splits"]), int(cfg["num_stages"]),
        atomic, bool(cfg.get("wgmma", False)))
