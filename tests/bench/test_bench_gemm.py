"""bench.gemm on the CPU: the floor against ANCHORS.md's "fp8-weight floor" column, the shape grid
and CLI flags, the results rows (per-provider bandwidth), the notes and the short table, and the
--cpu CLI through stand-in quant ops (same signatures as pykernels.quant, so it runs before and
without the real kernels)."""

from __future__ import annotations

import argparse
import json
from typing import NamedTuple

import pandas as pd
import pytest
import torch

from bench import cli, results, shapes
from bench import gemm as bg
from bench.ceilings import Ceilings
from bench.timing import Timing
from tests.bench.bench_fakes import CEIL, H200, fake_env

# ../shared/ANCHORS.md, "GEMM at small M": fp8-weight floor in us at M = 1, 16, 64, 256, 1024
# (measured copy bandwidth 4.27 TB/s, bytes = fp8 weight + x + y), printed to 0.1 us.
ANCHOR_FLOOR = {
    (4096, 4096): (3.9, 4.0, 4.2, 4.9, 7.9),
    (8192, 8192): (15.7, 15.8, 16.2, 17.7, 23.6),
    (28672, 4096): (27.5, 27.8, 28.5, 31.4, 43.2),
    (4096, 14336): (13.8, 13.9, 14.3, 16.0, 22.6),
}
BF16 = torch.bfloat16


# ---- stand-ins for pykernels.quant (the packed format of docs/quant.md, computed in torch) -----


class Fp8Weight(NamedTuple):
    qweight: torch.Tensor
    scales: torch.Tensor
    k: int
    group_size: int


CALLS: list[dict] = []


