"""The FP8 GEMM tuning driver (autotune.gemm): its search spaces per bucket (and what they cost
a cold tune), the cases (reference check, input sets, the backend choice) through stand-in kernel
modules, and the CLI (flags, op order, dry run). Real tunes are gpu-marked."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from autotune import gemm as ag
from autotune.space import canonical
from autotune.tuner import plan
from bench import shapes
from pykernels.quant import ref, tunables
from tests.autotune.autotune_helpers import isolated_cache

DEFAULT_SHAPES = [{"n": n, "k": k, "dtype": "bfloat16", "group_size": -1, "m": m}
                  for n, k in shapes.GEMM_NK for m in ag.M_GRID]
USABLE = ag.usable_backends  # the cached function (tests swap the attribute for stand-ins)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """Own cache folder, no shipped configs, the H200's SM count, fresh weight holder."""
    with isolated_cache(tmp_path, monkeypatch) as folder:
        monkeypatch.setattr(ag, "sms", lambda: ag.SMS_DEFAULT)
        ag._WEIGHTS.clear()
        USABLE.cache_clear()
        yield folder
        ag._WEIGHTS.clear()
        USABLE.cache_clear()


def _plans(op: str, shapes_=None, kind: str = "dry"):
    o = ag.build_family(kind).ops[op]
    return plan(o.tunable, o.space, shapes_ or DEFAULT_SHAPES)


def _shape(m=1, n=4096, k=4096, group_size=-1, dtype="bfloat16"):
    return {"n": n, "k": k, "dtype": dtype, "group_size": group_size, "m": m}


# ---- search spaces -----------------------------------------------------------------------------


def test_block_m_choices():
    assert [ag.cuda_block_ms(m) for m in (1, 8, 16, 64, 256, 4096)] == [
        (8, 16), (8, 16), (16, 32), (32, 64), (32, 64), (32, 64)]
    assert [ag.triton_block_ms(m) for m in (1, 16, 32, 64, 128, 256, 1024, 4096)] == [
        (16,), (16,), (32,), (64,), (64, 128), (128, 256), (128, 256), (128, 256)]


def test_cuda_space_per_bucket():
    for p in _plans("fp8_gemm_cuda"):
        m, n, k = p.shape["m"], p.shape["n"], p.shape["k"]
        assert p.candidates[0] == tunables.cuda_default(m)  # the default always competes
        assert {c["wgmma"] for c in p.candidates[1:]} == {False, True}, p.key
        assert 40 <= len(p.candidates) <= 120, (p.key, len(p.candidates))
        stages = ag.CUDA_DECODE_STAGES if m <= ag.DECODE_M else ag.CUDA_LARGE_STAGES
        for c in p.candidates[1:]:
            assert c["block_m"] in ag.cuda_block_ms(m) and c["block_n"] in (64, 128)
            assert (c["num_stages"] == 1) == (not c["prefetch"])
            assert c["num_stages"] in stages
            assert c["splits"] in ag.CUDA_SPLITS and c["splits"] <= k // 128
            if c["splits"] == 0:
                assert c["num_stages"] in (1, 4)
            if c["splits"] > 1:
                tiles = n // c["block_n"] * math.ceil(m / c["block_m"])
                slots = ag.CUDA_SLOTS_PER_SM * ag.SMS_DEFAULT
                assert slots / 4 < tiles * c["splits"] <= slots
                assert k // 128 // c["splits"] >= max(2, c["num_stages"])
        assert {c["num_stages"] for c in p.candidates[1:]} == set(stages)
        assert {c["block_n"] for c in p.candidates} == {64, 128}
    # 28672 x 4096 at m = 1 already has 448 64-wide tiles: a split only with 128-wide ones.
    wide = _plans("fp8_gemm_cuda", [_shape(1, 28672, 4096)])[0]
    assert {c["splits"] for c in wide.candidates if c["block_n"] == 64} == {0, 1}
    assert {c["splits"] for c in wide.candidates} == {0, 1, 2}
    # N = 192: 128-wide CTAs would run the 64-wide kernel anyway.
    odd = _plans("fp8_gemm_cuda", [_shape(16, 192, 4096)])[0]
    assert {c["block_n"] for c in odd.candidates[1:]} == {64}


