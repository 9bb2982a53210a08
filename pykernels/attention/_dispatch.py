"""Backend registries of the attention ops and the checks shared by the functions and the
plan/run objects."""

from __future__ import annotations

import math

import torch

from pykernels._backends import Family
from pykernels._log import get_logger, warn_once
from pykernels._ops import BackendUnavailable
from pykernels.attention import _common, tunables
from pykernels.attention._common import resolve_backend
from pykernels.attention.plan import (
    AutoDecodeRunner,
    AutoPrefillRunner,
    GenericDecodeRunner,
    GenericPrefillRunner,
)

log = get_logger("attention")

_MODULES = {
    "triton": "pykernels.attention.triton",
    "cuda": "pykernels.attention.cuda",
    "fi": "pykernels.attention.fi",
    "fa": "pykernels.attention.fa",
    "torch": "pykernels.attention.ref",
}
# auto's fixed order, used where no backend choice is tuned for the shape (see choose_backend),
# from the H200 run of 2026-11-21 (results/nvidia-h200/attention/): Triton decode is at
# 0.91-1.14x the faster FlashInfer wrapper on the ANCHORS grid (1.04x at bs=64, 4.31 TB/s);
# FlashInfer next; the CUDA decode kernel last (tensor cores since 8b2526d: 0.77-0.89x FlashInfer,
# 3.4-3.6 TB/s on the large rows). Prefill: Triton 0.65x FlashInfer, so FlashInfer first.
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
    """The plan/run object of `backend` (None: VLLM_ATTENTION_BACKEND, else auto). ``auto``
    without an explicit config picks the backend per plan (``choose_backend``); an explicit
    ``config`` is a kernel launch config, so auto then keeps the fixed order."""
    name = backend_name(family, backend)
    if name == "auto" and kw.get("config") is None and family.name in _CHOICES:
        causal = kw.get("causal", True)

        def choose(batch, total_pages, num_tokens):
            return choose_backend(family, spec, batch, total_pages, num_tokens, causal)

        auto = AutoDecodeRunner if kind == "decode" else AutoPrefillRunner
        return auto(choose, lambda n: _backend_runner(family, kind, n, spec, attn, **kw),
                    fixed=kw.get("max_batch") is not None)
    return _backend_runner(family, kind, name, spec, attn, **kw)


def _backend_runner(family: Family, kind: str, name: str, spec, attn, **kw):
    mod = family.get(name, spec.device)
    generic = GenericDecodeRunner if kind == "decode" else GenericPrefillRunner
    cls = getattr(mod, "DecodeRunner" if kind == "decode" else "PrefillRunner", None)
    return cls(spec, attn, **kw) if cls is not None else generic(mod, spec, attn, **kw)


# ---- the tuned auto choice ----------------------------------------------------------------------

_CHOICES = {"paged_decode": (tunables.DECODE_BACKEND, tunables.DECODE_CHOICES),
            "paged_prefill": (tunables.PREFILL_BACKEND, tunables.PREFILL_CHOICES)}


def fixed_backend(family: Family, device: torch.device) -> str:
    """The backend the fixed auto order gives on this device (torch off the GPU)."""
    path = family.get("auto", device).__name__
    return next(n for n, p in family.modules.items() if p == path)


def tuned_backend(family: Family, spec, batch: int, total_pages: int,
                  num_tokens: int | None = None, causal: bool = True) -> str | None:
    """The tuned backend of this plan's bucket (`paged_decode_backend` / `paged_prefill_backend`,
    memoized per bucket by the Tunable), or None when nothing is tuned there or the tuned
    backend cannot run here (not installed, or not on this device; logged once)."""
    tunable, choices = _CHOICES[family.name]
    key = tunables.spec_key(spec, total_pages, batch)
    if num_tokens is None:
        name = tunable.lookup(batch=max(batch, 1), **key)["backend"]
    else:
        name = tunable.lookup(tokens=max(num_tokens, 1), causal=bool(causal), **key)["backend"]
    if name == "auto":
        return None
    try:
        if name not in choices:
            raise ValueError(f"{name!r} is not one of {choices}")
        family.get(name, spec.device)
    except (BackendUnavailable, ValueError) as err:
        warn_once(log, f"tuned-backend:{family.name}:{name}:{spec.device.type}",
                  "%s: the tuned auto choice %r cannot run here (%s); using the fixed order",
                  family.name, name, err)
        return None
    return name


def choose_backend(family: Family, spec, batch: int, total_pages: int,
                   num_tokens: int | None = None, causal: bool = True) -> str:
    """auto's backend for one plan: the tuned choice, else the fixed order."""
    return (tuned_backend(family, spec, batch, total_pages, num_tokens, causal)
            or fixed_backend(family, spec.device))


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
