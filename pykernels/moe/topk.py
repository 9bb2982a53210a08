"""Routing: top-k experts per token from the router's logits (softmax or sigmoid scores), and the
grouped top-k of DeepSeek-V3. Weights are fp32, ids int32."""

from __future__ import annotations

import torch

from pykernels import _checks
from pykernels._backends import Family

_SCORINGS = ("softmax", "sigmoid")

# auto: Triton on CUDA tensors (one program per block of rows), the reference elsewhere.
_FAMILY = Family(
    name="moe routing",
    modules={"triton": "pykernels.moe.triton", "torch": "pykernels.moe.ref"},
    auto_order=("triton",),
)


def _check_logits(gating_logits) -> None:
    _checks.tensor("gating_logits", gating_logits)
    if gating_logits.dim() != 2:
        raise ValueError("gating_logits must be 2-D [tokens, num_experts], got shape "
                         f"{tuple(gating_logits.shape)}")
    if gating_logits.shape[1] == 0:
        raise ValueError("gating_logits must have at least one expert column, got shape "
                         f"{tuple(gating_logits.shape)}")


def _check_int(name: str, value, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")


def _check_scoring(scoring) -> None:
    if scoring not in _SCORINGS:
        raise ValueError(f"scoring must be 'softmax' or 'sigmoid', got {scoring!r}")


def _empty(m: int, topk: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty(m, topk, dtype=torch.float32, device=device),
            torch.empty(m, topk, dtype=torch.int32, device=device))


def fused_topk(
    gating_logits: torch.Tensor,
    topk: int,
    renormalize: bool,
    scoring: str = "softmax",
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``topk`` best experts of each token by softmax (or sigmoid) score.

    Parameters
    ----------
    gating_logits : Tensor ``[M, E]``, bfloat16, float16 or float32 (any strides)
    topk : int in ``[1, E]``
    renormalize : bool
        Divide each token's ``topk`` weights by their sum.
    scoring : {"softmax", "sigmoid"}
    backend : {"auto", "triton", "torch"}

    Returns
    -------
    weights : Tensor ``[M, topk]`` float32, best first
    ids : Tensor ``[M, topk]`` int32; among equal scores the lower expert id comes first.

    Examples
    --------
    >>> import torch
    >>> from pykernels.moe.topk import fused_topk
    >>> w, ids = fused_topk(torch.tensor([[0.0, 2.0, 1.0]]), 2, renormalize=True)
    >>> ids.tolist()
    [[1, 2]]
    """
    _check_logits(gating_logits)
    _check_int("topk", topk, 1, gating_logits.shape[1])
    _check_scoring(scoring)
    if gating_logits.shape[0] == 0:
        return _empty(0, topk, gating_logits.device)
    impl = _FAMILY.get(backend, gating_logits.device)
    return impl.fused_topk(gating_logits, topk, bool(renormalize), scoring)


def _check_grouping(e: int, topk: int, num_expert_group: int, topk_group: int) -> None:
    _check_int("num_expert_group", num_expert_group, 1, e)
    if e % num_expert_group != 0:
        raise ValueError(f"num_expert_group must divide the {e} experts, got {num_expert_group}")
    _check_int("topk_group", topk_group, 1, num_expert_group)
    _check_int("topk", topk, 1, topk_group * (e // num_expert_group))


def _check_bias(bias, e: int, logits: torch.Tensor) -> None:
    if bias is None:
        return
    _checks.tensor("correction_bias", bias)
    if tuple(bias.shape) != (e,):
        raise ValueError(f"correction_bias must have shape ({e},), got {tuple(bias.shape)}")
    if bias.device != logits.device:
        raise ValueError(f"correction_bias must be on gating_logits' device {logits.device}, "
                         f"got {bias.device}")


def grouped_topk(
    gating_logits: torch.Tensor,
    topk: int,
    num_expert_group: int,
    topk_group: int,
    renormalize: bool,
    scoring: str = "sigmoid",
    correction_bias: torch.Tensor | None = None,
    routed_scaling_factor: float = 1.0,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 routing: the experts form ``num_expert_group`` equal groups; a group scores
    its best (biased) score, or with ``correction_bias`` the sum of its best two; the best
    ``topk_group`` groups stay and the ``topk`` best experts among them (by biased score) are
    chosen. Weights are the unbiased scores (renormalized if asked) times
    ``routed_scaling_factor``.

    Parameters
    ----------
    gating_logits : Tensor ``[M, E]``, bfloat16, float16 or float32
    topk : int in ``[1, topk_group * E / num_expert_group]``
    num_expert_group : int dividing E
    topk_group : int in ``[1, num_expert_group]``
    renormalize : bool
    scoring : {"sigmoid", "softmax"}
    correction_bias : Tensor ``[E]`` float, optional (groups of >= 2 experts)
    routed_scaling_factor : float
    backend : {"auto", "triton", "torch"}

    Returns
    -------
    (weights ``[M, topk]`` float32, ids ``[M, topk]`` int32), best first.

    Examples
    --------
    >>> import torch
    >>> from pykernels.moe.topk import grouped_topk
    >>> logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    >>> grouped_topk(logits, 1, num_expert_group=2, topk_group=1, renormalize=True)[1].tolist()
    [[1]]
    """
    _check_logits(gating_logits)
    e = gating_logits.shape[1]
    _check_grouping(e, topk, num_expert_group, topk_group)
    _check_scoring(scoring)
    _check_bias(correction_bias, e, gating_logits)
    if correction_bias is not None and e // num_expert_group < 2:
        raise ValueError("correction_bias ranks groups by their top-2 sum: groups need >= 2 "
                         f"experts, got {e // num_expert_group}")
    if gating_logits.shape[0] == 0:
        return _empty(0, topk, gating_logits.device)
    impl = _FAMILY.get(backend, gating_logits.device)
    bias = correction_bias.contiguous() if correction_bias is not None else None
    return impl.grouped_topk(gating_logits, topk, num_expert_group, topk_group,
                             bool(renormalize), scoring, bias, float(routed_scaling_factor))


def backends() -> dict[str, str | None]:
    """Each backend with None when it can run here, else the reason it cannot."""
    return _FAMILY.available()