def test_triton_space_per_bucket():
    for p in _plans("fp8_gemm_triton"):
        m, n, k = p.shape["m"], p.shape["n"], p.shape["k"]
        assert p.candidates[0] == tunables.triton_default(m)
        assert {c["TMA"] for c in p.candidates} == ({False} if m <= ag.DECODE_M else {True, False})
        assert 8 <= len(p.candidates) <= 80, (p.key, len(p.candidates))  # x TMA on / off
        for c in p.candidates[1:]:
            bn, bm, bk, st = c["BLOCK_N"], c["BLOCK_M"], c["BLOCK_K"], c["num_stages"]
            assert bm in ag.triton_block_ms(m) and bn in (64, 128) and bk in (64, 128)
            assert (st == 1) == (not c["prefetch"])
            assert st * (bn * bk + 2 * bm * bk) <= ag.SMEM_LIMIT
            if m <= ag.DECODE_M:
                assert c["num_warps"] == 4 and bk == 128
            else:
                assert c["SPLIT_K"] == 1
                assert bn * bm <= 16384 if c["num_warps"] == 4 else bn * bm >= 8192
            if c["SPLIT_K"] > 1:
                programs = math.ceil(n / bn) * math.ceil(m / bm)
                assert programs * c["SPLIT_K"] <= 2 * ag.SMS_DEFAULT
                assert math.ceil(k / bk) // c["SPLIT_K"] >= max(4, st)
    wide = _plans("fp8_gemm_triton", [_shape(1, 28672, 4096)])[0]
    assert {c["SPLIT_K"] for c in wide.candidates[1:]} == {1}  # [0]: the default, split 0 (auto)


def test_cold_tune_of_the_default_grid_stays_small():
    # The module docstring's budget: ~5 min on one H200 for these counts.
    plans = {op: _plans(op) for op in ag.TUNABLES}
    est = ag.estimate(plans)
    assert est["buckets"] == 3 * 24
    assert est["candidates"]["fp8_gemm_cuda"] <= 1800  # x wgmma on / off
    assert est["candidates"]["fp8_gemm_triton"] <= 1200
    assert est["candidates"]["fp8_gemm_backend"] == 3 * 24  # auto, cuda, triton
    assert 120 <= est["triton_compiles"] <= 170
    # Group scales and a second dtype double the buckets, not the space per bucket.
    grouped = [{**s, "group_size": 128} for s in DEFAULT_SHAPES]
    assert ag.estimate({"fp8_gemm_triton": _plans("fp8_gemm_triton", grouped)})[
        "candidates"]["fp8_gemm_triton"] == est["candidates"]["fp8_gemm_triton"]


def test_triton_compile_key():
    cfg = tunables.triton_default(1)
    one, sixteen = _shape(1), _shape(16)
    assert ag.triton_compile_key(cfg, one) != ag.triton_compile_key(cfg, sixteen)  # M == 1
    split = {**cfg, "SPLIT_K": 2}
    assert ag.triton_compile_key(split, sixteen) != ag.triton_compile_key(cfg, sixteen)
    # 32 K tiles: 2 splits of 16 and 4 of 8 specialize differently, 4 and 8 splits alike.
    keys = {s: ag.triton_compile_key({**cfg, "SPLIT_K": s}, sixteen) for s in (2, 4, 8)}
    assert keys[2] != keys[4] == keys[8]


def test_prefetch_disabled_space(monkeypatch):
    monkeypatch.setenv("TRITON_DISABLE_MACA_OPT_MMA_PREFETCH", "1")
    for op in ("fp8_gemm_cuda", "fp8_gemm_triton"):
        for p in _plans(op, [_shape(1), _shape(256)]):
            assert len(p.candidates) >= 3
            assert all(c["num_stages"] == 1 and not c["prefetch"] for c in p.candidates)


def test_backend_space(monkeypatch):
    p = _plans("fp8_gemm_backend", [_shape(16)], kind="dry")[0]
    assert p.candidates == [{"backend": "auto"}, {"backend": "cuda"}, {"backend": "triton"}]
    monkeypatch.setattr(ag, "usable_backends", lambda cpu=False: ("triton",))
    p = _plans("fp8_gemm_backend", [_shape(16)], kind="full")[0]
    assert p.candidates == [{"backend": "auto"}, {"backend": "triton"}]
    assert ag.fixed_backend() == "triton"
    monkeypatch.setattr(ag, "usable_backends", lambda cpu=False: ())
    with pytest.raises(RuntimeError, match="neither the cuda nor the triton backend"):
        ag.fixed_backend()


