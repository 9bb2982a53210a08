"""MoE ops through the CUDA op library (csrc/moe); importing this module loads it."""

from __future__ import annotations

import torch

from pykernels import _ops

_ops.load()


@torch.library.register_fake("pykernels::moe_align_block_size")
def _moe_align_block_size_fake(sorted_token_ids: torch.Tensor, expert_ids: torch.Tensor,
                               num_tokens_post_padded: torch.Tensor, topk_ids: torch.Tensor,
                               num_experts: int, block_size: int,
                               expert_map: torch.Tensor | None) -> None:
    return None


def moe_align_block_size_(sorted_ids: torch.Tensor, expert_ids: torch.Tensor,
                          total: torch.Tensor, topk_ids: torch.Tensor, num_experts: int,
                          block_size: int, expert_map: torch.Tensor | None) -> None:
    """Writes the three int32 outputs; topk_ids contiguous 2-D int32/int64 (checked in C++)."""
    torch.ops.pykernels.moe_align_block_size(sorted_ids, expert_ids, total, topk_ids,
                                             num_experts, block_size, expert_map)
