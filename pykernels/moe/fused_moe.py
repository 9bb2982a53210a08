"""fused_moe: the public op (input checks, backend dispatch) and its torch backend.

The Triton kernels and launcher live in fused_moe_triton.py; the fp32 reference in ref.py.
Importing this module imports no Triton (quant.py, which does, is loaded on first fp8 use).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from pykernels import _checks
from pykernels._backends import Family
from pykernels.moe import distribution
from pykernels.moe.ref import local_expert_ids

if TYPE_CHECKING:
    from pykernels.moe.quant import Fp8

_ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_FP8 = torch.float8_e4m3fn

# auto: Triton on CUDA tensors; torch (this module's per-expert loop) on the CPU.
_FAMILY = Family(
    name="fused_moe",
    modules={"triton": "pykernels.moe.fused_moe_triton", "torch": "pykernels.moe.fused_moe"},
    auto_order=("triton",),
)


def fused_moe(
    hidden: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    inplace: bool = False,
    activation: str = "silu",
    use_fp8_w8a8: bool = False,
    per_channel_quant: bool = False,
    w1_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    a1_scale: torch.Tensor | None = None,
    a2_scale: torch.Tensor | None = None,
    expert_map: torch.Tensor | None = None,
    global_num_experts: int = -1,
    layer_id: int | None = None,
    config: dict | None = None,
    backend: str = "auto",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mixture-of-experts MLP over routed tokens:
    ``out[t] = sum_j w[t, j] * (silu(x[t] W1g_e^T) * (x[t] W1u_e^T)) W2_e^T``, e = ids[t, j].

    Parameters
    ----------
    hidden : Tensor ``[M, H]``
        bfloat16, float16 or float32; the last dimension contiguous (rows may be strided).
    w1 : Tensor ``[E, 2I, H]``
        Gate rows ``[0, I)`` then up rows ``[I, 2I)``; ``hidden``'s dtype, or float8_e4m3fn with
        ``use_fp8_w8a8``. Last dimension contiguous.
    w2 : Tensor ``[E, H, I]``, like ``w1``.
    topk_weights : float32 ``[M, k]``; topk_ids : int32 ``[M, k]``
        Routing (``fused_topk``): global expert ids in ``[0, global_num_experts)``; a slot with
        another id (-1: routed nowhere) adds nothing.
    inplace : bool
        Write the result into ``hidden`` (then returned).
    activation : {"silu"}
    use_fp8_w8a8 : bool
        FP8 weights with fp32 scales ``w1_scale``/``w2_scale``: ``[E]`` per tensor, or with
        ``per_channel_quant`` ``[E, 2I]`` / ``[E, H]`` per output channel. Activations are
        quantized to fp8 per token on the device, or with the static per-tensor ``a1_scale``
        (hidden) / ``a2_scale`` (SiLU output) when given (1-element fp32). fp32 accumulation.
    expert_map : int32 ``[global_num_experts]``, optional
        Expert parallelism: global id -> local index into ``w1``/``w2``, or -1 when the expert
        lives elsewhere (its slots contribute zero here).
    global_num_experts : int
        -1: ``expert_map.numel()`` with a map, else ``E``.
    layer_id : int, optional
        Counts the routing for expert-distribution recording (pykernels.moe.distribution).
    config : dict, optional
        Launch config for the Triton backend instead of the tuned one: one vLLM-style dict
        (BLOCK_SIZE_M/N/K, GROUP_SIZE_M, num_warps, num_stages) or ``{"up": ..., "down": ...}``.
    backend : {"auto", "triton", "torch"}
        auto: Triton on CUDA tensors, the torch loop on the CPU.
    out : Tensor like ``hidden``, optional (not with ``inplace``).

    Returns
    -------
    Tensor ``[M, H]`` in ``hidden``'s dtype (``out``, or ``hidden`` with ``inplace``).

    Examples
    --------
    >>> import torch
    >>> from pykernels.moe import fused_moe
    >>> x = torch.randn(3, 64)
    >>> w1, w2 = torch.randn(4, 64, 64) / 8, torch.randn(4, 64, 32) / 6
    >>> weights, ids = torch.rand(3, 2).softmax(-1), torch.tensor([[0, 1], [2, 3], [1, 2]]).int()
    >>> fused_moe(x, w1, w2, weights, ids).shape
    torch.Size([3, 64])
    """
    _check_main(hidden, w1, w2, topk_weights, topk_ids, use_fp8_w8a8)
    if activation != "silu":
        raise ValueError(f"activation must be 'silu', got {activation!r}")
    num_experts = _check_expert_map(expert_map, global_num_experts, w1, hidden.device)
    fp8_1, fp8_2 = _fp8_args(use_fp8_w8a8, per_channel_quant, w1, w2, w1_scale, w2_scale,
                             a1_scale, a2_scale)
    if config is not None and not isinstance(config, dict):
        raise TypeError(f"config must be a dict or None, got {type(config).__name__}")
    out = _output(hidden, out, inplace)
    distribution.record(layer_id, topk_ids, num_experts)
    if hidden.shape[0] == 0:
        return out
    x = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    impl = _FAMILY.get(backend, hidden.device)
    impl.fused_experts(out, x, w1, w2, topk_weights.contiguous(), topk_ids,
                       num_experts=num_experts, expert_map=expert_map, fp8_1=fp8_1,
                       fp8_2=fp8_2, config=config)
    return out


