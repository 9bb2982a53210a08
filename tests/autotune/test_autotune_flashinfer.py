"""flashinfer_autotune: FlashInfer's tuner under our cache/runs/ rule, with a fake flashinfer
module (the real one is not installed on CPU boxes) that mimics its autotune(cache=...) contract:
load the file on entry (raising on corrupt JSON), save merged configs on exit when tuning."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import types

import pytest
from filelock import FileLock, Timeout

from autotune import store
from autotune.fi import flashinfer_autotune

META = {"flashinfer_version": "0.6.1", "cuda_version": "13.0", "gpu": "NVIDIA H200"}


@pytest.fixture
def fake_fi(monkeypatch):
    state = {"calls": [], "loaded": None, "lock_held_on_save": None, "meta": dict(META)}

    @contextlib.contextmanager
    def autotune(tune_mode=True, cache=None, tuning_buckets=None, round_up=None, skip_ops=None):
        state["calls"].append({"tune_mode": tune_mode, "cache": cache})
        configs = {}
        if cache and os.path.isfile(cache):
            with open(cache) as f:
                configs = json.load(f)  # FlashInfer raises on a corrupt file
            saved = configs.pop("_metadata", None)
            if saved and saved != state["meta"]:
                cache = None  # mismatch: FlashInfer ignores the file and does not save
                configs = {}
        state["loaded"] = configs
        yield
        if cache and tune_mode:
            lock = FileLock(str(store.lock_path("flashinfer")), timeout=0)
            try:
                lock.acquire()
                lock.release()
                state["lock_held_on_save"] = False
            except Timeout:
                state["lock_held_on_save"] = True
            out = {"_metadata": state["meta"], **configs, "('op', 'Runner', 1)": ["Runner", 7]}
            with open(cache + ".tmp", "w") as f:
                json.dump(out, f)
            os.replace(cache + ".tmp", cache)

    autotuner = types.ModuleType("flashinfer.autotuner")
    autotuner.autotune = autotune
    autotuner._collect_metadata = lambda: dict(state["meta"])
    pkg = types.ModuleType("flashinfer")
    pkg.autotuner = autotuner
    monkeypatch.setitem(sys.modules, "flashinfer", pkg)
    monkeypatch.setitem(sys.modules, "flashinfer.autotuner", autotuner)
    return state


def test_cache_mode_loads_extends_and_saves_under_our_lock(fake_fi, cache_dir):
    with flashinfer_autotune() as path:
        assert path == cache_dir / "flashinfer.json"
    assert fake_fi["lock_held_on_save"] is True
    saved = json.loads(path.read_text())
    assert saved["_metadata"] == META and "('op', 'Runner', 1)" in saved
    with flashinfer_autotune(tuning_buckets=(1, 2)):
        pass
    assert "('op', 'Runner', 1)" in fake_fi["loaded"]  # reused on the next run
    assert fake_fi["calls"][-1]["tune_mode"] is True


def test_other_environment_file_kept_side_by_side(fake_fi, cache_dir):
    cache_dir.mkdir(parents=True)
    plain = cache_dir / "flashinfer.json"
    plain.write_text(json.dumps({"_metadata": {**META, "gpu": "NVIDIA H100"}, "k": ["R", 1]}))
    before = hashlib.sha256(plain.read_bytes()).hexdigest()
    with flashinfer_autotune() as path:
        assert path != plain and path.name.startswith("flashinfer.") and path.parent == cache_dir
    assert hashlib.sha256(plain.read_bytes()).hexdigest() == before
    assert json.loads(path.read_text())["_metadata"] == META
    with flashinfer_autotune() as again:
        assert again == path  # the side-by-side file is this environment's from now on


def test_corrupt_file_is_replaced(fake_fi, cache_dir):
    cache_dir.mkdir(parents=True)
    (cache_dir / "flashinfer.json").write_text("{torn")
    with flashinfer_autotune() as path:
        pass
    assert json.loads(path.read_text())["_metadata"] == META


def test_runs_mode_leaves_cache_identical(fake_fi, cache_dir, monkeypatch):
    with flashinfer_autotune():
        pass
    cache = cache_dir / "flashinfer.json"
    before = hashlib.sha256(cache.read_bytes()).hexdigest()
    monkeypatch.setenv("SGLANG_FLASHINFER_AUTOTUNE_CACHE", "0")
    monkeypatch.setattr(store, "_stamp", lambda: "20250101_000000")
    for _ in range(2):
        with flashinfer_autotune() as tmp:
            assert tmp.parent == cache_dir / "runs"
        assert fake_fi["loaded"] == {}  # nothing was loaded
    assert hashlib.sha256(cache.read_bytes()).hexdigest() == before
    runs = {p.name for p in (cache_dir / "runs").iterdir()}  # no temp file left either
    assert runs == {"flashinfer.20250101_000000.json",
                    f"flashinfer.20250101_000000.{os.getpid()}.json"}


def test_needs_cache_argument(monkeypatch):
    @contextlib.contextmanager
    def old_autotune(tune_mode=True):
        yield

    autotuner = types.ModuleType("flashinfer.autotuner")
    autotuner.autotune = old_autotune
    pkg = types.ModuleType("flashinfer")
    pkg.autotuner = autotuner
    monkeypatch.setitem(sys.modules, "flashinfer", pkg)
    monkeypatch.setitem(sys.modules, "flashinfer.autotuner", autotuner)
    with pytest.raises(RuntimeError, match="cache="):
        with flashinfer_autotune():
            pass


def test_missing_flashinfer_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "flashinfer", None)
    with pytest.raises(RuntimeError, match="needs FlashInfer"):
        with flashinfer_autotune():
            pass