def fp8_weight_pack(w, group_size=-1):
    n, k = w.shape
    kt = -(-k // 128)
    panels = torch.zeros(n, kt * 128, dtype=torch.float32, device=w.device)
    panels[:, :k] = w.float()
    panels = panels.view(n, kt, 128)
    amax = panels.abs().amax(-1) if group_size == 128 else panels.abs().amax((1, 2))[:, None]
    scales = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
    q = (panels / scales[..., None]).to(torch.float8_e4m3fn).permute(1, 0, 2).contiguous()
    return Fp8Weight(q, scales.t().contiguous() if group_size == 128 else scales[:, 0], k,
                     group_size)


def fp8_weight_unpack(packed, dtype):
    q = packed.qweight.float().permute(1, 0, 2)  # [N, KT, 128]
    s = packed.scales.t()[..., None] if packed.scales.dim() == 2 else packed.scales[:, None, None]
    return (q * s).reshape(q.shape[0], -1)[:, :packed.k].to(dtype)


def fp8_marlin_gemm(x, qweight, scales, *, out=None, backend="auto", deterministic=False,
                    stages=None):
    CALLS.append({"backend": backend, "stages": stages})
    k = x.shape[-1]
    w = fp8_weight_unpack(Fp8Weight(qweight, scales, k, 128 if scales.dim() == 2 else -1),
                          torch.float32)
    y = (x.float() @ w.T).to(x.dtype)
    return y if out is None else out.copy_(y)


API = bg.SimpleNamespace(gemm=fp8_marlin_gemm, pack=fp8_weight_pack, unpack=fp8_weight_unpack)


@pytest.fixture
def fake_quant(monkeypatch):
    monkeypatch.setattr(bg, "_api", lambda: API)
    monkeypatch.setattr(cli, "module_or_reason", lambda module: bg.SimpleNamespace())
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the triton provider joins the --cpu smoke
    monkeypatch.delenv("TRITON_DISABLE_MACA_OPT_MMA_PREFETCH", raising=False)
    CALLS.clear()
    return API


def _args(*argv: str) -> argparse.Namespace:
    args = cli.build_parser(bg.FAMILY).parse_args(list(argv))
    args.dtype = BF16
    return args


# ---- the floor --------------------------------------------------------------------------------


@pytest.mark.parametrize("nk", sorted(ANCHOR_FLOOR))
def test_floor_reproduces_the_anchor_column(nk):
    for m, want in zip(shapes.GEMM_M, ANCHOR_FLOOR[nk]):
        case = bg.gemm_case(m, *nk, -1, BF16)
        assert bg.weight_floor_us(case, CEIL.copy_tbps) == pytest.approx(want, abs=0.065), (nk, m)


def test_floor_pieces():
    assert bg.gemm_nbytes(1, 4096, 4096) == 4096 * 4096 + 4 * 4096 + 2 * (4096 + 4096)
    assert bg.gemm_nbytes(2, 128, 256, group_size=128) == 128 * 256 + 4 * 128 * 2 + 2 * (
        2 * 256 + 2 * 128)
    assert bg.gemm_nbytes(1, 64, 192, group_size=128) == 64 * 192 + 4 * 64 * 2 + 2 * (192 + 64)
    assert bg.gemm_nbytes(3, 64, 128, fp8=False) == 2 * 64 * 128 + 2 * (3 * 128 + 3 * 64)
    assert bg.gemm_flops(16, 4096, 4096) == 2 * 16 * 4096 * 4096
    case = bg.gemm_case(16, 4096, 4096, -1, torch.float16)
    assert case.shape == {"m": 16, "n": 4096, "k": 4096, "group_size": -1}
    assert case.nbytes == case.footprint == bg.gemm_nbytes(16, 4096, 4096)
    assert bg.traffic_bytes(case, "torch") == bg.gemm_nbytes(16, 4096, 4096, fp8=False)
    assert bg.traffic_bytes(case, "cuda") == bg.traffic_bytes(case, "scaled_mm") == case.nbytes
    # Unmeasured copy bandwidth: ANCHORS' 4.3 TB/s.
    assert bg.weight_floor_us(case, None) == pytest.approx(case.nbytes / 4.3e6)


def test_roofline_turns_compute_bound_at_large_m():
    small, large = (bg.gemm_case(m, 4096, 4096, -1, BF16) for m in (16, 4096))
    mem = bg.weight_floor_us(small, CEIL.copy_tbps)
    assert CEIL.floor_us(small.nbytes, small.flops, BF16) == pytest.approx(mem)
    compute = large.flops / (CEIL.bf16_tflops * 1e12) * 1e6  # 198 us: bf16 MMA after dequant
    assert CEIL.floor_us(large.nbytes, large.flops, BF16) == pytest.approx(compute)
    assert compute > bg.weight_floor_us(large, CEIL.copy_tbps)


# ---- shapes and flags -------------------------------------------------------------------------


def test_parse_shape_and_m():
    assert bg.parse_nk("4096x14336") == (4096, 14336)
    assert bg.parse_nk("128X64") == (128, 64)
    for bad in ("4096", "4096x100", "ax64", "0x64"):
        with pytest.raises(argparse.ArgumentTypeError, match="--shape"):
            bg.parse_nk(bad)
    assert bg.parse_m("1, 16,64") == [1, 16, 64]
    for bad in ("", "0,1", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match="--m expects"):
            bg.parse_m(bad)


def test_flags_parse():
    args = _args("--shape", "4096x4096", "--shape", "6144x4096", "--m", "1,16",
                 "--group-size", "128", "--prefetch", "off", "--shapes", "anchors")
    assert args.shape == [(4096, 4096), (6144, 4096)] and args.m == [1, 16]
    assert (args.group_size, args.prefetch, args.shapes) == (128, "off", "anchors")
    defaults = _args()
    assert (defaults.shape, defaults.m, defaults.group_size, defaults.prefetch) == (
        None, None, -1, "both")
    with pytest.raises(SystemExit):
        _args("--group-size", "64")
    with pytest.raises(SystemExit):
        _args("--prefetch", "maybe")


def test_normalize_argv():
    assert bg.normalize_argv(["--dtype", "bfloat16"]) == ["--dtype", "bf16"]
    assert bg.normalize_argv(["--dtype=float16", "--quick"]) == ["--dtype=fp16", "--quick"]
    assert bg.normalize_argv(["--cpu"]) == ["--cpu", "--dtype", "fp16"]
    assert bg.normalize_argv(["--cpu", "--dtype", "bf16"]) == ["--cpu", "--dtype", "bf16"]
    assert bg._prefetch_arg(["--prefetch", "on", "--quick"]) == "on"
    assert bg._prefetch_arg([]) == "both"


def test_case_grid():
    cases = bg.make_cases(_args())
    nks = list(dict.fromkeys((c.shape["n"], c.shape["k"]) for c in cases))
    assert nks[:4] == shapes.GEMM_NK  # the anchors first
    model_nks = {(n, k) for name in shapes.GEMM_MODELS for _, n, k in shapes.linear_shapes(name)}
    assert set(nks) == set(shapes.GEMM_NK) | model_nks and len(nks) == len(set(nks))
    assert len(cases) == len(nks) * len(shapes.GEMM_M_FULL)
    labels = {(c.shape["n"], c.shape["k"]): c.model for c in cases}
    assert labels[4096, 4096] == "anchors+llama-3-8b:o_proj+qwen3-8b:o_proj"
    assert labels[57344, 8192] == "llama-3-70b:gate_up_proj"
    quick = bg.make_cases(_args("--quick"))
    assert [(c.shape["n"], c.shape["k"]) for c in quick[::4]] == shapes.GEMM_NK
    assert [c.shape["m"] for c in quick[:4]] == list(bg.QUICK_M)
    anchors = bg.make_cases(_args("--shapes", "anchors"))
    assert {c.model for c in anchors} == {"anchors"} and len(anchors) == 4 * 6
    model = bg.make_cases(_args("--model", "llama3-70b", "--m", "1"))
    assert [(c.shape["n"], c.shape["k"]) for c in model] == [
        (10240, 8192), (8192, 8192), (57344, 8192), (8192, 28672)]
    explicit = bg.make_cases(_args("--shape", "6144x4096", "--m", "2,3", "--group-size", "128"))
    assert [(c.shape["m"], c.shape["group_size"]) for c in explicit] == [(2, 128), (3, 128)]
    args = _args("--cpu")
    assert {(c.shape["n"], c.shape["k"]) for c in bg.make_cases(args)} == set(bg.CPU_SHAPES)


def test_case_grid_rejects_fp32():
    args = _args()
    args.dtype = torch.float32
    with pytest.raises(ValueError, match="activations must be bf16 or fp16, got fp32"):
        bg.make_cases(args)


def test_providers_per_prefetch_choice():
    names = lambda p: [x.name for x in bg.providers(p)]  # noqa: E731
    peers = ["torch", "scaled_mm", "scaled_mm-fp8act"]
    assert names("both") == ["cuda", "cuda-prefetch-off", "triton", "triton-prefetch-off",
                             *peers]
    assert names("on") == ["cuda", "triton", *peers]
    assert names("off") == ["cuda-prefetch-off", "triton-prefetch-off", *peers]
    assert {p.cli_name for p in bg.providers("both")} == {"cuda", "triton", "torch",
                                                          "scaled_mm"}
    assert [p.peer for p in bg.providers("on")] == [False, False, True, True, True]
    with pytest.raises(ValueError, match="--prefetch must be one of"):
        bg.providers("sometimes")


# ---- inputs, the check, scaled_mm's quantization ---------------------------------------------


def test_build_ours_calls_the_op_with_backend_and_stages(fake_quant):
    case = bg.gemm_case(3, 64, 192, 128, BF16)
    fn = bg._build_ours("triton", 1)(case, 2, "cpu")
    assert CALLS[-1] == {"backend": "triton", "stages": 1}  # the check ran one call
    a, b = fn(0).clone(), fn(1).clone()
    assert a.shape == (3, 64) and not torch.equal(a, b)  # two sets, two weights
    fn_tuned = bg._build_ours("cuda", None)(case, 1, "cpu")
    fn_tuned(0)
    assert CALLS[-1] == {"backend": "cuda", "stages": None}


def test_build_ours_checks_its_output(fake_quant, monkeypatch):
    def wrong(x, qweight, scales, *, out=None, **kw):
        return out.zero_()

    monkeypatch.setattr(bg, "_api", lambda: bg.SimpleNamespace(
        gemm=wrong, pack=fp8_weight_pack, unpack=fp8_weight_unpack))
    with pytest.raises(AssertionError, match="differs from the dequantized reference"):
        bg._build_ours("cuda", None)(bg.gemm_case(4, 64, 128, -1, BF16), 1, "cpu")


def test_stand_in_pack_round_trips():
    w = torch.randn(64, 192, dtype=BF16) / 14
    for g in (-1, 128):
        p = fp8_weight_pack(w, g)
        assert p.qweight.shape == (2, 64, 128)
        assert torch.equal(p.qweight[1, :, 64:].float(), torch.zeros(64, 64))
        back = fp8_weight_unpack(p, torch.float32)
        assert ((back - w.float()).norm() / w.float().norm()) < 0.05


def test_quantize_fp8_rowwise_and_per_tensor():
    t = torch.randn(5, 64) * torch.arange(1, 6)[:, None]
    q, s = bg.quantize_fp8(t, rowwise=True)
    assert q.dtype == bg.FP8 and s.shape == (5, 1) and s.dtype == torch.float32
    assert torch.equal(q.float().abs().amax(-1), torch.full((5,), bg.FP8_MAX))
    torch.testing.assert_close(q.float() * s, t, rtol=0.07, atol=1e-3)
    q, s = bg.quantize_fp8(t.to(BF16), rowwise=False)
    assert s.dim() == 0 and q.float().abs().max() == bg.FP8_MAX


def test_availability_on_the_cpu(fake_quant, monkeypatch):
    assert bg.scaled_mm_available("cpu").startswith("needs a CUDA GPU with FP8")
    assert "needs a CUDA GPU" in bg._ours_available("cuda")("cpu")
    assert bg._ours_available("triton")("cpu") is None  # the interpreter is on (fixture)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET" in bg._ours_available("triton")("cpu")
    registry = bg.SimpleNamespace(backends=lambda: {"cuda": "no nvcc", "triton": None})
    monkeypatch.setattr(cli, "module_or_reason", lambda module: registry)
    assert bg._ours_available("cuda")("cuda") == "no nvcc"
    assert bg._ours_available("triton")("cuda") is None
    monkeypatch.setattr(cli, "module_or_reason", lambda module: "pykernels.quant.gemm: broken")
    assert bg._ours_available("triton")("cuda") == "pykernels.quant.gemm: broken"


# ---- rows, notes, the short table -------------------------------------------------------------


def _run() -> results.RunInfo:
    return results.RunInfo("20261121T000000Z-gemm-abcdef0", "2026-11-21T00:00:00Z", "gemm",
                           "test", fake_env(H200, "abcdef0" * 5))


def _outcome(case, name: str, us: float | None):
    prov = next(p for p in bg.providers("both") if p.name == name)
    timing = None if us is None else Timing(us, 0.95 * us, 1.05 * us, 50, "graph")
    return cli.Outcome(case, prov, timing, "ok" if us else "failed", "" if us else "boom")


def test_row_schema_and_per_provider_bandwidth():
    case = bg.gemm_case(16, 4096, 4096, -1, BF16, "anchors")
    rows = {}
    for name, us in (("cuda", 8.0), ("torch", 19.1)):
        rows[name] = {r["metric"]: r for r in bg.provider_rows(_run(), _outcome(case, name, us),
                                                               CEIL)}
    for name, by_metric in rows.items():
        assert set(by_metric) == {"time", "bandwidth", "compute"}
        for r in by_metric.values():
            assert list(r) == results.COLUMNS
            assert (r["kernel"], r["provider"], r["dtype"], r["model"]) == (
                "fp8_gemm", name, "bf16", "anchors")
            assert (r["m"], r["n"], r["k"]) == (16, 4096, 4096)
            assert r["shape_label"] == "m=16 n=4096 k=4096 group_size=-1"
    floor = bg.weight_floor_us(case, CEIL.copy_tbps)
    assert rows["cuda"]["time"]["fraction"] == pytest.approx(floor / 8.0, rel=1e-4)
    assert rows["torch"]["time"]["fraction"] == pytest.approx(floor / 19.1, rel=1e-4)  # fp8 floor
    assert rows["cuda"]["bandwidth"]["value"] == pytest.approx(case.nbytes / 8e-6 / 1e12,
                                                               rel=1e-4)
    bf16_bytes = bg.traffic_bytes(case, "torch")
    assert rows["torch"]["bandwidth"]["value"] == pytest.approx(bf16_bytes / 19.1e-6 / 1e12,
                                                                rel=1e-4)
    assert rows["torch"]["compute"]["value"] == pytest.approx(case.flops / 19.1e-6 / 1e12,
                                                              rel=1e-4)


def test_notes_carry_same_run_ratios(monkeypatch):
    monkeypatch.delenv("TRITON_DISABLE_MACA_OPT_MMA_PREFETCH", raising=False)
    case = bg.gemm_case(1, 4096, 4096, -1, BF16)
    outs = [_outcome(case, n, us) for n, us in (("cuda", 6.0), ("cuda-prefetch-off", 9.0),
                                                ("triton", None), ("torch", 18.0),
                                                ("scaled_mm", 12.0),
                                                ("scaled_mm-fp8act", 8.0))]
    bg.SCALED_MM_MODES["bf16"] = "rowwise"
    bg.finish(outs, _run(), CEIL)
    notes = {o.provider.name: o.note for o in outs}
    assert notes["cuda"] == "prefetch on, 3.00x vs torch, 2.00x vs scaled_mm, " \
                            "1.33x vs scaled_mm-fp8act"
    assert notes["cuda-prefetch-off"] == "prefetch off (stages=1), 2.00x vs torch, " \
                                         "1.33x vs scaled_mm, 0.89x vs scaled_mm-fp8act"
    assert notes["triton"] == "boom"  # a failure keeps its reason, gets no rows
    assert outs[2].rows == []
    assert notes["scaled_mm"] == "W8A8 row-wise scales, act quant timed, 1.50x vs torch, " \
                                 "0.67x vs scaled_mm-fp8act"
    assert notes["scaled_mm-fp8act"] == "W8A8 row-wise scales, fp8 act given, " \
                                        "2.25x vs torch, 1.50x vs scaled_mm"
    assert notes["torch"] == "0.67x vs scaled_mm, 0.44x vs scaled_mm-fp8act"
    monkeypatch.setenv("TRITON_DISABLE_MACA_OPT_MMA_PREFETCH", "1")
    assert bg.row_notes(outs)[id(outs[0])].startswith("prefetch off (TRITON_DISABLE_MACA")


def test_summary_table():
    cases = [bg.gemm_case(m, 4096, 4096, -1, BF16) for m in (1, 16)]
    outs = [_outcome(cases[0], "cuda", 6.0), _outcome(cases[0], "triton", 5.0),
            _outcome(cases[0], "torch", 18.0), _outcome(cases[0], "scaled_mm", 12.0),
            _outcome(cases[1], "cuda", 7.0), _outcome(cases[1], "torch", 19.0)]
    headers, lines = bg.summary_rows(outs, 4.27)
    assert headers == ["N x K", "M", "fp8-w floor us", "cuda us", "triton us", "torch us",
                       "scaled_mm us", "best ours", "vs torch", "vs scaled_mm",
                       "vs scaled_mm-fp8act", "% floor"]
    assert lines[0] == ["4096x4096", "1", "3.9", "6.0", "5.0", "18.0", "12.0", "triton",
                        "3.60x", "2.40x", "", "79%"]
    assert lines[1][:8] == ["4096x4096", "16", "4.0", "7.0", "", "19.0", "", "cuda"]
    assert lines[1][8:] == ["2.71x", "", "", "57%"]
    caption = bg.summary_caption(outs)
    assert caption.startswith("6 measured, 0 failed, 0 skipped")
    assert "best of ours vs torch: 3.13x (geo-mean of 2)" in caption  # sqrt(3.6 * 19/7)
    assert "best of ours vs scaled_mm: 2.40x (geo-mean of 1)" in caption


# ---- the CLI ----------------------------------------------------------------------------------


def test_cpu_smoke(fake_quant, tmp_path, capsys):
    real_run_cases = cli.run_cases
    status = bg.main(["--cpu", "--backend", "triton,torch,cuda", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert status == 0, out
    assert cli.run_cases is real_run_cases
    assert "skipped cuda: needs a CUDA GPU" in out
    df = pd.read_csv(tmp_path / "cpu" / "results.csv")
    assert set(df.provider) == {"triton", "triton-prefetch-off", "torch"}
    assert set(zip(df.n, df.k)) == set(bg.CPU_SHAPES) and set(df.m) == set(bg.CPU_M)
    assert set(df.metric) == {"time", "bandwidth", "compute"} and set(df.dtype) == {"fp16"}
    bw = df[df.metric == "bandwidth"].set_index(["provider", "n", "m"])
    t = df[df.metric == "time"].set_index(["provider", "n", "m"]).value
    case = bg.gemm_case(7, 128, 256, -1, torch.float16)
    assert bw.value["torch", 128, 7] == pytest.approx(
        bg.traffic_bytes(case, "torch") / (t["torch", 128, 7] * 1e-6) / 1e12, rel=1e-3)
    assert bw.value["triton", 128, 7] == pytest.approx(
        case.nbytes / (t["triton", 128, 7] * 1e-6) / 1e12, rel=1e-3)
    assert {c["stages"] for c in CALLS} == {None, 1}
    run = json.loads(next((tmp_path / "cpu" / "runs").glob("*.json")).read_text())
    assert run["family"] == "gemm" and "bench.gemm" in run["command"]
    # The short table comes last, after the harness table.
    assert out.rindex("bench.gemm summary") > out.rindex("bench.gemm on")
    assert out.strip().splitlines()[-1].startswith("12 measured, 0 failed, 0 skipped")
    assert "vs torch" in out.split("bench.gemm summary")[1]


def test_cpu_smoke_prefetch_on_and_group_size(fake_quant, tmp_path, capsys):
    status = bg.main(["--cpu", "--backend", "triton", "--prefetch", "on", "--group-size", "128",
                      "--shape", "128x256", "--m", "2", "--out", str(tmp_path)])
    assert status == 0, capsys.readouterr().out
    df = pd.read_csv(tmp_path / "cpu" / "results.csv")
    assert set(df.provider) == {"triton"} and set(df.shape_label) == {
        "m=2 n=128 k=256 group_size=128"}
    assert CALLS and {c["stages"] for c in CALLS} == {None}


def test_no_gpu_without_cpu_flag(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bg.main(["--quick"]) == 0
    assert "bench.gemm: no CUDA GPU here" in capsys.readouterr().out


def _real_quant_imports() -> bool:
    try:
        bg._api()
    except ImportError:
        return False
    return True


@pytest.mark.skipif(torch.cuda.is_available() or not _real_quant_imports(),
                    reason="CPU-only check of the real ops (the GPU test below covers the GPU)")
def test_cpu_smoke_real_ops(tmp_path, capsys, monkeypatch):
    # pykernels.quant itself: the Triton twin interpreted, checked against the dequantized
    # weight at build, then timed.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    status = bg.main(["--cpu", "--backend", "triton,torch", "--prefetch", "on", "--m", "3",
                      "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert status == 0, out
    df = pd.read_csv(tmp_path / "cpu" / "results.csv")
    assert set(df.provider) == {"triton", "torch"}


@pytest.mark.gpu
def test_gpu_one_shape(tmp_path, capsys):
    status = bg.main(["--shape", "4096x4096", "--m", "1,64", "--rep-ms", "10",
                      "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert status == 0, out
    df = pd.read_csv(next(tmp_path.glob("*/results.csv")))
    assert {"cuda", "cuda-prefetch-off", "triton", "triton-prefetch-off", "torch"} <= set(
        df.provider)
    times = df[df.metric == "time"]
    # A fraction above 1 would mean the floor is wrong (or the weight stayed in L2).
    ours = times[~times.provider.isin(bg.PEERS)]
    assert ours.fraction.between(0.02, 1.05).all(), ours[["provider", "m", "fraction"]]
    assert "bench.gemm summary" in out


def test_ceilings_fallback_in_summary(capsys):
    case = bg.gemm_case(1, 4096, 4096, -1, BF16)
    bg.print_summary([_outcome(case, "cuda", 5.0)], Ceilings())
    assert "4.3 TB/s (not measured)" in capsys.readouterr().out
