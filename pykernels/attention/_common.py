"""Shared pieces of the attention family: parameters, the device page table, input checks and the
split-KV heuristic.

Backend interface. Every backend module (``triton``, ``cuda``, ``torch`` = ref, ``fi``, ``fa``)
provides the functions below; ``fi`` and ``fa``, which plan in their own way, may instead provide
``DecodeRunner`` / ``PrefillRunner`` classes with the interface of ``plan.GenericDecodeRunner``.

- ``decode_plan(spec, batch, total_pages, config) -> dict``: the resolved launch config, with
  ``num_splits`` (the workspace is sized from it; 1 needs none).
- ``decode(out, q, kv_cache, table, params, work, config)``
- ``prefill_plan(spec, qo_indptr, total_q, config, max_batch=None, kv_len=1) -> (config, work)``
  (``kv_len``: the pow2 mean kv length of the config key, ``tunables.spec_key``)
- ``prefill(out, q, kv_cache, qo_indptr, table, params, causal, work, config)``
- ``append(k, v, kv_cache, slot_mapping, k_scale, v_scale)``
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from pykernels import _checks, envs

HEAD_DIMS = (64, 128, 256)
Q_DTYPES = (torch.bfloat16, torch.float16)
FP8 = torch.float8_e4m3fn
INDEX_DTYPES = (torch.int32, torch.int64)
# Upper bound of the split count: partials are [batch, q_heads, splits, head_dim] fp32 (bs=1,
# 32 q heads, d=128: 2 MB at 128 splits), and past 128 splits of a 32k sequence each split holds
# < 256 tokens, below which the merge dominates.
MAX_SPLITS = 128
# The CUDA decode's limit, kMaxSplits of csrc/attention/decode_utils.cuh (its merge keeps a weight
# per (head, split) in shared memory): its plan clamps to it, the tuner searches no further.
CUDA_MAX_SPLITS = 64
# Aliases accepted in VLLM_ATTENTION_BACKEND (vLLM's names) for our backend names.
_ALIASES = {"flashinfer": "fi", "flash_attn": "fa", "flash-attn": "fa", "triton_attn": "triton",
            "torch_sdpa": "torch", "reference": "torch"}


@dataclass(frozen=True)
class Params:
    """Per-call scalars of the attention math (see ref.py for the conventions)."""

    sm_scale: float
    logits_soft_cap: float = 0.0  # 0: off
    window_left: int = -1  # -1: off
    k_scale: float = 1.0
    v_scale: float = 1.0

    def __post_init__(self):
        # The kernels take the row max of the raw logits before scaling them: a scale <= 0 (or
        # NaN) would pick the wrong row max, a silent wrong answer.
        for name in ("sm_scale", "k_scale"):
            check_positive(name, getattr(self, name))
        if not math.isfinite(self.v_scale):
            raise ValueError(f"v_scale must be finite, got {self.v_scale}")

    def ref_kwargs(self) -> dict:
        return {"sm_scale": self.sm_scale, "logits_soft_cap": self.logits_soft_cap,
                "window_left": self.window_left, "k_scale": self.k_scale,
                "v_scale": self.v_scale}

    def qk_scale_log2(self) -> tuple[float, float]:
        """(scale of q . k, scale after the soft cap) so that kernels get log2-domain logits:
        without a cap ``s2 = dot * a``; with a cap c ``s2 = b * tanh(dot * a)``."""
        log2e = 1.4426950408889634
        base = self.sm_scale * self.k_scale
        if self.logits_soft_cap > 0:
            return base / self.logits_soft_cap, self.logits_soft_cap * log2e
        return base * log2e, 0.0


@dataclass(frozen=True)
class Spec:
    """What a plan is made for: heads, sizes and dtypes fixed across its runs."""

    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    q_dtype: torch.dtype
    kv_dtype: torch.dtype
    device: torch.device

    @property
    def group(self) -> int:
        return self.num_q_heads // self.num_kv_heads


@dataclass
class Table:
    """The page table on the kernels' device, int32."""

    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor
    kv_last_page_len: torch.Tensor
    page_size: int

    @property
    def batch(self) -> int:
        return self.kv_indptr.shape[0] - 1


