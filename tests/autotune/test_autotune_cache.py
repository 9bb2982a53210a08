"""The cache file: hit, miss, environment mismatch, corrupt/empty files, runs/ files, =0 mode."""

from __future__ import annotations

import hashlib
import json
import logging

import pytest

import autotune
from autotune import store, tune
from tests.autotune.autotune_helpers import FakeBench, other_env_meta, shapes


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tune(tunable, space, *tokens, bench=None, **kw):
    bench = bench or FakeBench()
    return tune(tunable, space, shapes(*tokens), bench.make_case, timer=bench.timer, **kw), bench


def test_miss_then_hit(fake_tunable, fake_space, cache_dir):
    config, source = fake_tunable.resolve(tokens=7, n=256, dtype="float16")
    assert source == "default" and config == {"BLOCK": 64, "num_warps": 4}
    report, _ = _tune(fake_tunable, fake_space, 8)
    assert [r.status for r in report.results] == ["tuned"]
    assert report.path == str(cache_dir / "fake_op.json")
    data = json.loads((cache_dir / "fake_op.json").read_text())
    assert data["_metadata"]["name"] == "fake_op" and data["_metadata"]["gpu"]
    for field in ("package_version", "source_hash", "torch", "triton", "cuda",
                  "compute_capability"):
        assert field in data["_metadata"]
    entry = data["entries"]["n=256,dtype=float16,tokens=8"]
    assert entry["config"] == {"BLOCK": 32, "num_warps": 4}  # fastest in FakeBench
    autotune.reset()  # drop in-process entries: the answer must now come from the file
    config, source = fake_tunable.resolve(tokens=7, n=256, dtype="float16")
    assert config == {"BLOCK": 32, "num_warps": 4} and source.startswith("cache fake_op.json")
    assert fake_tunable.lookup(tokens=5, n=256, dtype="float16")["BLOCK"] == 32


def test_warm_rerun_reuses_and_extends(fake_tunable, fake_space, cache_dir):
    _tune(fake_tunable, fake_space, 1, 16)
    report, bench = _tune(fake_tunable, fake_space, 1, 16, 64)
    assert [r.status for r in report.results] == ["cached", "cached", "tuned"]
    assert len(bench.shapes) == 1  # only the new bucket built inputs
    entries = json.loads((cache_dir / "fake_op.json").read_text())["entries"]
    assert sorted(e["shape"]["tokens"] for e in entries.values()) == [1, 16, 64]
    report, _ = _tune(fake_tunable, fake_space, 16, force=True)
    assert report.results[0].status == "tuned"


def test_metadata_mismatch_is_a_miss_and_kept_side_by_side(fake_tunable, fake_space,
                                                           cache_dir, caplog):
    other = other_env_meta(fake_tunable)
    store.atomic_write(cache_dir / "fake_op.json", store.document(other, {
        "n=256,dtype=float16,tokens=8": {"shape": {"n": 256, "dtype": "float16", "tokens": 8},
                                         "config": {"BLOCK": 999, "num_warps": 1}}}, {}))
    before = _sha(cache_dir / "fake_op.json")
    with caplog.at_level(logging.WARNING, logger="pykernels"):
        assert fake_tunable.resolve(tokens=8, n=256, dtype="float16")[1] == "default"
        fake_tunable.invalidate()
        assert fake_tunable.resolve(tokens=8, n=256, dtype="float16")[1] == "default"
    warnings = [r for r in caplog.records if "another environment" in r.getMessage()]
    assert len(warnings) == 1 and "torch" in warnings[0].getMessage()
    report, _ = _tune(fake_tunable, fake_space, 8)
    side = cache_dir / f"fake_op.{store.env.env_hash(fake_tunable.metadata())}.json"
    assert report.path == str(side) and side.exists()
    assert _sha(cache_dir / "fake_op.json") == before  # the other environment's file is intact
    autotune.reset()
    config, source = fake_tunable.resolve(tokens=8, n=256, dtype="float16")
    assert config["BLOCK"] == 32 and side.name in source