def backends() -> dict[str, str | None]:
    """Each backend with None when it can run here, else the reason it cannot."""
    return _FAMILY.available()


# ---- checks -------------------------------------------------------------------------------------

def _check_main(hidden, w1, w2, topk_weights, topk_ids, fp8: bool) -> None:
    _checks.tensor("hidden", hidden, _ACT_DTYPES, min_dim=2)
    _ndim("hidden", hidden, 2, "[M, H]")
    m, h = hidden.shape
    w_dtypes = (_FP8,) if fp8 else (hidden.dtype,)
    _checks.tensor("w1", w1, w_dtypes, min_dim=3)
    _checks.tensor("w2", w2, w_dtypes, min_dim=3)
    _ndim("w1", w1, 3, "[E, 2I, H]")
    _ndim("w2", w2, 3, "[E, H, I]")
    e, two_i, _ = w1.shape
    if w1.shape[2] != h or two_i % 2 or two_i == 0:
        raise ValueError(f"w1 must have shape [E, 2I, H] with H = {h} (hidden's width) and an "
                         f"even, non-zero 2I, got {tuple(w1.shape)}")
    if tuple(w2.shape) != (e, h, two_i // 2):
        raise ValueError(f"w2 must have shape [E, H, I] = {(e, h, two_i // 2)} (from w1 "
                         f"{tuple(w1.shape)}), got {tuple(w2.shape)}")
    for name, t in (("w1", w1), ("w2", w2)):
        _checks.last_dim_contiguous(name, t)
        _same_device(name, t, hidden)
    _checks.tensor("topk_weights", topk_weights, (torch.float32,), min_dim=2)
    _checks.tensor("topk_ids", topk_ids, (torch.int32,), min_dim=2)
    for name, t in (("topk_weights", topk_weights), ("topk_ids", topk_ids)):
        if t.dim() != 2 or t.shape[0] != m or t.shape[1] < 1:
            raise ValueError(f"{name} must have shape [M, k] with M = {m} (hidden's rows) and "
                             f"k >= 1, got {tuple(t.shape)}")
        _same_device(name, t, hidden)
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_weights and topk_ids must have one shape, got "
                         f"{tuple(topk_weights.shape)} and {tuple(topk_ids.shape)}")


def _ndim(name: str, t: torch.Tensor, n: int, layout: str) -> None:
    if t.dim() != n:
        raise ValueError(f"{name} must be {n}-D {layout}, got shape {tuple(t.shape)}")


def _same_device(name: str, t: torch.Tensor, hidden: torch.Tensor) -> None:
    if t.device != hidden.device:
        raise ValueError(f"{name} must be on hidden's device {hidden.device}, got {t.device}")


def _check_expert_map(expert_map, global_num_experts: int, w1, device) -> int:
    """The number of global expert ids (what moe_align_block_size groups by)."""
    if not isinstance(global_num_experts, int) or isinstance(global_num_experts, bool):
        raise TypeError(f"global_num_experts must be an int, got {global_num_experts!r}")
    if expert_map is None:
        if global_num_experts not in (-1, w1.shape[0]):
            raise ValueError(f"global_num_experts ({global_num_experts}) differs from w1's "
                             f"{w1.shape[0]} experts: pass the expert_map of the local experts")
        return w1.shape[0]
    _checks.tensor("expert_map", expert_map, (torch.int32,))
    _ndim("expert_map", expert_map, 1, "[global_num_experts]")
    if expert_map.device != device:
        raise ValueError(f"expert_map must be on hidden's device {device}, "
                         f"got {expert_map.device}")
    n = expert_map.numel()
    if global_num_experts not in (-1, n):
        raise ValueError(f"expert_map must have global_num_experts = {global_num_experts} "
                         f"entries, got {n}")
    return n