@dataclass
class DecodeWork:
    """Split-KV workspace: partial outputs and log2-sum-exps of every (request, q head, split),
    and the CUDA kernel's per-(request, kv head group) arrival counters (zero between launches)."""

    num_splits: int
    partial_o: torch.Tensor | None = None  # fp32 [>= batch * hq * splits * head_dim]
    partial_lse: torch.Tensor | None = None  # fp32 [>= batch * hq * splits]
    counters: torch.Tensor | None = None  # int32 [>= batch * num_kv_heads * head chunks]

    @classmethod
    def allocate(cls, batch: int, spec: Spec, num_splits: int,
                 counters: bool = False) -> DecodeWork:
        """Partials for batch x num_splits; counters (zeroed) only when asked: plain calls use
        the backend's shared ones, which saves a memset per call."""
        if num_splits <= 1 and not counters:
            return cls(1)
        f32 = {"dtype": torch.float32, "device": spec.device}
        n = max(batch, 1) * spec.num_q_heads * num_splits
        ctr = torch.zeros(max(batch, 1) * spec.num_q_heads, dtype=torch.int32,
                          device=spec.device) if counters else None
        return cls(num_splits, torch.empty(n * spec.head_dim, **f32), torch.empty(n, **f32), ctr)


# ---- launch configs given by the caller --------------------------------------------------------


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# What each key of a Triton/CUDA launch config may hold: (test, description for the error).
POW2 = (lambda v: _int(v) and v >= 16 and not v & (v - 1), "a power of two >= 16")
WARPS = (lambda v: _int(v) and v in (1, 2, 4, 8, 16), "one of 1, 2, 4, 8, 16")
STAGES = (lambda v: _int(v) and v >= 1, "an int >= 1")
FLAG = (lambda v: isinstance(v, bool), "a bool")


def splits_key(most: int) -> tuple:
    return (lambda v: _int(v) and 0 <= v <= most, f"an int in [0, {most}] (0: the heuristic)")


# The launch-config keys of each kernel backend's plans (kept here, outside the kernel files whose
# hash stamps their tuned configs): (op, backend module) -> key -> (test, description).
CONFIG_KEYS = {
    ("decode", "triton"): {"num_splits": splits_key(MAX_SPLITS), "BLOCK_N": POW2,
                           "BLOCK_H": POW2, "num_warps": WARPS, "num_stages": STAGES},
    # the CUDA plan clamps num_splits to CUDA_MAX_SPLITS
    ("decode", "cuda"): {"num_splits": splits_key(MAX_SPLITS),
                         "num_stages": (lambda v: _int(v) and v in (0, 2, 3),
                                        "0 (the default for the head_dim), 2 or 3")},
    ("prefill", "triton"): {"BLOCK_M": POW2, "BLOCK_N": POW2, "num_warps": WARPS,
                            "num_stages": STAGES, "HEADS_INNER": FLAG},
}


def check_config(config, known: dict[str, tuple]) -> None:
    """A caller's launch config: a dict of `known` keys, each value passing its test; else a
    TypeError/ValueError naming the key (a bad tile would otherwise surface as a compiler error
    or be ignored)."""
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    unknown = sorted(set(config) - set(known))
    if unknown:
        raise ValueError(f"config has unknown keys {unknown}; this backend takes {sorted(known)}")
    for key, value in config.items():
        test, what = known[key]
        if not test(value):
            raise ValueError(f"config[{key!r}] must be {what}, got {value!r}")


# ---- heuristics -------------------------------------------------------------------------------


