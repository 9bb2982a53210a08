"""Mixture of experts: routing, token alignment and the fused expert MLP.

- ``fused_topk`` / ``grouped_topk`` (topk.py): routing weights (fp32) and expert ids (int32).
- ``moe_align_block_size`` (align.py): token slots grouped by expert, padded to the block size.
- ``fused_moe`` (fused_moe.py, Triton kernels in fused_moe_triton.py): the two grouped GEMMs with
  SiLU-and-mul between and the weighted top-k sum; bf16/fp16/fp32 and fp8 w8a8.
- ``quantize_fp8`` (quant.py): per-token fp8 activation quantization.

Contracts (sentinels, expert maps, padding) are defined by the references in ref.py. Names are
imported lazily, so importing this package loads no kernel module; ``fused_moe`` is bound at once
(its module imports neither Triton nor a kernel) because the function shares its module's name:
bound lazily, a prior ``import pykernels.moe.fused_moe`` would leave the module in its place.
"""

from __future__ import annotations

from pykernels import _lazy
from pykernels.moe.fused_moe import fused_moe

_LAZY = {
    "moe_align_block_size": "pykernels.moe.align",
    "fused_topk": "pykernels.moe.topk",
    "grouped_topk": "pykernels.moe.topk",
    "quantize_fp8": "pykernels.moe.quant",
}

__all__ = ["fused_moe", *_LAZY]


__getattr__, __dir__ = _lazy.exports(__name__, _LAZY, globals())
