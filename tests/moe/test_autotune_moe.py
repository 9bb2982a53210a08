"""The fused-MoE tuning driver (autotune.moe): its search space per bucket, the CLI (dry run,
--quant, the default M grid), and a tiny interpreter tune whose configs the launcher then uses."""

from __future__ import annotations

import json

import pytest
import torch

import autotune
from autotune import moe
from autotune.space import canonical
from autotune.tuner import plan
from bench import shapes
from pykernels.moe import fused_moe, ref
from pykernels.moe import fused_moe_triton as kern
from tests.autotune.autotune_helpers import isolated_cache

TINY = ["--shape", "E=4,H=64,I=32,topk=2", "--batch-sizes", "1,4", "--dtype", "float16"]
TINY_SHAPE = {"E": 4, "H": 64, "I": 32, "topk": 2, "quant": "none", "dtype": "float16"}
PRESETS = ["mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v3"]


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """Own cache folder, no shipped configs, powers-of-two buckets before and after."""
    with isolated_cache(tmp_path, monkeypatch) as folder:
        yield folder
        moe._QUANT["value"] = "none"


def _plans(op: str, model: str, quant: str = "none"):
    o = moe.FAMILY.ops[op]
    base = {**o.model_shapes(shapes.get(model))[0], "dtype": "bfloat16", "quant": quant}
    return plan(o.tunable, o.space, [{**base, "tokens": m} for m in moe.MOE_M])


def _smem(c: dict, bm: int, tiles: int, elt: int) -> int:
    return c["num_stages"] * (bm * c["BLOCK_SIZE_K"] + tiles * c["BLOCK_SIZE_N"] *
                              c["BLOCK_SIZE_K"]) * elt


@pytest.mark.parametrize("model", PRESETS)
@pytest.mark.parametrize("quant", ["none", "fp8_w8a8"])
def test_space_per_bucket(model, quant):
    up_plans, down_plans = _plans("fused_moe", model, quant), _plans("fused_moe_down", model,
                                                                      quant)
    elt = 2 if quant == "none" else 1
    distinct = set()
    for p in up_plans:
        slots = moe.per_expert(p.shape)
        lo, hi = moe.block_m_range(slots)
        assert 10 <= len(p.candidates) <= 75, (p.key, len(p.candidates))
        for c in p.candidates[1:]:  # [0] is the default, which always competes
            assert lo <= c["BLOCK_SIZE_M"] <= hi
            assert _smem(c, c["BLOCK_SIZE_M"], 2, elt) <= moe.SMEM_LIMIT
            assert 2 * c["BLOCK_SIZE_M"] * c["BLOCK_SIZE_N"] <= 128 * 32 * c["num_warps"]
            assert (c["num_stages"] == 1) == (not c["prefetch"])
            if slots <= 1:  # decode: one thin block per expert
                assert c["BLOCK_SIZE_M"] == 16 and c["GROUP_SIZE_M"] == 1
            if c["TMA"]:  # pipelined, past decode
                assert c["num_stages"] > 1 and (c["BLOCK_SIZE_M"] > 16 or slots > 16)
        distinct |= {canonical(c) for c in p.candidates}
    for p in down_plans:
        assert 10 <= len(p.candidates) <= 75, (p.key, len(p.candidates))
        assert all("BLOCK_SIZE_M" not in c for c in p.candidates)
        distinct |= {canonical(c) for c in p.candidates}
    # Compiles per model (what keeps a cold tune at a few minutes): TMA on/off past decode took
    # it from ~150-175 to ~200-270.
    assert len(distinct) <= 300


def test_block_m_range_and_default_candidate():
    assert moe.block_m_range(0.25) == (16, 16)
    assert moe.block_m_range(16) == (16, 32)
    assert moe.block_m_range(64) == (32, 128)
    assert moe.block_m_range(1024) == (64, 128)
    p = _plans("fused_moe", "mixtral-8x7b")[0]
    assert p.candidates[0] == p.default == kern.default_config(1, 8, 2)


def test_prefetch_disabled_space(monkeypatch):
    monkeypatch.setenv("TRITON_DISABLE_MACA_OPT_MMA_PREFETCH", "1")
    for op in ("fused_moe", "fused_moe_down"):
        for p in _plans(op, "qwen3-30b-a3b"):
            assert len(p.candidates) >= 3
            assert all(c["num_stages"] == 1 and not c["prefetch"] for c in p.candidates)


def test_model_shapes_skip_dense_models():
    assert moe._model_shapes(shapes.get("llama-3-8b")) == []
    assert moe._model_shapes(shapes.get("mixtral")) == [
        {"E": 8, "H": 4096, "I": 14336, "topk": 2, "quant": "none"}]


def test_dry_run_default_grid_and_quant(capsys, cache_dir):
    assert moe.main(["--dry-run", "--model", "mixtral"]) == 0
    out = capsys.readouterr().out
    assert "fused_moe " in out and "fused_moe_down" in out
    for m in moe.MOE_M:
        assert f"E=8,H=4096,I=14336,topk=2,dtype=bfloat16,quant=none,tokens={m}\n" in out \
            or f"tokens={m} " in out
    assert "tokens=16384" not in out
    assert moe.main(["--dry-run", "--quant", "fp8_w8a8", *TINY]) == 0
    out = capsys.readouterr().out
    assert "E=4,H=64,I=32,topk=2,dtype=float16,quant=fp8_w8a8,tokens=4" in out
    assert not cache_dir.exists()