@functools.cache
def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # the H200's, so CPU runs pick the same splits as the GPU
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_splits(batch: int, num_kv_heads: int, avg_len: float, sms: int,
                  min_tokens: int = 128, waves: float = 2.0) -> int:
    """Splits per request so that batch * kv_heads * splits CTAs cover ~`waves` x SMs, each split
    keeping >= `min_tokens` keys. bs=1, kv 4096, 8 kv heads: 32 splits of 128 keys (256 CTAs on
    132 SMs); bs=16: 4 splits; bs >= 33: 1 (no merge). Tuned per bucket by the autotuner."""
    units = max(batch * num_kv_heads, 1)
    want = math.ceil(waves * sms / units)
    cap = max(1, int(avg_len // min_tokens))
    return int(max(1, min(want, cap, MAX_SPLITS)))


# ---- input checks -----------------------------------------------------------------------------


def resolve_backend(backend: str | None) -> str:
    """backend=None means VLLM_ATTENTION_BACKEND, else "auto"; vLLM's names are accepted."""
    if backend is None:
        backend = envs.VLLM_ATTENTION_BACKEND or "auto"
    name = backend.strip().lower()
    return _ALIASES.get(name, name)


def check_q(q: torch.Tensor, name: str = "q") -> None:
    _checks.tensor(name, q, dtypes=Q_DTYPES, min_dim=3)
    if q.dim() != 3:
        raise ValueError(f"{name} must have shape [tokens, num_q_heads, head_dim], "
                         f"got {tuple(q.shape)}")
    _checks.last_dim_contiguous(name, q)
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"{name}: head_dim must be one of {HEAD_DIMS}, got {q.shape[-1]}")


def check_cache(kv_cache: torch.Tensor, q: torch.Tensor) -> tuple[int, int]:
    """Layout ``[num_pages, 2, page_size, num_kv_heads, head_dim]`` matching q;
    returns (page_size, num_kv_heads)."""
    _checks.tensor("kv_cache", kv_cache, dtypes=(q.dtype, FP8))
    shape = tuple(kv_cache.shape)
    if kv_cache.dim() != 5 or shape[1] != 2:
        raise ValueError("kv_cache must have layout [num_pages, 2, page_size, num_kv_heads, "
                         f"head_dim] (K and V, NHD within a page), got shape {shape}")
    if kv_cache.device != q.device:
        raise ValueError(f"kv_cache must be on q's device {q.device}, got {kv_cache.device}")
    if shape[4] != q.shape[2]:
        raise ValueError(f"kv_cache head_dim (dim 4) must equal q's head_dim {q.shape[2]}, "
                         f"got shape {shape}")
    hkv, hq = shape[3], q.shape[1]
    if hkv < 1 or hq % hkv != 0:
        raise ValueError(f"num_q_heads ({hq}, q dim 1) must be a multiple of num_kv_heads "
                         f"({hkv}, kv_cache dim 3); is the cache in HND layout?")
    if kv_cache.stride(4) != 1 or kv_cache.stride(3) != shape[4]:
        raise ValueError("kv_cache must be contiguous within a token (head stride = head_dim, "
                         f"dim stride 1), got strides {kv_cache.stride()}")
    return shape[2], hkv


def index_tensor(name: str, t, length: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be int32 or int64, got {str(t.dtype).removeprefix('torch.')}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if length is not None and t.shape[0] != length:
        raise ValueError(f"{name} must have {length} entries, got {t.shape[0]}")


def check_table(kv_indptr, kv_indices, kv_last_page_len, batch: int | None = None) -> int:
    """Shapes and dtypes of a CSR page table; returns the batch size."""
    index_tensor("kv_indptr", kv_indptr, None if batch is None else batch + 1)
    if kv_indptr.shape[0] < 1:
        raise ValueError("kv_indptr must have batch + 1 >= 1 entries, got 0")
    n = kv_indptr.shape[0] - 1
    index_tensor("kv_indices", kv_indices)
    index_tensor("kv_last_page_len", kv_last_page_len, n)
    return n


def validate_table_values(kv_indptr, kv_indices, kv_last_page_len, page_size: int,
                          num_pages: int | None) -> int:
    """Value checks on host (CPU) tensors: monotone indptr inside kv_indices, last-page lengths
    in 1..page_size, page indices in range. Returns the largest page index used (-1: none)."""
    ptr = kv_indptr.tolist()
    if any(b < a for a, b in zip(ptr, ptr[1:])) or (ptr and ptr[0] < 0):
        raise ValueError(f"kv_indptr must be non-negative and non-decreasing, got {ptr[:8]}...")
    if ptr and ptr[-1] > kv_indices.shape[0]:
        raise ValueError(f"kv_indptr[-1] = {ptr[-1]} exceeds the {kv_indices.shape[0]} entries "
                         "of kv_indices")
    counts = torch.tensor([b - a for a, b in zip(ptr, ptr[1:])], dtype=torch.long)
    last = kv_last_page_len.long()
    bad = (counts > 0) & ((last < 1) | (last > page_size))
    if bool(bad.any()):
        r = int(bad.nonzero()[0])
        raise ValueError(f"kv_last_page_len[{r}] = {int(last[r])} must be in 1..page_size "
                         f"({page_size}) for a request with pages")
    if not ptr or ptr[-1] == ptr[0]:
        return -1
    used = kv_indices[ptr[0]:ptr[-1]].long()
    lo, hi = int(used.min()), int(used.max())
    if lo < 0:
        raise ValueError(f"kv_indices holds a negative page index ({lo})")
    if num_pages is not None and hi >= num_pages:
        raise ValueError(f"kv_indices holds page index {hi}, out of range for a kv_cache of "
                         f"{num_pages} pages")
    return hi


def check_out(out, like: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty(like.shape, dtype=like.dtype, device=like.device)
    _checks.like("out", out, "q", like, like.shape)
    _checks.last_dim_contiguous("out", out)
    return out


def scalar(name: str, value, kind=float, positive: bool = False):
    """`value` as a Python `kind`; `positive`: a quantization scale (the append divides by it)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()  # a host sync for device tensors: pass floats on the hot path
    value = kind(value)
    if positive:
        check_positive(name, value)
    return value


def check_positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
