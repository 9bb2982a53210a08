"""Attention Tunables declared outside the kernel modules: the CUDA decode kernel's split count
and pipeline depth, and the backend that ``auto`` picks per op and shape. Tuned by
``python -m autotune.attention``.

Light on purpose (autotune's core and ``_common`` only): ``cuda.decode_plan`` imports it, and so
does ``_dispatch``, without pulling in Triton, FlashInfer or the CUDA op library.

Keys: heads, head_dim, page size, q and cache dtypes and ``kv_len``, the mean kv length per
request rounded up to a power of two (the same key as the Triton decode Tunable
``paged_decode_triton``, so one tuning grid serves all three); bucketed by the batch (decode) or
the query-token count (prefill). The backend choice's default ``{"backend": "auto"}`` means
"nothing tuned": ``auto`` then follows its fixed order (``_dispatch``).
"""

from __future__ import annotations

from pathlib import Path

from autotune import Tunable
from pykernels.attention import _common

_HERE = Path(__file__).resolve().parent
_CSRC = _HERE.parent.parent / "csrc" / "attention"  # absent from a wheel: hashed by name then

DECODE_KEY = ("num_q_heads", "num_kv_heads", "head_dim", "page_size", "dtype", "kv_dtype",
              "kv_len")
PREFILL_KEY = ("num_q_heads", "num_kv_heads", "head_dim", "page_size", "dtype", "kv_dtype",
               "causal", "kv_len")
# Backends `auto` may pick, fastest-first order aside: fa is untested, torch is the reference.
DECODE_CHOICES = ("triton", "cuda", "fi")
PREFILL_CHOICES = ("triton", "fi")


def _cuda_sources() -> tuple[str, ...]:
    return (*sorted(str(p) for p in _CSRC.glob("*.cu*")), str(_HERE / "cuda.py"))


def _sources(*names: str) -> tuple[str, ...]:
    return tuple(str(_HERE / n) for n in names)


def pow2(x: float) -> int:
    """Power-of-two bucket of a mean length, exactly as triton_decode's plan rounds it (x is
    truncated first: 64.5 -> 64), so the keys of all three decode Tunables agree."""
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def spec_key(spec: _common.Spec, total_pages: int, batch: int) -> dict:
    """The key fields of a plan: ``kv_len`` from the pages the table holds (the host count, or
    ``kv_indices.shape[0]`` for a device table), as the Triton decode plan computes it."""
    avg_len = total_pages * spec.page_size / max(batch, 1)
    return {"num_q_heads": spec.num_q_heads, "num_kv_heads": spec.num_kv_heads,
            "head_dim": spec.head_dim, "page_size": spec.page_size, "dtype": spec.q_dtype,
            "kv_dtype": spec.kv_dtype, "kv_len": pow2(avg_len)}


DECODE_CUDA = Tunable(
    "paged_decode_cuda", family="attention", key=DECODE_KEY, bucket="batch",
    # 0: chosen at plan time (_common.choose_splits; the kernel's pipeline depth for d)
    default=lambda **_: {"num_splits": 0, "num_stages": 0},
    sources=_cuda_sources())

DECODE_BACKEND = Tunable(
    "paged_decode_backend", family="attention", key=DECODE_KEY, bucket="batch",
    default=lambda **_: {"backend": "auto"},
    sources=(*_sources("triton_decode.py", "fi.py", "_dispatch.py"), *_cuda_sources()))

# Query-token counts are no CUDA-graph batch sizes: powers of two up to 1M tokens, whatever the
# serving layer passes to autotune.set_batch_sizes (which rebuckets tunables without their own).
TOKEN_BUCKETS = tuple(1 << i for i in range(21))

PREFILL_BACKEND = Tunable(
    "paged_prefill_backend", family="attention", key=PREFILL_KEY, bucket="tokens",
    default=lambda **_: {"backend": "auto"}, buckets=TOKEN_BUCKETS,
    sources=_sources("triton_prefill.py", "fi.py", "_dispatch.py"))
