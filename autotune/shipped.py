"""Configs shipped with the package: ``autotune/configs/<family>/<GPU>.json``.

Each file holds the tuned entries of one GPU for every tunable of the family, in the cache-file
form (``{"<tunable>": {"_metadata": {...}, "entries": {...}}}``); ``python -m autotune.ship``
writes them from a cache or runs/ file. They answer after the user's cache and before the
heuristic default. A GPU with no file of its own uses the nearest known GPU of the same compute
capability (H200 <-> H100: same SM 9.0, same code generation), preferring the same model name
(an H100 PCIe takes an H100 SXM file before an H200 one); the caller logs that fallback once.

Core module: standard library and pykernels only.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from autotune import env
from pykernels._log import get_logger, warn_once

log = get_logger("autotune")

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"


def family_dir(family: str) -> Path:
    return CONFIGS_DIR / family


def file_for(family: str, gpu: str) -> Path:
    return family_dir(family) / f"{env.gpu_slug(gpu)}.json"


def _read(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        warn_once(log, f"shipped:{path}", "shipped autotune configs %s are unreadable: ignored",
                  path)
        return None
    return data if isinstance(data, dict) else None


def _gpu_of(path: Path, data: dict) -> tuple[str, str | None]:
    """(GPU name, compute capability) of a shipped file, from the metadata of its blocks."""
    for block in data.values():
        meta = block.get("_metadata", {}) if isinstance(block, dict) else {}
        if meta.get("gpu"):
            return meta["gpu"], meta.get("compute_capability")
    return path.stem.replace("_", " "), None


@functools.lru_cache(maxsize=32)
def load_family(family: str) -> tuple[tuple[str, str | None, dict], ...]:
    """((gpu, compute capability, {tunable: block}), ...) for every shipped file of a family;
    read once per process (clear with load_family.cache_clear())."""
    folder = family_dir(family)
    out = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else ():
        data = _read(path)
        if data:
            gpu, cc = _gpu_of(path, data)
            out.append((gpu, cc, data))
    return tuple(out)


def _rank(candidate_gpu: str, gpu: str) -> tuple:
    same_model = env.gpu_model(candidate_gpu) == env.gpu_model(gpu)
    return (not same_model, candidate_gpu)


def blocks(family: str, name: str, gpu: str, cc: str | None) -> list[tuple[str, str, dict]]:
    """Shipped blocks for tunable `name` in lookup order: [("exact"|"nearest-gpu", gpu, block)].

    The exact GPU first, then the other GPUs of the same compute capability, nearest first. A CPU
    (cc None) gets nothing: shipped configs are GPU measurements."""
    if cc is None:
        return []
    exact, near = [], []
    for file_gpu, file_cc, data in load_family(family):
        block = data.get(name)
        if not isinstance(block, dict) or not isinstance(block.get("entries"), dict):
            continue
        if env.gpu_slug(file_gpu) == env.gpu_slug(gpu):
            exact.append(("exact", file_gpu, block))
        elif file_cc == cc:
            near.append(("nearest-gpu", file_gpu, block))
    near.sort(key=lambda item: _rank(item[1], gpu))
    return exact + near


def check_source(block: dict, name: str, current_hash: str) -> None:
    """Log once (info) when shipped configs were tuned for another kernel source: they still
    launch correctly (configs are launch parameters) but may no longer be the fastest."""
    saved = block.get("_metadata", {}).get("source_hash")
    if saved and saved != current_hash:
        key = f"shipped-source:{name}:{saved}"
        if key not in _seen:
            _seen.add(key)
            log.info("shipped configs of %s were tuned for another version of its kernel "
                     "source (%s, now %s): re-tune and re-ship them", name, saved, current_hash)


_seen: set[str] = set()