def _fp8_args(fp8: bool, per_channel: bool, w1, w2, w1_scale, w2_scale, a1_scale,
              a2_scale) -> tuple[Fp8 | None, Fp8 | None]:
    scales = {"w1_scale": w1_scale, "w2_scale": w2_scale, "a1_scale": a1_scale,
              "a2_scale": a2_scale}
    if not fp8:
        given = [k for k, v in scales.items() if v is not None]
        if given or per_channel:
            what = ", ".join(given) or "per_channel_quant"
            raise ValueError(f"{what} only apply with use_fp8_w8a8=True")
        return None, None
    from pykernels.moe.quant import Fp8

    ws1 = _w_scale("w1_scale", w1_scale, w1, per_channel)
    ws2 = _w_scale("w2_scale", w2_scale, w2, per_channel)
    return Fp8(ws1, _a_scale("a1_scale", a1_scale, w1)), Fp8(ws2, _a_scale("a2_scale",
                                                                         a2_scale, w1))


def _w_scale(name: str, s, w: torch.Tensor, per_channel: bool) -> torch.Tensor:
    e, n = w.shape[:2]
    want = (e, n) if per_channel else (e,)
    if s is None:
        raise ValueError(f"use_fp8_w8a8 needs {name} (fp32 {list(want)})")
    _checks.tensor(name, s, (torch.float32,))
    _same_device(name, s, w)
    if s.numel() != e * (n if per_channel else 1):
        kind = "per channel" if per_channel else "per tensor"
        raise ValueError(f"{name} must hold {kind} scales {list(want)}, got shape "
                         f"{tuple(s.shape)}")
    return s.reshape(want).contiguous()


def _a_scale(name: str, s, w: torch.Tensor) -> torch.Tensor | None:
    if s is None:
        return None
    _checks.tensor(name, s, (torch.float32,))
    _same_device(name, s, w)
    if s.numel() != 1:
        raise ValueError(f"{name} must be a per-tensor scale (1 element), got shape "
                         f"{tuple(s.shape)}")
    return s.reshape(1)


def _output(hidden: torch.Tensor, out, inplace: bool) -> torch.Tensor:
    if inplace:
        if out is not None:
            raise ValueError("pass either inplace=True or out, not both")
        return hidden
    if out is None:
        return torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
    _checks.like("out", out, "hidden", hidden, hidden.shape)
    return out


# ---- the torch backend --------------------------------------------------------------------------

def fused_experts(out, x, w1, w2, topk_weights, topk_ids, *, num_experts: int,
                  expert_map=None, fp8_1: Fp8 | None = None, fp8_2: Fp8 | None = None,
                  config: dict | None = None) -> None:
    """A readable per-expert loop in the input dtype (host syncs; the benchmark's torch
    provider). FP8 weights are dequantized to x's dtype; activations go through the same
    quantization as the kernels'."""
    local = local_expert_ids(topk_ids, w1.shape[0], expert_map)
    inter = w2.shape[2]
    result = torch.zeros(out.shape, dtype=x.dtype, device=x.device)
    for e in local.unique().tolist():
        if e < 0:
            continue  # not a local expert, or a slot routed nowhere
        tok, j = (local == e).nonzero(as_tuple=True)
        h = _linear(x[tok], w1[e], fp8_1, e)
        act = F.silu(h[:, :inter]) * h[:, inter:]
        y = _linear(act, w2[e], fp8_2, e)
        result.index_add_(0, tok, y * topk_weights[tok, j, None].to(x.dtype))
    out.copy_(result)


def _linear(a: torch.Tensor, w: torch.Tensor, fp8: Fp8 | None, e: int) -> torch.Tensor:
    if fp8 is None:
        return a @ w.t()
    from pykernels.moe import quant

    q, scale = quant.quantize_fp8_torch(a, fp8.a_scale)
    a = q.to(a.dtype) * scale.reshape(-1, 1).to(a.dtype)
    w_scale = fp8.w_scale[e].reshape(-1, 1)
    return a @ (w.to(a.dtype) * w_scale.to(a.dtype)).t()