def test_usable_backends(monkeypatch):
    monkeypatch.setattr(ag, "backend_reasons", lambda: {"cuda": "no GPU", "triton": None,
                                                        "torch": None})
    assert ag.usable_backends() == ("triton",)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ag.usable_backends(cpu=True) == ("triton",)
    USABLE.cache_clear()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert ag.usable_backends(cpu=True) == ()


# ---- cases through stand-in kernel modules -----------------------------------------------------


def _fake_module(scale: float = 1.0, calls: list | None = None):
    """A backend module with the cuda/triton gemm signature, computing with the reference
    (times `scale`: anything but 1 is a wrong kernel)."""

    def gemm(x2d, qweight, scales, out, *, stages=None, deterministic=False, config=None):
        if calls is not None:
            calls.append(config)
        ref.gemm(x2d, qweight, scales, out)
        out.mul_(scale)

    return SimpleNamespace(gemm=gemm)


@pytest.mark.parametrize("group_size", [-1, 128])
def test_kernel_case_checks_then_runs_with_the_config(monkeypatch, group_size):
    calls = []
    monkeypatch.setattr(ag, "kernel_module", lambda backend: _fake_module(calls=calls))
    shape = _shape(3, 128, 192, group_size)
    case = ag.kernel_case("cuda")(shape, "cpu")
    assert case.n_inputs == 1  # the CPU: one input set
    cfg = tunables.cuda_default(3)
    case.check(cfg)
    case.run(cfg, 0)
    assert calls == [cfg, cfg]
    w = ag._WEIGHTS["sets"][0]
    assert w.qweight.shape == (2, 128, 128) and w.scales.dim() == (1 if group_size == -1 else 2)


def test_kernel_case_rejects_a_wrong_kernel(monkeypatch):
    monkeypatch.setattr(ag, "kernel_module", lambda backend: _fake_module(scale=1.5))
    case = ag.kernel_case("triton")(_shape(2, 64, 128), "cpu")
    with pytest.raises(AssertionError, match="fp8_gemm_triton output differs from the reference"):
        case.check(tunables.triton_default(2))


def test_kernel_case_poisons_the_output(monkeypatch):
    state = {"lazy": False}
    good = _fake_module()

    def gemm(*args, **kw):
        if not state["lazy"]:  # a later candidate that writes nothing must not pass on the
            good.gemm(*args, **kw)  # previous one's output left in the buffer

    monkeypatch.setattr(ag, "kernel_module", lambda backend: SimpleNamespace(gemm=gemm))
    case = ag.kernel_case("cuda")(_shape(2, 64, 128), "cpu")
    cfg = tunables.cuda_default(2)
    case.check(cfg)
    state["lazy"] = True
    with pytest.raises(AssertionError, match="differs from the reference"):
        case.check(cfg)


def test_backend_case_runs_the_public_op(monkeypatch):
    import pykernels.quant.gemm as public

    seen = []

    def fake_public(x, qweight, scales, *, out=None, backend="auto", **kw):
        seen.append(backend)
        ref.gemm(x, qweight, scales, out)
        return out

    monkeypatch.setattr(public, "fp8_marlin_gemm", fake_public)
    monkeypatch.setattr(ag, "usable_backends", lambda cpu=False: ("cuda", "triton"))
    case = ag.backend_case(_shape(4, 64, 128, dtype="float16"), "cpu")
    for cfg in ({"backend": "auto"}, {"backend": "triton"}):
        case.check(cfg)
    assert seen == ["cuda", "triton"]  # auto = the fixed order's first usable backend


def test_packed_weights_are_reused_per_shape():
    a = ag.packed_weights(64, 128, -1, 2, "cpu")
    b = ag.packed_weights(64, 128, -1, 3, "cpu")
    assert len(b) == 3 and b[0] is a[0] and b[1] is a[1]  # grown, not rebuilt
    assert not torch.equal(b[0].qweight.view(torch.uint8), b[1].qweight.view(torch.uint8))
    c = ag.packed_weights(128, 128, -1, 1, "cpu")
    assert c[0].qweight.shape == (1, 128, 128) and len(ag._WEIGHTS["sets"]) == 1


# ---- the CLI -----------------------------------------------------------------------------------