def test_help_mentions_quant(capsys):
    with pytest.raises(SystemExit) as info:
        moe.main(["--help"])
    assert info.value.code == 0
    assert "--quant" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter smoke run")
def test_cpu_tune_then_warm_rerun_then_launch(capsys, cache_dir, tmp_path):
    report = tmp_path / "report.json"
    args = ["--cpu", "--no-progress", "--report", str(report), *TINY]
    assert moe.main(args) == 0
    body = json.loads(report.read_text())
    statuses = [(rep["name"], r["status"]) for rep in body["reports"] for r in rep["results"]]
    assert statuses == [("fused_moe_triton", "tuned")] * 2 + \
        [("fused_moe_triton_down", "tuned")] * 2
    assert (cache_dir / "fused_moe_triton.json").exists()
    assert (cache_dir / "fused_moe_triton_down.json").exists()
    assert moe.main(args) == 0
    body = json.loads(report.read_text())
    assert {r["status"] for rep in body["reports"] for r in rep["results"]} == {"cached"}
    # Launches now use the tuned entries (buckets 1 and 4): this process's, then the cache's.
    autotune.set_batch_sizes(None)
    shape = {**TINY_SHAPE, "dtype": torch.float16}
    for tunable in (kern.FUSED_MOE_UP, kern.FUSED_MOE_DOWN):
        assert tunable.resolve(tokens=4, **shape)[1] == "in-process"
    autotune.reset()  # a fresh process: the user cache
    for tunable in (kern.FUSED_MOE_UP, kern.FUSED_MOE_DOWN):
        assert tunable.resolve(tokens=4, **shape)[1].startswith("cache")
    w1, w2 = torch.randn(4, 64, 64).half() / 8, torch.randn(4, 64, 32).half() / 6
    tw, ti = ref.fused_topk(torch.randn(4, 4), 2, True)
    x = torch.randn(4, 64).half()
    got = fused_moe(x, w1, w2, tw, ti, backend="triton")
    torch.testing.assert_close(got.float(), ref.fused_moe(x, w1, w2, tw, ti, act_dtype=x.dtype),
                               atol=3e-3, rtol=3e-3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter run")
@pytest.mark.parametrize("make_case", [moe.up_case, moe.down_case])
def test_case_check_rejects_wrong_output(make_case):
    shape = {**TINY_SHAPE, "tokens": 4}
    case = make_case(shape, "cpu")
    default = (kern.FUSED_MOE_UP if make_case is moe.up_case else
               kern.FUSED_MOE_DOWN).default_for(**shape)
    case.check(default)
    case.run(default, 0)
    w1, w2, _, _ = moe._weights(4, 64, 32, "float16", "none", "cpu")
    w2.mul_(1.5)  # the reference was computed before: every candidate now fails its check
    with pytest.raises(AssertionError, match="differs from the reference"):
        case.check(default)
    moe._weights.cache_clear()


def test_up_candidates_get_a_down_tile_that_fits_their_block():
    # The down entry tuned at a 64-row block (H200, Mixtral 1024 tokens): 64 x 256 on 4 warps is
    # 128 accumulators a thread; behind a 128-row up tile it would hold 256 and spill.
    shape = {"E": 8, "H": 4096, "I": 14336, "topk": 2, "dtype": "bfloat16", "quant": "none",
             "tokens": 1024}
    tuned = {"BLOCK_SIZE_N": 256, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 16, "num_warps": 4,
             "num_stages": 4, "TMA": True, "prefetch": True}
    assert moe.down_for_block(tuned, 64, shape) is tuned
    fallback = moe.down_for_block(tuned, 128, shape)
    assert fallback == kern.default_config(1024, 8, 2, "none", down=True)
    assert fallback["BLOCK_SIZE_N"] * 128 // (32 * fallback["num_warps"]) <= 128
    # 8 warps carry the 128-row block; 4 stages of 48 KB stay under the shared-memory cap.
    eight = {**tuned, "num_warps": 8}
    assert moe.down_for_block(eight, 128, shape) is eight
    assert moe.down_for_block({**eight, "num_stages": 5}, 128, shape) != {**eight, "num_stages": 5}


def test_tuning_routing_is_seeded_and_not_the_bench_draw():
    """Every tune times the same routing per input set (a draw decides how many experts a
    decode bucket touches, so unseeded tunes timed different work), and not the draw bench.moe
    times."""
    from bench import moe as bench_moe

    shape = {**TINY_SHAPE, "tokens": 16}
    a, b = moe._Layer(shape, "cpu"), moe._Layer(shape, "cpu")
    assert a.n == b.n >= 1
    for (_, wa, ia), (_, wb, ib) in zip(a.sets, b.sets):
        assert torch.equal(ia, ib) and torch.equal(wa, wb)
    assert moe.TUNE_SETS >= 64  # past the sets bench.timing.rotation_count lets the bench use
    assert not torch.equal(a.sets[0][2], bench_moe.routing_logits(16, 4, 0).topk(2).indices.int())
