"""silu_and_mul through the CUDA op library (csrc/activation); importing this module loads it."""

from __future__ import annotations

import torch

from pykernels import _ops

_ops.load()


@torch.library.register_fake("pykernels::silu_and_mul")
def _silu_and_mul_fake(out: torch.Tensor, input: torch.Tensor) -> None:
    return None


def silu_and_mul(out: torch.Tensor, x: torch.Tensor) -> None:
    torch.ops.pykernels.silu_and_mul(out, x)