def test_parser_and_jobs():
    args = ag.parser().parse_args(["--op", "backend", "--op", "cuda", "--shape", "6144x4096",
                                   "--model", "llama-3-8b", "--m", "1,2", "--group-size", "128",
                                   "--dtype", "bfloat16,float16"])
    assert args.op == ["backend", "cuda"] and args.m == [1, 2] and args.group_size == 128
    assert ag.weight_shapes(args) == [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
    job = ag.jobs(args)
    assert len(job) == 4 * 2 * 2
    assert job[0] == {"n": 6144, "k": 4096, "dtype": "bfloat16", "group_size": 128, "m": 1}
    defaults = ag.parser().parse_args([])
    assert ag.weight_shapes(defaults) == shapes.GEMM_NK
    assert {j["m"] for j in ag.jobs(defaults)} == set(ag.M_GRID) == {1, 16, 64, 256, 1024, 4096}
    for bad in (["--group-size", "64"], ["--op", "fi"], ["--shape", "100x64"], ["--m", "0"]):
        with pytest.raises(SystemExit):
            ag.parser().parse_args(bad)
    with pytest.raises(SystemExit, match="bfloat16 or float16"):
        ag.jobs(ag.parser().parse_args(["--dtype", "float32"]))


def test_selected_ops_order_and_skips(monkeypatch, capsys):
    monkeypatch.setattr(ag, "usable_backends", lambda cpu=False: ("triton",))
    monkeypatch.setattr(ag, "backend_reasons", lambda: {"cuda": "no GPU here", "triton": None})
    args = ag.parser().parse_args(["--op", "backend", "--op", "cuda", "--op", "triton"])
    assert ag.selected_ops(args) == ["fp8_gemm_triton", "fp8_gemm_backend"]
    assert "fp8_gemm_cuda skipped: no GPU here" in capsys.readouterr().out
    args = ag.parser().parse_args(["--dry-run"])
    assert ag.selected_ops(args) == ["fp8_gemm_cuda", "fp8_gemm_triton", "fp8_gemm_backend"]


def test_dry_run(capsys, cache_dir):
    assert ag.main(["--dry-run", "--shape", "4096x4096", "--m", "1,3"]) == 0
    out = capsys.readouterr().out
    for name in ag.TUNABLES:
        assert f"{name} " in out or f"{name}\t" in out
    assert "n=4096,k=4096,dtype=bfloat16,group_size=-1,m=4 " in out  # 3 -> bucket 4
    assert "in 6 buckets" in out and "distinct Triton compiles" in out
    assert not cache_dir.exists()


def test_no_gpu_and_cpu_without_interpreter(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(ag, "usable_backends", lambda cpu=False: ("triton",))
    assert ag.main(["--op", "triton"]) == 0
    assert "no CUDA GPU here, nothing tuned" in capsys.readouterr().out
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert ag.main(["--cpu"]) == 2
    assert "needs the Triton interpreter" in capsys.readouterr().err


# ---- real tunes on the GPU ---------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_tune_small_grid(tmp_path, capsys):
    report = tmp_path / "report.json"
    status = ag.main(["--shape", "4096x4096", "--m", "1,64", "--no-progress",
                      "--report", str(report)])
    assert status == 0, capsys.readouterr().out
    body = json.loads(report.read_text())
    names = [rep["name"] for rep in body["reports"]]
    assert names == ["fp8_gemm_cuda", "fp8_gemm_triton", "fp8_gemm_backend"]
    for rep in body["reports"]:
        for r in rep["results"]:
            assert r["status"] == "tuned", r
            wrong = [d for d in r["entry"]["discarded"] if "differs from the reference" in
                     d["reason"]]
            assert not wrong, wrong  # a config may fail to launch, never compute wrongly
    # The launchers now use what was tuned in this process.
    for tunable in ag.TUNABLES.values():
        cfg, source = tunable.resolve(m=64, n=4096, k=4096, dtype=torch.bfloat16,
                                      group_size=-1)
        assert source == "in-process"
        assert canonical(cfg) in {canonical(r["entry"]["config"]) for rep in body["reports"]
                                  for r in rep["results"]} | {canonical({"backend": "auto"})}


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["fp8_gemm_cuda", "fp8_gemm_triton"])
def test_gpu_every_candidate_of_a_decode_bucket_is_correct(op):
    shape = ag.TUNABLES[op].shape_of(**_shape(16, 8192, 8192))
    p = _plans(op, [shape], kind="full")[0]
    case = ag.MAKERS[op](p.shape, "cuda")
    for cfg in p.candidates:
        case.check(cfg)  # raises on a wrong result
