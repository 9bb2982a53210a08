"""Pure-torch reference of the activations: fp32 math, one rounding to the input dtype at the end.
Tests, benchmarks and the CPU serving path use it; it is also the "torch" backend."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """silu(x[..., :d]) * x[..., d:] computed in fp32, returned in x.dtype."""
    d = x.shape[-1] // 2
    xf = x.float()
    return (F.silu(xf[..., :d]) * xf[..., d:]).to(x.dtype)


def silu_and_mul(out: torch.Tensor, x: torch.Tensor) -> None:
    """Backend entry point: writes into out."""
    out.copy_(silu_and_mul_ref(x))
