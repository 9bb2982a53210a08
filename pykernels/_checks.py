"""Input checks for the public ops: a wrong dtype, shape, device or layout raises TypeError or
ValueError naming the argument, what was expected and what came, before any backend runs."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _names(dtypes) -> str:
    return " or ".join(str(d).removeprefix("torch.") for d in dtypes)


def tensor(name: str, t, dtypes=FLOAT_DTYPES, min_dim: int = 1) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        got = str(t.dtype).removeprefix("torch.")
        raise TypeError(f"{name} must be {_names(dtypes)}, got {got}")
    if t.dim() < min_dim:
        raise ValueError(
            f"{name} must have at least {min_dim} dimension(s), got shape {tuple(t.shape)}"
        )


def like(name: str, t, ref_name: str, ref: torch.Tensor, shape=None) -> None:
    """t has ref's dtype and device (and `shape` when given)."""
    tensor(name, t, dtypes=(ref.dtype,) if ref.dtype in FLOAT_DTYPES else FLOAT_DTYPES)
    if t.device != ref.device:
        raise ValueError(f"{name} must be on {ref_name}'s device {ref.device}, got {t.device}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    if t.numel() > 0 and t.stride(-1) != 1:
        raise ValueError(
            f"{name} must have a contiguous last dimension (stride 1), got strides {t.stride()}"
        )


def rows_view(t: torch.Tensor, written_name: str | None = None) -> torch.Tensor:
    """t as [rows, last]: a view when the leading dimensions flatten into one stride (contiguous
    tensors, row slices). An input that does not is copied; an output (``written_name`` given)
    cannot be, and raises ValueError naming it."""
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        if written_name is not None:
            raise ValueError(
                f"{written_name} is written in place, so its leading dimensions must flatten into "
                f"rows of one stride; got shape {tuple(t.shape)} and strides {t.stride()}"
            ) from None
        return t.reshape(-1, t.shape[-1])
