"""Tunable: what a kernel module declares so its launcher can ask for a config on every launch.

    RMS_NORM = Tunable("rms_norm", family="norm", key=("hidden", "dtype"), bucket="tokens",
                       default=lambda hidden, **_: default_config(hidden), sources=(__file__,))
    cfg = RMS_NORM.lookup(tokens=rows, hidden=hidden, dtype=x.dtype)

The shape splits into exact fields (`key`: a config is tuned per value) and one bucketed
dimension (`bucket`, the token/batch count): powers of two by default (ceil), or the serving
layer's CUDA-graph batch sizes when given (`set_batch_sizes`, or `buckets=` per tunable;
smallest size >= the count).

Lookup order: configs tuned or broadcast in this process -> the user cache (this environment's
file) -> shipped configs (this GPU, then the nearest GPU of the same compute capability) -> the
heuristic default. Exact buckets are searched through all layers first, then the nearest bucket
(log2 distance, ties to the larger). Every fallback is logged once. The answer is memoized per
(bucket, exact fields): after the first call a lookup is one dict get (~1 us). Files and env
variables are read on the first lookup; call `autotune.invalidate()` after changing them in-process.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable, Mapping, Sequence

from autotune import env, shipped, space, store
from pykernels import envs
from pykernels._log import get_logger, warn_once

log = get_logger("autotune")

_REGISTRY: dict[str, Tunable] = {}
_BATCH_SIZES: tuple[int, ...] | None = None
_info_seen: set[str] = set()


def normalize(value):
    """JSON form of a key value: torch dtypes by name ("bfloat16"), ints as int."""
    if type(value).__name__ == "dtype" and str(value).startswith("torch."):
        return str(value)[len("torch."):]
    if isinstance(value, bool) or value is None or isinstance(value, (str, float)):
        return value
    try:
        return int(value)
    except (TypeError, ValueError):
        return str(value)


def pow2_bucket(m: int) -> int:
    return 1 if m <= 1 else 1 << (int(m) - 1).bit_length()


class _Layer:
    """One source of entries, indexed by exact fields -> sorted [(bucket, config, entry key)]."""

    def __init__(self, label: str, entries: Mapping, tunable: Tunable):
        self.label = label
        self.index: dict[tuple, list] = {}
        for key, entry in entries.items():
            shape, config = entry.get("shape"), entry.get("config")
            if not isinstance(shape, dict) or not isinstance(config, dict):
                continue
            exact = tuple(shape.get(f) for f in tunable.key)
            b = shape.get(tunable.bucket, 0) if tunable.bucket else 0
            self.index.setdefault(exact, []).append((b, config, key))
        for rows in self.index.values():
            rows.sort(key=lambda r: r[0])

    def exact(self, exact: tuple, b: int):
        for row in self.index.get(exact, ()):
            if row[0] == b:
                return row
        return None

    def nearest(self, exact: tuple, b: int):
        rows = self.index.get(exact)
        if not rows:
            return None
        lb = math.log2(max(b, 1))
        return min(rows, key=lambda r: (abs(math.log2(max(r[0], 1)) - lb), -r[0]))


class Tunable:
    """A kernel's tunable launch: name, shape key, heuristic default; see the module docstring.

    Parameters
    ----------
    name : str
        Unique; names the cache file ``<name>.json``.
    family : str
        The kernel family (``norm``, ``moe``, ...): names ``autotune/configs/<family>/``.
    key : sequence of str
        Exact shape fields (``hidden``, ``dtype``, ``N``, ``K``...).
    bucket : str or None
        The bucketed dimension (token or batch count), or None.
    default : callable(**shape) -> dict
        The heuristic config; it must return every key a config has (stored configs are read
        through it: unknown keys are dropped, missing ones take the default's value).
    gemm_like : bool
        Has a main loop whose next tile can be prefetched: `prefetch` and `num_stages` are tuned,
        and TRITON_DISABLE_MACA_OPT_MMA_PREFETCH=1 forces prefetch=False, num_stages=1.
    sources : sequence of paths
        Kernel source files; their hash is part of the cache metadata.
    buckets : sequence of int, optional
        Explicit bucket sizes for this tunable (else `set_batch_sizes`, else powers of two).
    """

    def __init__(self, name: str, *, family: str, key: Sequence[str] = (),
                 bucket: str | None = "tokens", default: Callable[..., dict],
                 gemm_like: bool = False, sources: Iterable[str] = (),
                 buckets: Sequence[int] | None = None):
        self.name, self.family = name, family
        self.key, self.bucket = tuple(key), bucket
        self.default, self.gemm_like = default, gemm_like
        self.sources = tuple(str(s) for s in sources)
        self.buckets = tuple(sorted(set(buckets))) if buckets else None
        self._memo: dict[tuple, dict] = {}
        self._layers: list[_Layer] | None = None
        self._installed: dict[str, dict] = {}
        _REGISTRY[name] = self

    def __repr__(self) -> str:
        return f"Tunable({self.name!r}, family={self.family!r}, key={self.key}, " \
               f"bucket={self.bucket!r}, gemm_like={self.gemm_like})"

    # ---- keys ----------------------------------------------------------------------------------
    def bucket_of(self, m: int) -> int:
        sizes = self.buckets or _BATCH_SIZES
        if sizes:
            return sizes[min(bisect.bisect_left(sizes, m), len(sizes) - 1)]
        return pow2_bucket(m)

    def shape_of(self, **shape) -> dict:
        """The normalized, bucketed shape: exact fields in key order, then the bucket."""
        missing = [f for f in (*self.key, self.bucket) if f and f not in shape]
        if missing:
            raise TypeError(f"{self.name}: the shape needs {', '.join(missing)} "
                            f"(key {list(self.key)}, bucket {self.bucket!r}), got {sorted(shape)}")
        out = {f: normalize(shape[f]) for f in self.key}
        if self.bucket:
            out[self.bucket] = self.bucket_of(int(shape[self.bucket]))
        return out

    def key_of(self, shape: Mapping) -> str:
        """Entry key of a normalized shape: "hidden=4096,dtype=bfloat16,tokens=64"."""
        return ",".join(f"{k}={v}" for k, v in shape.items())

    def default_for(self, **shape) -> dict:
        """The heuristic default for a shape (with its bucket in place of the raw count)."""
        if self.bucket and self.bucket in shape:
            shape = {**shape, self.bucket: self.bucket_of(int(shape[self.bucket]))}
        return dict(self.default(**shape))

    def metadata(self) -> dict:
        return env.collect(self.sources)

    def info(self) -> dict:
        return {"name": self.name, "family": self.family, "key": list(self.key),
                "bucket": self.bucket, "gemm_like": self.gemm_like}

    # ---- lookup --------------------------------------------------------------------------------
    def lookup(self, **shape) -> dict:
        """The config to launch with for this shape (a fresh dict; memoized per bucket)."""
        try:
            m = self.bucket_of(shape[self.bucket]) if self.bucket else 0
            memo_key = (m, *[shape[f] for f in self.key])
        except KeyError:
            self.shape_of(**shape)  # raises the error naming the missing fields
            raise
        config = self._memo.get(memo_key)
        if config is None:
            config = self._memo[memo_key] = self.resolve(**shape)[0]
        return dict(config)

    def resolve(self, **shape) -> tuple[dict, str]:
        """(config, where it came from), uncached: "in-process", "cache", "shipped:<gpu>",
        with " (nearest bucket <b>)" when the exact bucket is missing, or "default"."""
        norm = self.shape_of(**shape)
        exact = tuple(norm[f] for f in self.key)
        b = norm.get(self.bucket, 0) if self.bucket else 0
        default = self.default_for(**shape)
        hit, layer, near = self._search(exact, b)
        if hit is None:
            self._note_default(norm)
            config, source = default, "default"
        else:
            config, source = self._over_default(hit[1], default), layer.label
            if near:
                source += f" (nearest bucket {hit[0]})"
                warn_once(log, f"nearest-bucket:{self.name}:{self.key_of(norm)}",
                          "autotune: no %s config for %s in any source; using the nearest "
                          "bucket %s=%s from %s", self.name, self.key_of(norm), self.bucket,
                          hit[0], layer.label)
            if "nearest GPU" in layer.label:
                warn_once(log, f"nearest-gpu:{self.name}:{layer.label}",
                          "autotune: no configs of %s for this GPU (%s); using %s", self.name,
                          self.metadata()["gpu"], layer.label)
        if self.gemm_like and envs.TRITON_DISABLE_MACA_OPT_MMA_PREFETCH:
            config = space.force_prefetch_off(config)
        return config, source

    def _search(self, exact: tuple, b: int):
        layers = self._get_layers()
        for layer in layers:
            hit = layer.exact(exact, b)
            if hit is not None:
                return hit, layer, False
        for layer in layers:
            hit = layer.nearest(exact, b)
            if hit is not None:
                return hit, layer, True
        return None, None, False

    def _over_default(self, config: dict, default: dict) -> dict:
        unknown = sorted(set(config) - set(default))
        if unknown:
            warn_once(log, f"unknown-keys:{self.name}:{unknown}",
                      "autotune: stored %s config has keys %s unknown to its default config: "
                      "ignored (re-tune)", self.name, unknown)
        return {k: config.get(k, v) for k, v in default.items()}

    def _note_default(self, norm: dict) -> None:
        key = f"default:{self.name}:{self.key_of(norm)}"
        if key not in _info_seen:
            _info_seen.add(key)
            log.info("autotune: no tuned %s config for %s; using the heuristic default (tune with "
                     "python -m autotune.%s)", self.name, self.key_of(norm), self.family)

    def _get_layers(self) -> list[_Layer]:
        if self._layers is None:
            self._layers = self._build_layers()
        return self._layers

    def _build_layers(self) -> list[_Layer]:
        meta = self.metadata()
        layers = [_Layer("in-process", self._installed, self)] if self._installed else []
        path, entries = store.load_entries(self.name, meta)
        if entries:
            layers.append(_Layer(f"cache {path.name}", entries, self))
        for kind, gpu, block in shipped.blocks(self.family, self.name, meta["gpu"],
                                               meta["compute_capability"]):
            shipped.check_source(block, self.name, meta["source_hash"])
            label = f"shipped {gpu}" if kind == "exact" else f"shipped {gpu} (nearest GPU)"
            layers.append(_Layer(label, block["entries"], self))
        return layers

    # ---- in-process entries and cache access ---------------------------------------------------
    def install(self, entries: Mapping[str, dict]) -> None:
        """Use these entries first in this process (a tuning result, or rank 0's broadcast)."""
        self._installed.update(entries)
        self.invalidate()

    def invalidate(self) -> None:
        self._memo.clear()
        self._layers = None

    def cache_entries(self) -> dict:
        """This environment's user-cache entries, read from disk now."""
        return dict(store.load_entries(self.name, self.metadata())[1])

    def known_entries(self) -> dict:
        """Cache entries overlaid with in-process ones: what rank 0 broadcasts."""
        return {**self.cache_entries(), **self._installed}


def registry() -> dict[str, Tunable]:
    """Every Tunable declared in this process (kernel modules declare theirs at import)."""
    return dict(_REGISTRY)


def get(name: str) -> Tunable:
    if name not in _REGISTRY:
        raise KeyError(f"no tunable {name!r} declared; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def set_batch_sizes(sizes: Sequence[int] | None) -> None:
    """Bucket token counts by these sizes (the serving layer's CUDA-graph batch sizes) instead of
    powers of two, in every tunable without its own `buckets`. None restores powers of two."""
    global _BATCH_SIZES
    _BATCH_SIZES = tuple(sorted({int(s) for s in sizes})) if sizes else None
    invalidate()


def invalidate() -> None:
    """Re-read env variables and files on the next lookup (in-process entries are kept)."""
    env.clear()
    shipped.load_family.cache_clear()
    for tunable in _REGISTRY.values():
        tunable.invalidate()


def reset() -> None:
    """invalidate() and forget in-process entries (tests)."""
    for tunable in _REGISTRY.values():
        tunable._installed.clear()
    invalidate()
