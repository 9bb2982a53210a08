"""Tunable.lookup: buckets, lookup order, nearest-bucket and nearest-GPU fallbacks (logged once),
the MMA-prefetch override, memoization."""

from __future__ import annotations

import logging

import pytest

import autotune
from autotune import env, shipped, store, tune
from tests.autotune.autotune_helpers import FakeBench, shapes


def _entry(tokens, block, n=256, dtype="float16", **extra):
    shape = {"n": n, "dtype": dtype, "tokens": tokens}
    key = f"n={n},dtype={dtype},tokens={tokens}"
    return key, {"shape": shape, "config": {"BLOCK": block, "num_warps": 4, **extra}}


def _write_cache(tunable, cache_dir, *entries):
    store.atomic_write(cache_dir / f"{tunable.name}.json",
                       store.document(tunable.metadata(), dict(entries), tunable.info()))
    autotune.invalidate()


def _ship(family, tunable_name, gpu, cc, *entries):
    meta = {"gpu": gpu, "compute_capability": cc, "source_hash": "none"}
    store.atomic_write(shipped.CONFIGS_DIR / family / f"{env.gpu_slug(gpu)}.json",
                       {tunable_name: {"_metadata": meta, "entries": dict(entries)}})


def _warnings(caplog, text):
    return [r for r in caplog.records if text in r.getMessage()]


def test_pow2_and_explicit_buckets(fake_tunable):
    assert [fake_tunable.bucket_of(m) for m in (0, 1, 2, 3, 5, 64, 65)] == [1, 1, 2, 4, 8, 64,
                                                                           128]
    autotune.set_batch_sizes([1, 2, 4, 8, 12, 16, 24, 32])
    assert [fake_tunable.bucket_of(m) for m in (1, 9, 12, 13, 24, 100)] == [1, 12, 12, 16, 24, 32]
    t = autotune.Tunable("own_buckets", family="fake", key=(), default=lambda **_: {},
                         buckets=[3, 10])
    assert [t.bucket_of(m) for m in (1, 4, 11)] == [3, 10, 10]


def test_missing_shape_field_names_it(fake_tunable):
    with pytest.raises(TypeError, match="needs dtype"):
        fake_tunable.lookup(tokens=4, n=256)


def test_lookup_order_in_process_cache_shipped_default(fake_tunable, cache_dir, on_gpu):
    on_gpu("NVIDIA H200")
    q = {"tokens": 16, "n": 256, "dtype": "float16"}
    assert fake_tunable.resolve(**q)[1] == "default"
    _ship("fake", "fake_op", "NVIDIA H200", "9.0", _entry(16, 512))
    autotune.invalidate()
    assert fake_tunable.resolve(**q) == ({"BLOCK": 512, "num_warps": 4}, "shipped NVIDIA H200")
    _write_cache(fake_tunable, cache_dir, _entry(16, 256))
    assert fake_tunable.resolve(**q)[0]["BLOCK"] == 256
    fake_tunable.install(dict([_entry(16, 128)]))
    assert fake_tunable.resolve(**q) == ({"BLOCK": 128, "num_warps": 4}, "in-process")


def test_nearest_bucket_used_and_logged_once(fake_tunable, cache_dir, caplog):
    _write_cache(fake_tunable, cache_dir, _entry(16, 32), _entry(1024, 256))
    with caplog.at_level(logging.WARNING, logger="pykernels"):
        assert fake_tunable.lookup(tokens=50, n=256, dtype="float16")["BLOCK"] == 32
        assert fake_tunable.lookup(tokens=60, n=256, dtype="float16")["BLOCK"] == 32
        config, source = fake_tunable.resolve(tokens=50, n=256, dtype="float16")
        assert "nearest bucket 16" in source
        assert fake_tunable.lookup(tokens=300, n=256, dtype="float16")["BLOCK"] == 256
        # bucket 128 is 3 octaves from both: ties go to the larger bucket
        assert fake_tunable.lookup(tokens=128, n=256, dtype="float16")["BLOCK"] == 256
        assert fake_tunable.lookup(tokens=16, n=256, dtype="float16")["BLOCK"] == 32  # exact
    logged = _warnings(caplog, "nearest bucket")
    assert len(logged) == 3  # once per missing bucket (64, 512, 128), not once per call
    # Another exact field (n) never borrows: no entry for n=512 anywhere -> default.
    assert fake_tunable.resolve(tokens=16, n=512, dtype="float16")[1] == "default"


