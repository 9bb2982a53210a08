"""The environment a tuned config belongs to: the `_metadata` block of every cache file.

A config is only as good as the environment it was measured in: another GPU, another Triton (new
code generation), another torch/CUDA, or an edited kernel can change which config wins. The fields
in MATCH_FIELDS decide whether a cache file belongs to this process; a file written elsewhere is
a miss (logged once), never used and never overwritten.

Core module: imports only the standard library and pykernels.envs/_log; torch and triton are
imported lazily (they are already loaded by the kernel module that asks for a config).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

FORMAT = 1

# Fields that must be equal for a cache file to be used by this process.
MATCH_FIELDS = (
    "format", "package_version", "source_hash", "torch", "triton", "cuda", "gpu",
    "compute_capability",
)


def _package_version() -> str:
    import pykernels  # already imported: it is the parent of pykernels.envs

    return getattr(pykernels, "__version__", "unknown")


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


@functools.lru_cache(maxsize=8)
def device_fields(device_index: int | None = None) -> dict:
    """GPU name and compute capability ("9.0") of the current CUDA device; "cpu" without one or
    when Triton runs through its interpreter (TRITON_INTERPRET=1): then nothing runs on the GPU."""
    import torch

    from pykernels import envs

    if envs.TRITON_INTERPRET or not torch.cuda.is_available():
        return {"gpu": "cpu", "compute_capability": None}
    index = torch.cuda.current_device() if device_index is None else device_index
    major, minor = torch.cuda.get_device_capability(index)
    return {"gpu": torch.cuda.get_device_name(index), "compute_capability": f"{major}.{minor}"}


@functools.lru_cache(maxsize=1)
def _software_fields() -> dict:
    import torch

    return {
        "format": FORMAT,
        "package_version": _package_version(),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "cuda": torch.version.cuda,
    }


@functools.lru_cache(maxsize=64)
def source_hash(sources: tuple[str, ...]) -> str:
    """sha256 (16 hex digits) of the kernel source files; "none" when no file is given.

    A file that cannot be read hashes by its name only, so a missing source does not crash a
    lookup (it still changes the hash, so the mismatch is visible)."""
    if not sources:
        return "none"
    digest = hashlib.sha256()
    for src in sorted(sources):
        digest.update(Path(src).name.encode())
        try:
            digest.update(Path(src).read_bytes())
        except OSError:
            digest.update(b"<unreadable>")
    return digest.hexdigest()[:16]


def collect(sources: Iterable[str] = ()) -> dict:
    """The metadata of this process for a tunable whose kernel lives in `sources`."""
    meta = dict(_software_fields())
    meta["source_hash"] = source_hash(tuple(sources))
    meta.update(device_fields())
    return meta


def env_hash(meta: Mapping) -> str:
    """12 hex digits naming an environment: the side-by-side file `<name>.<env_hash>.json`."""
    blob = json.dumps({k: meta.get(k) for k in MATCH_FIELDS}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def mismatches(saved: Mapping, current: Mapping) -> dict[str, tuple]:
    """{field: (saved, current)} for each MATCH_FIELDS entry that differs."""
    return {k: (saved.get(k), current.get(k)) for k in MATCH_FIELDS
            if saved.get(k) != current.get(k)}


def describe(diff: Mapping[str, tuple]) -> str:
    return ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in diff.items())


# ---- GPU names ---------------------------------------------------------------------------------

def gpu_slug(name: str) -> str:
    """File-name form of a GPU name: "NVIDIA H100 80GB HBM3" -> "NVIDIA_H100_80GB_HBM3"."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", name.strip()).strip("_") or "unknown"


def gpu_model(name: str) -> str | None:
    """The model token of a GPU name ("H100", "H200", "A100"), used to rank fallbacks."""
    found = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", name.upper())
    return found.group(1) if found else None


def clear() -> None:
    """Forget the collected fields (tests; a process that switched device or edited a kernel)."""
    device_fields.cache_clear()
    _software_fields.cache_clear()
    source_hash.cache_clear()