@pytest.mark.parametrize("content", ["", "{not json", "[1, 2]", '{"entries": {}}'])
def test_corrupt_or_empty_file_is_a_miss_then_rewritten(fake_tunable, fake_space, cache_dir,
                                                        caplog, content):
    cache_dir.mkdir(parents=True)
    (cache_dir / "fake_op.json").write_text(content)
    with caplog.at_level(logging.WARNING, logger="pykernels"):
        assert fake_tunable.resolve(tokens=8, n=256, dtype="float16")[1] == "default"
    assert any("empty or corrupt" in r.getMessage() for r in caplog.records)
    report, _ = _tune(fake_tunable, fake_space, 8)
    assert report.path == str(cache_dir / "fake_op.json")
    status, data = store.read(cache_dir / "fake_op.json")
    assert status == "ok" and len(data["entries"]) == 1


def test_writes_leave_no_temp_files(fake_tunable, fake_space, cache_dir):
    _tune(fake_tunable, fake_space, 1, 2, 4)
    names = sorted(p.name for p in cache_dir.iterdir())
    assert names == [".fake_op.lock", "fake_op.json"]


def test_runs_names_never_overwrite(fake_tunable, monkeypatch, cache_dir):
    monkeypatch.setattr(store, "_stamp", lambda: "20250101_120000")
    meta = fake_tunable.metadata()
    paths = [store.write_run("fake_op", meta, {f"k{i}": {"i": i}}, {}) for i in range(3)]
    pid = __import__("os").getpid()
    assert [p.name for p in paths] == ["fake_op.20250101_120000.json",
                                      f"fake_op.20250101_120000.{pid}.json",
                                      f"fake_op.20250101_120000.{pid}.1.json"]
    assert [list(store.read(p)[1]["entries"]) for p in paths] == [["k0"], ["k1"], ["k2"]]
    assert all(p.parent == cache_dir / "runs" for p in paths)
    assert not [p for p in (cache_dir / "runs").iterdir() if p.name.startswith(".")]


def test_cache_zero_writes_runs_and_leaves_cache_identical(fake_tunable, fake_space, cache_dir,
                                                           monkeypatch, caplog):
    _tune(fake_tunable, fake_space, 1, 16)
    cache = cache_dir / "fake_op.json"
    before, mtime = _sha(cache), cache.stat().st_mtime_ns
    monkeypatch.setenv("SGLANG_FLASHINFER_AUTOTUNE_CACHE", "0")
    faster = FakeBench(times=lambda cfg: 100.0 - cfg["BLOCK"] / 64)  # now 256 wins
    with caplog.at_level(logging.WARNING, logger="pykernels"):
        report, bench = _tune(fake_tunable, fake_space, 1, 16, 64, bench=faster)
    assert report.mode == "run" and [r.status for r in report.results] == ["tuned"] * 3
    assert _sha(cache) == before and cache.stat().st_mtime_ns == mtime
    runs = sorted((cache_dir / "runs").glob("fake_op.*.json"))
    assert [str(p) for p in runs] == [report.path]
    assert any(report.path in r.getMessage() for r in caplog.records)
    status, data = store.read(runs[0])
    assert status == "ok" and data["_metadata"]["mode"] == "run" and len(data["entries"]) == 3
    # This process uses what it just tuned; the cache file still holds the old winner.
    assert fake_tunable.lookup(tokens=16, n=256, dtype="float16")["BLOCK"] == 256
    assert store.read(cache)[1]["entries"]["n=256,dtype=float16,tokens=16"]["config"][
        "BLOCK"] == 32


def test_entry_records_winner_default_and_margin(fake_tunable, fake_space):
    times = {32: 9.0, 64: 12.0, 128: 10.0, 256: 20.0}
    report, _ = _tune(fake_tunable, fake_space, 4,
                      bench=FakeBench(times=lambda cfg: times[cfg["BLOCK"]]))
    e = report.results[0].entry
    assert e["config"]["BLOCK"] == 32 and e["time_us"] == 9.0
    assert e["default_config"] == {"BLOCK": 64, "num_warps": 4} and e["default_us"] == 12.0
    assert e["speedup_vs_default"] == pytest.approx(12 / 9, rel=1e-3)
    assert e["runner_up"] == {"config": {"BLOCK": 128, "num_warps": 4}, "time_us": 10.0}
    assert e["margin"] == pytest.approx(1 / 9, rel=1e-3)
    assert [t[1] for t in e["timings"]] == [9.0, 10.0, 12.0, 20.0]