def test_exact_bucket_in_a_later_layer_beats_nearest_in_an_earlier(fake_tunable, cache_dir,
                                                                   on_gpu):
    on_gpu("NVIDIA H200")
    _write_cache(fake_tunable, cache_dir, _entry(16, 32))
    _ship("fake", "fake_op", "NVIDIA H200", "9.0", _entry(4096, 512))
    autotune.invalidate()
    assert fake_tunable.resolve(tokens=4096, n=256, dtype="float16")[0]["BLOCK"] == 512


def test_nearest_gpu_same_capability_logged_once(fake_tunable, on_gpu, caplog):
    _ship("fake", "fake_op", "NVIDIA H100 80GB HBM3", "9.0", _entry(16, 128))
    _ship("fake", "fake_op", "NVIDIA A100-SXM4-80GB", "8.0", _entry(16, 999))
    on_gpu("NVIDIA H200")
    with caplog.at_level(logging.WARNING, logger="pykernels"):
        for tokens in (16, 16, 9):
            fake_tunable.invalidate()
            config, source = fake_tunable.resolve(tokens=tokens, n=256, dtype="float16")
            assert config["BLOCK"] == 128 and "H100" in source and "nearest GPU" in source
    assert len(_warnings(caplog, "configs of fake_op for this GPU")) == 1
    on_gpu("NVIDIA A10", cc="8.6")  # another architecture: nothing shipped applies
    assert fake_tunable.resolve(tokens=16, n=256, dtype="float16")[1] == "default"
    on_gpu("NVIDIA H100 80GB HBM3")  # its own file first
    _ship("fake", "fake_op", "NVIDIA H200", "9.0", _entry(16, 64))
    autotune.invalidate()
    assert fake_tunable.resolve(tokens=16, n=256, dtype="float16")[1] == \
        "shipped NVIDIA H100 80GB HBM3"


def test_nearest_gpu_prefers_same_model(on_gpu, fake_tunable):
    _ship("fake", "fake_op", "NVIDIA H200", "9.0", _entry(16, 64))
    _ship("fake", "fake_op", "NVIDIA H100 80GB HBM3", "9.0", _entry(16, 128))
    on_gpu("NVIDIA H100 PCIe")
    assert fake_tunable.resolve(tokens=16, n=256, dtype="float16")[0]["BLOCK"] == 128


def test_cpu_never_uses_shipped_gpu_configs(fake_tunable, on_gpu):
    _ship("fake", "fake_op", "NVIDIA H200", "9.0", _entry(16, 64))
    on_gpu("cpu", cc=None)
    assert fake_tunable.resolve(tokens=16, n=256, dtype="float16")[1] == "default"


def test_stored_config_read_through_default_keys(fake_tunable, cache_dir, caplog):
    key, e = _entry(16, 32)
    del e["config"]["num_warps"]
    e["config"]["GONE"] = 1
    _write_cache(fake_tunable, cache_dir, (key, e))
    with caplog.at_level(logging.WARNING, logger="pykernels"):
        config = fake_tunable.lookup(tokens=16, n=256, dtype="float16")
    assert config == {"BLOCK": 32, "num_warps": 4}
    assert _warnings(caplog, "unknown to its default")


