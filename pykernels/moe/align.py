"""moe_align_block_size: the token slots of a top-k routing grouped by expert and padded to the
fused-MoE GEMM's block size, computed on the device without a host sync."""

from __future__ import annotations

import torch

from pykernels import envs
from pykernels._backends import Family
from pykernels.moe import ref
from pykernels.moe.ref import max_padded_tokens

# Shared memory of the CUDA kernels holds two ints per expert (32 KB at 4096).
MAX_EXPERTS = 4096
_INT32_MAX = 2**31 - 1
_ID_DTYPES = (torch.int32, torch.int64)

# auto: CUDA (one launch up to 2048 slots, two beyond), then Triton (three launches);
# VLLM_ENABLE_MOE_ALIGN_BLOCK_SIZE_TRITON=1 makes auto pick Triton.
_FAMILY = Family(
    name="moe_align_block_size",
    modules={
        "cuda": "pykernels.moe.cuda",
        "triton": "pykernels.moe.triton",
        "torch": "pykernels.moe.align",
    },
    auto_order=("cuda", "triton"),
)


def _check_int(name: str, value, low: int, high: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        span = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {span}, got {value}")


def _check_ids(topk_ids) -> None:
    if not isinstance(topk_ids, torch.Tensor):
        raise TypeError(f"topk_ids must be a torch.Tensor, got {type(topk_ids).__name__}")
    if topk_ids.dtype not in _ID_DTYPES:
        raise TypeError(f"topk_ids must be int32 or int64, got {str(topk_ids.dtype)[6:]}")
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be 2-D [tokens, topk], got shape {tuple(topk_ids.shape)}")


def _check_map(expert_map, num_experts: int, device: torch.device) -> None:
    if expert_map is None:
        return
    if not isinstance(expert_map, torch.Tensor):
        raise TypeError(f"expert_map must be a torch.Tensor, got {type(expert_map).__name__}")
    if expert_map.dtype != torch.int32:
        raise TypeError(f"expert_map must be int32, got {str(expert_map.dtype)[6:]}")
    if tuple(expert_map.shape) != (num_experts,):
        raise ValueError(
            f"expert_map must have shape ({num_experts},), got {tuple(expert_map.shape)}"
        )
    if expert_map.device != device:
        raise ValueError(f"expert_map must be on topk_ids' device {device}, got "
                         f"{expert_map.device}")


def _outputs(out, cap: int, num_blocks: int, device: torch.device):
    if out is None:
        return (torch.empty(cap, dtype=torch.int32, device=device),
                torch.empty(num_blocks, dtype=torch.int32, device=device),
                torch.empty(1, dtype=torch.int32, device=device))
    if not isinstance(out, (tuple, list)) or len(out) != 3:
        raise TypeError("out must be a tuple (sorted_token_ids, expert_ids, "
                        "num_tokens_post_padded)")
    names = ("sorted_token_ids", "expert_ids", "num_tokens_post_padded")
    for name, t, size in zip(names, out, (cap, num_blocks, 1)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int32:
            got = str(t.dtype)[6:] if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"out {name} must be an int32 tensor, got {got}")
        if tuple(t.shape) != (size,):
            raise ValueError(f"out {name} must have shape ({size},), got {tuple(t.shape)}")
        if t.device != device or not t.is_contiguous():
            raise ValueError(f"out {name} must be contiguous and on topk_ids' device {device}, "
                             f"got device {t.device}, strides {t.stride()}")
    return tuple(out)


def moe_align_block_size(
    topk_ids: torch.Tensor,
    num_experts: int,
    block_size: int,
    expert_map: torch.Tensor | None = None,
    *,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Groups the slots of ``topk_ids`` by expert, each group padded to a multiple of
    ``block_size``, for a fused-MoE GEMM that takes one expert per block of rows.

    Parameters
    ----------
    topk_ids : Tensor ``[M, topk]``, int32 (or int64), CUDA or CPU
        Slot ``i`` is the flat index ``t * topk + k``. Ids outside ``[0, num_experts)`` are
        dropped: their slots appear nowhere (as in the reference); no error, no host sync.
        A non-contiguous tensor is copied.
    num_experts : int in ``[1, 4096]``
    block_size : int >= 1
    expert_map : Tensor ``[num_experts]`` int32, optional
        Global -> local expert id, -1 for experts not on this rank: their blocks get id -1.
    out : (sorted_token_ids, expert_ids, num_tokens_post_padded), optional
        Preallocated int32 buffers of exactly the shapes below (written in place, returned).
    backend : {"auto", "cuda", "triton", "torch"}

    Returns
    -------
    sorted_token_ids : Tensor ``[numel + num_experts * (block_size - 1)]`` int32
        Each expert's slots (expert 0 first), padded with the sentinel ``numel``; the buffer
        past the padded total is sentinel too. Order inside a group is backend-defined.
    expert_ids : Tensor ``[ceil(len(sorted_token_ids) / block_size)]`` int32
        The expert (local id under ``expert_map``) of each block; -1 past the padded total.
    num_tokens_post_padded : Tensor ``[1]`` int32, the padded total, on the device.

    Sizes depend only on the shapes, so the op can be captured in a CUDA graph.

    Examples
    --------
    >>> import torch
    >>> from pykernels.moe.align import moe_align_block_size
    >>> ids = torch.tensor([[2, 0], [2, 1]], dtype=torch.int32)
    >>> s, e, n = moe_align_block_size(ids, 4, 2)
    >>> s[:6].tolist(), e[:3].tolist(), n.item()
    ([1, 4, 3, 4, 0, 2], [0, 1, 2], 6)
    """
    _check_ids(topk_ids)
    _check_int("num_experts", num_experts, 1, MAX_EXPERTS)
    _check_int("block_size", block_size, 1)
    _check_map(expert_map, num_experts, topk_ids.device)
    numel = topk_ids.numel()
    cap = max_padded_tokens(numel, num_experts, block_size)
    if cap + block_size + 65536 > _INT32_MAX:
        raise ValueError(f"topk_ids too large: {numel} slots padded for {num_experts} experts "
                         f"of block_size {block_size} overflow int32 positions")
    num_blocks = -(-cap // block_size)
    outs = _outputs(out, cap, num_blocks, topk_ids.device)
    if (backend == "auto" and topk_ids.is_cuda
            and envs.VLLM_ENABLE_MOE_ALIGN_BLOCK_SIZE_TRITON):
        backend = "triton"
    impl = _FAMILY.get(backend, topk_ids.device)
    impl.moe_align_block_size_(*outs, topk_ids.contiguous(), num_experts, block_size,
                               expert_map)
    return outs


def moe_align_block_size_(sorted_ids: torch.Tensor, expert_ids: torch.Tensor,
                          total: torch.Tensor, topk_ids: torch.Tensor, num_experts: int,
                          block_size: int, expert_map: torch.Tensor | None) -> None:
    """The "torch" backend: the reference, copied into the output buffers."""
    results = ref.moe_align_block_size(topk_ids, num_experts, block_size, expert_map)
    for dst, src in zip((sorted_ids, expert_ids, total), results):
        dst.copy_(src)


def backends() -> dict[str, str | None]:
    """Each backend with None when it can run here, else the reason it cannot."""
    return _FAMILY.available()
