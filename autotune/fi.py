"""FlashInfer's own tuner under our cache rule and in our folder.

    from autotune.fi import flashinfer_autotune
    with flashinfer_autotune():          # tune while running a warm-up forward pass
        model(warmup_batch)

wraps ``flashinfer.autotuner.autotune(True, cache=<path>)`` (FlashInfer >= 0.6; the `cache`
argument loads the file on entry and saves on exit):

* SGLANG_FLASHINFER_AUTOTUNE_CACHE=1: ``<PYKERNELS_CACHE_DIR>/autotune/flashinfer.json`` is
  loaded and extended. FlashInfer stamps it with its own `_metadata` (its version, CUDA, cuBLAS,
  cuDNN, GPU) and refuses a file from another environment; we then use the side-by-side
  ``flashinfer.<env_hash>.json`` instead, so no environment's file is lost. FlashInfer's save
  (a re-read, merge and atomic replace) runs under our file lock, so concurrent ranks lose nothing.
  A corrupt file (FlashInfer would raise on it) is removed with a warning and written afresh.
* SGLANG_FLASHINFER_AUTOTUNE_CACHE=0: nothing is loaded; FlashInfer saves into a private temp
  file that becomes ``runs/flashinfer.<YYYYmmdd_HHMMSS>.json`` (never overwriting; path logged).

FlashInfer is imported lazily: importing this module never needs it.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
from pathlib import Path

from autotune import store
from pykernels import envs
from pykernels._log import get_logger, warn_once

log = get_logger("autotune")


def _autotune_fn():
    try:
        from flashinfer import autotuner
    except ImportError as err:
        raise RuntimeError("flashinfer_autotune needs FlashInfer (pip install "
                           "'pykernels[gpu]', i.e. flashinfer-python>=0.6)") from err
    fn = autotuner.autotune
    if "cache" not in inspect.signature(fn).parameters:
        raise RuntimeError("this FlashInfer's autotune() has no cache= argument: "
                           "flashinfer-python >= 0.6 is needed")
    return autotuner, fn


def _fi_metadata(autotuner) -> dict | None:
    collect = getattr(autotuner, "_collect_metadata", None)  # private; absent in older builds
    try:
        return dict(collect()) if collect else None
    except Exception:
        return None


def _matches(saved: dict, current: dict) -> bool:
    # FlashInfer's own rule: every current field equal, or "*" in the saved file.
    return all(saved.get(k) in (v, "*") for k, v in current.items())


def cache_path(name: str, autotuner) -> Path:
    """This environment's FlashInfer cache file (plain, or side by side when the plain one
    belongs to another environment). Call under store.locked(name)."""
    plain = store.root() / f"{name}.json"
    current = _fi_metadata(autotuner)
    if current is None:
        return plain
    digest = hashlib.sha256(json.dumps(current, sort_keys=True).encode()).hexdigest()[:12]
    hashed = store.root() / f"{name}.{digest}.json"
    if hashed.exists():
        return hashed
    try:
        saved = json.loads(plain.read_text())
    except FileNotFoundError:
        return plain
    except (OSError, ValueError):
        saved = None
    if not isinstance(saved, dict):
        log.warning("autotune: FlashInfer cache %s is empty or corrupt: removed, it will be "
                    "written afresh", plain)
        plain.unlink(missing_ok=True)
        return plain
    meta = saved.get("_metadata")
    if isinstance(meta, dict) and not _matches(meta, current):
        warn_once(log, f"fi-mismatch:{plain}", "autotune: FlashInfer cache %s was written for "
                  "another environment: kept as is; this environment uses %s", plain, hashed.name)
        return hashed
    return plain


class _LockedExit:
    """Enter FlashInfer's context as is; run its exit (the save) under our file lock."""

    def __init__(self, cm, name: str):
        self.cm, self.name = cm, name

    def __enter__(self):
        return self.cm.__enter__()

    def __exit__(self, *exc):
        with store.locked(self.name):
            return self.cm.__exit__(*exc)


@contextlib.contextmanager
def flashinfer_autotune(tune: bool = True, *, name: str = "flashinfer", **kwargs):
    """Context manager around flashinfer.autotuner.autotune(tune, cache=...); yields the path
    FlashInfer loads from / saves to. kwargs go to FlashInfer (tuning_buckets, round_up, ...)."""
    autotuner, autotune = _autotune_fn()
    if envs.SGLANG_FLASHINFER_AUTOTUNE_CACHE:
        with store.locked(name):
            path = cache_path(name, autotuner)
        with _LockedExit(autotune(tune, cache=str(path), **kwargs), name):
            yield path
        return
    if not tune:  # no cache and no tuning: FlashInfer's defaults
        with autotune(False, **kwargs):
            yield None
        return
    store.runs_root().mkdir(parents=True, exist_ok=True)
    tmp = store.runs_root() / f".{name}.{os.getpid()}.{id(kwargs):x}.tmp.json"
    tmp.unlink(missing_ok=True)
    try:
        with autotune(True, cache=str(tmp), **kwargs):
            yield tmp
        if tmp.exists():
            final = store.publish_run(name, tmp)
            log.warning("autotune: SGLANG_FLASHINFER_AUTOTUNE_CACHE=0: FlashInfer tuning "
                        "results written to %s (the cache is untouched)", final)
    finally:
        tmp.unlink(missing_ok=True)
