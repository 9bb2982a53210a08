"""Backend registries of the attention ops and the checks shared by the functions and the
plan/run objects."""

from __future__ import annotations

import math

import torch

from pykernels._backends import Family
from pykernels.attention import _common
from pykernels.attention._common import resolve_backend
from pykernels.attention.plan import GenericDecodeRunner, GenericPrefillRunner

_MODULES = {
    "triton": "pykernels.attention.triton",
    "cuda": "pykernels.attention.cuda",
    "fi": "pykernels.attention.fi",
    "fa": "pykernels.attention.fa",
    "torch": "pykernels.attention.ref",
}
# auto, from the H200 run of 2026-11-21 (results/nvidia-h200/attention/): Triton decode is at
# 0.91-1.14x the faster FlashInfer wrapper on the ANCHORS grid (1.04x at bs=64, 4.31 TB/s);
# FlashInfer next; the CUDA decode kernel last (0.5x, and it fails to launch for GQA groups >= 8
# at head_dim 64/128 and >= 5 at 256). Prefill: Triton 0.65x FlashInfer, so FlashInfer first.
# A per-bucket tuned choice (`python -m autotune.attention`) is still to come (issue 5).
DECODE = Family("paged_decode", dict(_MODULES), auto_order=("triton", "fi", "cuda"))
PREFILL = Family("paged_prefill", {k: v for k, v in _MODULES.items() if k != "cuda"},
                 auto_order=("fi", "triton"))
APPEND = Family("append_paged_kv", {k: _MODULES[k] for k in ("cuda", "triton", "torch")},
                auto_order=("cuda", "triton"))


def backend_name(family: Family, backend: str | None) -> str:
    name = resolve_backend(backend)
    if name not in family.modules and name != "auto":
        if backend is None:  # the env default names a backend without this op: fall back
            return "auto"
        if name in _MODULES:
            raise ValueError(f"{family.name}: backend {name!r} has no such kernel; use one of "
                             f"{', '.join(repr(b) for b in ('auto', *family.modules))}")
    return name


def runner(family: Family, kind: str, backend, spec, attn, **kw):
    mod = family.get(backend_name(family, backend), spec.device)
    generic = GenericDecodeRunner if kind == "decode" else GenericPrefillRunner
    cls = getattr(mod, "DecodeRunner" if kind == "decode" else "PrefillRunner", None)
    return cls(spec, attn, **kw) if cls is not None else generic(mod, spec, attn, **kw)


def attn_params(head_dim, sm_scale, logits_soft_cap, window_left) -> _common.Params:
    if logits_soft_cap < 0:
        raise ValueError(f"logits_soft_cap must be >= 0 (0: off), got {logits_soft_cap}")
    if window_left < -1:
        raise ValueError(f"window_left must be >= 0, or -1 for no window, got {window_left}")
    scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)
    return _common.Params(scale, float(logits_soft_cap), int(window_left))


def spec_from(q: torch.Tensor, kv_cache: torch.Tensor) -> _common.Spec:
    _common.check_q(q)
    page_size, hkv = _common.check_cache(kv_cache, q)
    return _common.Spec(q.shape[1], hkv, q.shape[2], page_size, q.dtype, kv_cache.dtype,
                        q.device)


def check_pages(max_page: int, kv_cache: torch.Tensor) -> None:
    """The largest page index a host-validated plan uses must exist in this cache."""
    if max_page >= kv_cache.shape[0]:
        raise ValueError(f"kv_indices holds page index {max_page}, out of range for a kv_cache "
                         f"of {kv_cache.shape[0]} pages")


def check_run(spec: _common.Spec, q, kv_cache, max_page: int, rows: int,
              exact: bool = True) -> None:
    """q and kv_cache match the plan; q has the planned rows (at least, when not exact)."""
    got = spec_from(q, kv_cache)
    for field in ("num_q_heads", "num_kv_heads", "head_dim", "page_size", "q_dtype", "kv_dtype"):
        if getattr(got, field) != getattr(spec, field):
            raise ValueError(f"run: {field} is {getattr(got, field)} in q/kv_cache but the plan "
                             f"was made for {getattr(spec, field)}")
    if q.shape[0] != rows and (exact or q.shape[0] < rows):
        raise ValueError(f"q must have {'' if exact else 'at least '}{rows} rows (as planned), "
                         f"got {q.shape[0]}")
    check_pages(max_page, kv_cache)