def test_lookup_is_memoized_and_returns_copies(fake_tunable, cache_dir, monkeypatch):
    _write_cache(fake_tunable, cache_dir, _entry(16, 32))
    calls = []
    real = fake_tunable.resolve
    monkeypatch.setattr(fake_tunable, "resolve", lambda **s: calls.append(s) or real(**s))
    for m in (9, 12, 16):
        cfg = fake_tunable.lookup(tokens=m, n=256, dtype="float16")
        cfg["BLOCK"] = -1  # the caller's copy: the memo is unaffected
    assert len(calls) == 1
    assert fake_tunable.lookup(tokens=16, n=256, dtype="float16")["BLOCK"] == 32


# ---- MMA prefetch (GEMM-like tunables) -----------------------------------------------------

@pytest.fixture
def gemm_tunable():
    return autotune.Tunable(
        "fake_gemm", family="fake", key=("N", "K"), bucket="M", gemm_like=True,
        default=lambda **_: {"BLOCK_M": 16, "num_stages": 2, "prefetch": True})


def test_prefetch_env_overrides_cached_config(gemm_tunable, cache_dir, monkeypatch):
    store.atomic_write(cache_dir / "fake_gemm.json", store.document(
        gemm_tunable.metadata(), {"N=64,K=64,M=16": {"shape": {"N": 64, "K": 64, "M": 16},
                                  "config": {"BLOCK_M": 64, "num_stages": 4, "prefetch": True}}},
        gemm_tunable.info()))
    q = {"M": 16, "N": 64, "K": 64}
    assert gemm_tunable.lookup(**q) == {"BLOCK_M": 64, "num_stages": 4, "prefetch": True}
    monkeypatch.setenv("TRITON_DISABLE_MACA_OPT_MMA_PREFETCH", "1")
    autotune.invalidate()
    assert gemm_tunable.lookup(**q) == {"BLOCK_M": 64, "num_stages": 1, "prefetch": False}
    assert gemm_tunable.lookup(M=1, N=8, K=8) == {"BLOCK_M": 16, "num_stages": 1,
                                                  "prefetch": False}  # the default too


def test_prefetch_is_a_search_dimension(gemm_tunable, monkeypatch):
    space = autotune.Space({"BLOCK_M": [16, 32], "num_stages": [1, 3]})
    configs = space.configs({}, gemm_like=True)
    assert {(c["prefetch"], c["num_stages"]) for c in configs} == {(True, 3), (False, 1)}
    assert len(configs) == 4
    assert all(not c["prefetch"] and c["num_stages"] == 1
               for c in space.configs({}, gemm_like=True, prefetch_off=True))
    with pytest.raises(ValueError, match="num_stages"):
        autotune.Space({"BLOCK_M": [16]}).configs({}, gemm_like=True)


def test_tuning_records_prefetch_and_retunes_after_forced_off(gemm_tunable, monkeypatch):
    space = autotune.Space({"BLOCK": [32, 64], "num_stages": [1, 3]})
    gemm = autotune.Tunable("fake_gemm2", family="fake", key=("n", "dtype"), gemm_like=True,
                            default=lambda **_: {"BLOCK": 64, "num_stages": 2, "prefetch": True})
    bench = FakeBench(times=lambda c: 5.0 if c["prefetch"] else 8.0)
    monkeypatch.setenv("TRITON_DISABLE_MACA_OPT_MMA_PREFETCH", "1")
    r = tune(gemm, space, shapes(4), bench.make_case, timer=bench.timer).results[0]
    assert all(not c["prefetch"] and c["num_stages"] == 1 for c in bench.timed)
    assert r.entry["prefetch_forced_off"] is True and r.entry["config"]["prefetch"] is False
    monkeypatch.delenv("TRITON_DISABLE_MACA_OPT_MMA_PREFETCH")
    autotune.invalidate()
    r = tune(gemm, space, shapes(4), bench.make_case, timer=bench.timer).results[0]
    assert r.status == "tuned"  # not reused: prefetch on was never searched
    assert r.entry["config"]["prefetch"] is True and r.entry["prefetch_forced_off"] is False
