"""RMSNorm ops through the CUDA op library (csrc/norm); importing this module loads it."""

from __future__ import annotations

import torch

from pykernels import _ops

_ops.load()


@torch.library.register_fake("pykernels::rms_norm")
def _rms_norm_fake(out: torch.Tensor, input: torch.Tensor, weight: torch.Tensor,
                   eps: float) -> None:
    return None


@torch.library.register_fake("pykernels::fused_add_rms_norm")
def _fused_add_rms_norm_fake(input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                             eps: float) -> None:
    return None


def rms_norm(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    torch.ops.pykernels.rms_norm(out, x, weight, eps)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> None:
    torch.ops.pykernels.fused_add_rms_norm(x, residual, weight, eps)
