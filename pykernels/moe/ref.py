"""Pure-torch references of the MoE family: the executable definition of every contract.

- ``moe_align_block_size``: token slots grouped by expert, each group padded to a multiple of
  ``block_size`` with the sentinel ``numel(topk_ids)``; ``expert_ids`` per block (-1 for experts
  that the expert map marks non-local, and for the unused blocks past the padded total);
  ``num_tokens_post_padded`` = the padded total, a 1-element int32 tensor. Within an expert's
  group the reference keeps slots in ascending order; kernels may order them freely (tests compare
  each group's contents).
- ``fused_topk`` / ``grouped_topk``: routing weights (fp32) and expert ids (int32).
- ``fused_moe``: ``sum_k w_k * (silu(x W1g_e^T) * (x W1u_e^T)) W2_e^T`` over a token's top-k experts
  e = ids[t, k], in fp32, with w1 ``[E, 2I, H]`` (gate rows first, then up) and w2 ``[E, H, I]``.
"""

from __future__ import annotations

import torch

from pykernels.moe.quant import quantize_fp8_torch


def max_padded_tokens(numel: int, num_experts: int, block_size: int) -> int:
    """Worst-case padded total: every expert's group may need block_size - 1 padding slots."""
    return numel + num_experts * (block_size - 1)


def moe_align_block_size(topk_ids: torch.Tensor, num_experts: int, block_size: int,
                         expert_map: torch.Tensor | None = None):
    """Returns (sorted_token_ids [max_padded] int32, expert_ids [ceil(max_padded / block_size)]
    int32, num_tokens_post_padded [1] int32), all on topk_ids' device."""
    dev = topk_ids.device
    flat = topk_ids.reshape(-1).long().cpu()
    numel = flat.numel()
    cap = max_padded_tokens(numel, num_experts, block_size)
    sorted_ids = torch.full((cap,), numel, dtype=torch.int32)
    expert_ids = torch.full((-(-cap // block_size),), -1, dtype=torch.int32)
    local = expert_map.long().cpu() if expert_map is not None else None
    pos = 0
    for e in range(num_experts):
        slots = (flat == e).nonzero().flatten()
        n = slots.numel()
        if n == 0:
            continue
        sorted_ids[pos:pos + n] = slots.int()
        blocks = -(-n // block_size)
        eid = e if local is None else int(local[e])
        expert_ids[pos // block_size:pos // block_size + blocks] = eid
        pos += blocks * block_size
    total = torch.tensor([pos], dtype=torch.int32)
    return sorted_ids.to(dev), expert_ids.to(dev), total.to(dev)


def fused_topk(gating_logits: torch.Tensor, topk: int, renormalize: bool,
               scoring: str = "softmax"):
    """Top-k experts per token by softmax (or sigmoid) score; fp32 weights, int32 ids. Ties go to
    the lower expert id (torch.topk on CPU and CUDA agree on this for distinct scores only)."""
    scores = _scores(gating_logits.float(), scoring)
    weights, ids = torch.topk(scores, topk, dim=-1)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, ids.int()


def grouped_topk(gating_logits: torch.Tensor, topk: int, num_expert_group: int, topk_group: int,
                 renormalize: bool, scoring: str = "sigmoid",
                 correction_bias: torch.Tensor | None = None,
                 routed_scaling_factor: float = 1.0):
    """DeepSeek-V3 routing: experts in `num_expert_group` groups; a group scores the sum of its top
    2 (biased) scores (its max without a bias); the best `topk_group` groups stay; top-k over their
    experts by biased score; weights are the unbiased scores, renormalized, times the factor."""
    m, e = gating_logits.shape
    scores = _scores(gating_logits.float(), scoring)
    choice = scores + correction_bias.float() if correction_bias is not None else scores
    grouped = choice.view(m, num_expert_group, e // num_expert_group)
    if correction_bias is not None:
        group_score = grouped.topk(2, dim=-1).values.sum(-1)
    else:
        group_score = grouped.max(-1).values
    keep = group_score.topk(topk_group, dim=-1).indices
    mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)
    mask = mask[:, :, None].expand_as(grouped).reshape(m, e)
    ids = choice.masked_fill(~mask, float("-inf")).topk(topk, dim=-1).indices
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights * routed_scaling_factor, ids.int()


def _scores(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    if scoring == "softmax":
        return torch.softmax(logits, dim=-1)
    if scoring == "sigmoid":
        return torch.sigmoid(logits)
    raise ValueError(f"scoring must be 'softmax' or 'sigmoid', got {scoring!r}")


# ---- fused_moe ----------------------------------------------------------------------------------

def fake_quant_fp8(x: torch.Tensor, a_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x (fp32 rows) rounded through float8_e4m3fn as the kernels quantize it (per row with
    scale max|row| / 448, or with the static per-tensor a_scale: quant.quantize_fp8_torch);
    returns the dequantized fp32 values."""
    q, scale = quantize_fp8_torch(x, a_scale)
    return q.float() * scale.reshape(-1, 1)


def dequantize_fp8_weight(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """One expert's fp8 weight [N, K] times its scale (1 element) or scales [N], in fp32."""
    return w.float() * scale.float().reshape(-1, 1)


def _expert_weight(w: torch.Tensor, scale: torch.Tensor | None, e: int) -> torch.Tensor:
    return w[e].float() if scale is None else dequantize_fp8_weight(w[e], scale[e])


def local_expert_ids(topk_ids: torch.Tensor, num_local: int,
                     expert_map: torch.Tensor | None = None) -> torch.Tensor:
    """Each slot's index into the local weights (int64), -1 for ids out of the global range
    [0, expert_map.numel() or num_local) and for experts the map marks non-local."""
    ids = topk_ids.long()
    num_global = expert_map.numel() if expert_map is not None else num_local
    routed = (ids >= 0) & (ids < num_global)
    if expert_map is not None:
        ids = expert_map.long()[ids.clamp(0, num_global - 1)]
    return torch.where(routed, ids, -1)


def fused_moe(hidden: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
              topk_weights: torch.Tensor, topk_ids: torch.Tensor, *,
              expert_map: torch.Tensor | None = None, w1_scale: torch.Tensor | None = None,
              w2_scale: torch.Tensor | None = None, a1_scale: torch.Tensor | None = None,
              a2_scale: torch.Tensor | None = None,
              act_dtype: torch.dtype | None = None) -> torch.Tensor:
    """fp32 [M, H]: ``sum_j w[t, j] * (silu(x W1g_e^T) * (x W1u_e^T)) W2_e^T``, e = the local
    index of ids[t, j] (expert_map; -1 contributes zero). Ids outside [0, global experts) (-1:
    a token routed nowhere) contribute zero. With fp8 weights (w*_scale given):
    dequantize-then-matmul, activations rounded through fp8 like the kernels (per token, or the
    static a*_scale); act_dtype rounds the SiLU output to that dtype first, where the kernels
    store it before quantizing."""
    x = hidden.float()
    inter = w2.shape[2]
    fp8 = w1_scale is not None
    local = local_expert_ids(topk_ids, w1.shape[0], expert_map)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(w1.shape[0]):
        tok, j = (local == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        a = fake_quant_fp8(x[tok], a1_scale) if fp8 else x[tok]
        h = a @ _expert_weight(w1, w1_scale, e).t()
        act = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]
        if act_dtype is not None:
            act = act.to(act_dtype).float()
        if fp8:
            act = fake_quant_fp8(act, a2_scale)
        y = act @ _expert_weight(w2, w2_scale, e).t()
        out.index_add_(0, tok, y * topk_weights[tok, j, None].float())
    return out
