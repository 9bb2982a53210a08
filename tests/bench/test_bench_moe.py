"""bench.moe on the CPU: the floor against ANCHORS.md's fractions, the case grid, the align cache
that takes align out of the fused_moe timing, and the --cpu CLI (through stand-in ops with the
signatures of pykernels.moe, so it runs before and without the real kernels)."""

from __future__ import annotations

import argparse
import sys
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from bench import cli
from bench import moe as bm
from bench.ceilings import Ceilings
from bench.timing import Timing

ANCHOR_CEIL = Ceilings(copy_tbps=4.3, bf16_tflops=694.0)  # the constants ANCHORS.md's floor uses
# ANCHORS.md "Fused MoE (bf16)": fraction of floor of the stored reference times, M = 1 ... 4096.
ANCHOR_FRACTION = {
    "mixtral-8x7b": (0.81, 0.97, 0.95, 0.82, 0.62, 0.76),
    "qwen3-30b-a3b": (0.32, 0.83, 0.87, 0.81, 0.67, 0.50),
}
BLOCK = 4
CHUNK = 32768  # VLLM_FUSED_MOE_CHUNK_SIZE's default
CALLS = {"align": 0, "run": 0}


# ---- stand-ins for pykernels.moe (same signatures; align via the launcher's route) ----------


def moe_align_block_size(topk_ids, num_experts, block_size, expert_map=None, *, out=None,
                         backend="auto"):
    CALLS["align"] += 1
    flat = topk_ids.reshape(-1).long()
    cap = flat.numel() + num_experts * (block_size - 1)
    sorted_ids = torch.full((cap,), flat.numel(), dtype=torch.int32)
    expert_ids = torch.full((-(-cap // block_size),), -1, dtype=torch.int32)
    pos = 0
    for e in range(num_experts):
        slots = (flat == e).nonzero().flatten()
        blocks = -(-slots.numel() // block_size)
        sorted_ids[pos:pos + slots.numel()] = slots.int()
        expert_ids[pos // block_size:pos // block_size + blocks] = e
        pos += blocks * block_size
    return sorted_ids, expert_ids, torch.tensor([pos], dtype=torch.int32)


def fused_topk(logits, topk, renormalize, scoring="softmax", *, backend="auto"):
    scores = logits.float().softmax(-1) if scoring == "softmax" else logits.float().sigmoid()
    w, ids = scores.topk(topk, dim=-1)
    return (w / w.sum(-1, keepdim=True) if renormalize else w), ids.int()


def _route(topk_ids, block_m, num_experts, expert_map=None):
    return (*moe_align_block_size(topk_ids, num_experts, block_m), block_m)


class Launcher:
    """fused_moe_triton's pieces: chunk_configs -> route (align) -> run_routed."""

    Workspace = staticmethod(lambda *args: SimpleNamespace(args=args))

    @staticmethod
    def chunk_configs(tokens, w1, w2, topk, dtype, quant, config):
        return {"BLOCK_SIZE_M": BLOCK}, {}

    route = staticmethod(_route)

    @staticmethod
    def run_routed(out, x, w1, w2, topk_weights, r, ws, up, down, fp8_1=None, fp8_2=None):
        """Computes from the align outputs, so stale or wrong ones give a wrong answer."""
        CALLS["run"] += 1
        sorted_ids, expert_ids, total, block = r
        out.zero_()
        inter, k = w2.shape[2], topk_weights.shape[1]
        for b in range(int(total[0]) // block):
            slots = sorted_ids[b * block:(b + 1) * block].long()
            slots = slots[slots < topk_weights.numel()]
            e, tok = int(expert_ids[b]), slots // k
            h = x[tok].float() @ w1[e].float().T
            y = (F.silu(h[:, :inter]) * h[:, inter:]) @ w2[e].float().T
            out.index_add_(0, tok, (y * topk_weights.reshape(-1)[slots, None]).to(out.dtype))


def fused_moe(hidden, w1, w2, topk_weights, topk_ids, *, out=None, backend="auto", **quant):
    out = torch.empty_like(hidden) if out is None else out
    for start in range(0, hidden.shape[0], CHUNK):
        rows = slice(start, start + CHUNK)
        r = _route(topk_ids[rows], BLOCK, w1.shape[0])  # not Launcher.route: tests patch it
        Launcher.run_routed(out[rows], hidden[rows], w1, w2, topk_weights[rows], r, None, {}, {})
    return out


API = SimpleNamespace(fused_moe=fused_moe, fused_topk=fused_topk, align=moe_align_block_size,
                      impl=Launcher, Fp8=lambda w, a: (w, a))


@pytest.fixture
def fake_moe(monkeypatch):
    monkeypatch.setattr(bm, "_api", lambda: API)
    monkeypatch.setattr(cli, "module_or_reason", lambda module: SimpleNamespace())
    bm._WEIGHTS.clear()
    CALLS.update(align=0, run=0)
    yield API
    bm._WEIGHTS.clear()


# ---- the floor --------------------------------------------------------------------------------


@pytest.mark.parametrize("model", sorted(ANCHOR_FRACTION))
def test_floor_reproduces_the_anchor_fractions(model):
    s = bm.moe_shape(model)
    for m, ref_us, frac in zip(bm.shapes.MOE_M, bm.REFERENCE_US[model].values(),
                               ANCHOR_FRACTION[model]):
        case = bm.fused_cases(m, s, torch.bfloat16)[0]
        floor = ANCHOR_CEIL.floor_us(case.nbytes, case.flops, torch.bfloat16)
        # Mid-M rows depend on how many experts a random routing touches: +-0.03.
        assert floor / ref_us == pytest.approx(frac, abs=0.03), (model, m)


def test_floor_pieces():
    s = bm.moe_shape("mixtral")
    assert (s.experts, s.topk, s.hidden, s.inter, s.scoring) == (8, 2, 4096, 14336, "softmax")
    assert bm.moe_shape("deepseek-v3").scoring == "sigmoid"
    assert bm.weight_bytes_per_expert(s) == 2 * 3 * 14336 * 4096
    assert bm.weight_bytes_per_expert(s, fp8=True) == 3 * 14336 * 4096 + 8
    assert bm.weight_bytes_per_expert(s, fp8=True, per_channel=True) == (
        3 * 14336 * 4096 + 4 * 3 * 14336)
    assert bm.moe_flops(1, s) == 2 * 2 * 3 * 14336 * 4096
    q = bm.moe_shape("qwen3-30b-a3b")
    assert bm.touched_experts(1, q, 0) == 8  # one token: its top-8, all distinct
    assert bm.touched_experts(4096, q, 0) == 128
    assert 60 < bm.touched_experts(16, q, 0) < 100  # 128 slots over 128 experts: ~81 expected
    assert bm.moe_nbytes(2, q, 8) == 8 * 2 * 3 * 768 * 2048 + 2 * 2 * 2048 * 2 + 2 * 8 * 8


def test_align_block(monkeypatch):
    q = bm.moe_shape("qwen3-30b-a3b")
    assert bm.align_block(64, 128, 8, q, override=32) == 32
    impl = bm._launcher()
    if impl is not None:  # the launcher's own choice, tuned or default
        w2 = torch.empty(128, 2048, 768, device="meta")
        want = impl.lookup(1024, w2, w2, 8, torch.bfloat16, "none")[0]["BLOCK_SIZE_M"]
        assert bm.align_block(1024, 128, 8, q) == want
        assert bm.align_block(16384, 512, 8) == impl.default_config(16384, 512, 8)["BLOCK_SIZE_M"]
    monkeypatch.setattr(bm, "_launcher", lambda: None)
    assert bm.align_block(1, 8, 2) == 16 and bm.align_block(64, 8, 2) == 64
    assert bm.align_block(64, 128, 8, q) == 16


def test_align_bytes():
    cap = 4 * 2 + 8 * 15
    assert bm.align_nbytes(4, 2, 8, 16) == 4 * (8 + cap + 8 + 1)


def test_fp8_weights_are_scaled_into_range():
    q, s = bm._fp8_weight((3, 8, 16), 16, per_channel=False, device="cpu")
    assert q.dtype == bm.FP8 and s.shape == (3,) and (s > 0).all()
    assert q.float().abs().max() <= bm.FP8_MAX
    q, s = bm._fp8_weight((3, 8, 16), 16, per_channel=True, device="cpu")
    assert s.shape == (3, 8, 1)
    assert torch.equal(q.float().abs().amax(-1), torch.full((3, 8), bm.FP8_MAX))


# ---- the grid ---------------------------------------------------------------------------------


def _args(*argv: str) -> argparse.Namespace:
    args = cli.build_parser(bm.FAMILY).parse_args(list(argv))
    args.dtype = torch.bfloat16
    return args


def test_case_grid():
    cases = bm.make_cases(_args())
    assert len(cases) == 3 * 6 * 3 + len(bm.ALIGN_EXTRA)
    assert {c.kernel for c in cases} == {"fused_moe", "fused_moe_e2e", "moe_align"}
    (extra,) = [c for c in cases if c.model == "acceptance"]
    assert (extra.shape["tokens"], extra.shape["num_experts"], extra.shape["topk"]) == (
        16384, 512, 8)
    quick = bm.make_cases(_args("--quick"))
    assert {c.model for c in quick} == set(bm.QUICK_MODELS) and len(quick) == 2 * 3 * 3
    align = bm.make_cases(_args("--model", "qwen3-30b", "--mode", "align", "--align-block", "32"))
    assert [c.shape["block_size"] for c in align] == [32] * 6
    assert [c.shape["tokens"] for c in align] == bm.shapes.MOE_M
    fp8 = bm.make_cases(_args("--model", "mixtral", "--mode", "fused", "--fp8", "--per-channel"))
    assert {c.dtype for c in fp8} == {bm.FP8}
    assert {c.shape["weight_scales"] for c in fp8} == {"channel"}
    args = _args("--model", "mixtral", "--mode", "fused")
    args.dtype = bm.FP8  # what --dtype fp8 gives once bench/cli.py's DTYPES has it
    assert [c.shape for c in bm.make_cases(args)] == [c.shape for c in bm.make_cases(
        _args("--model", "mixtral", "--mode", "fused", "--fp8"))]


def test_case_grid_errors():
    with pytest.raises(ValueError, match="--per-channel needs --fp8"):
        bm.make_cases(_args("--per-channel"))
    with pytest.raises(ValueError, match="'llama-3-8b' is not an MoE model"):
        bm.make_cases(_args("--model", "llama-3-8b"))


# ---- align excluded ---------------------------------------------------------------------------


def _case(tokens=5, kernel="fused_moe"):
    case = bm.fused_cases(tokens, bm.CPU_SHAPE, torch.float32)[0]
    return bm.Case(kernel, case.shape, case.dtype, case.nbytes, case.flops, case.model)


@pytest.mark.parametrize("chunk", [CHUNK, 2])
def test_routed_call_aligns_outside_the_timed_call(fake_moe, monkeypatch, chunk):
    monkeypatch.setenv("VLLM_FUSED_MOE_CHUNK_SIZE", str(chunk))
    monkeypatch.setattr(sys.modules[__name__], "CHUNK", chunk)
    torch.manual_seed(0)
    plain = bm._build_fused("triton")(_case(kernel="fused_moe_e2e"), 2, "cpu")
    want = [plain(i).clone() for i in range(2)]
    bm._WEIGHTS.clear()
    torch.manual_seed(0)  # same seeds: the same inputs and weights, rebuilt
    fn = bm._build_fused("triton")(_case(), 2, "cpu")  # checks itself against the plain call
    aligns, runs = CALLS["align"], CALLS["run"]
    got = [fn(i).clone() for i in (0, 1, 0)]
    assert CALLS["align"] == aligns  # the timed calls never align
    assert CALLS["run"] == runs + 3 * (-(-5 // chunk))  # one run_routed per chunk
    torch.testing.assert_close(got[:2], want)
    torch.testing.assert_close(got[2], want[0])
    assert not torch.equal(want[0], want[1])  # two input sets, two routings


def test_routed_call_is_checked_against_the_public_call(fake_moe, monkeypatch):
    monkeypatch.setattr(Launcher, "route", staticmethod(
        lambda ids, block, e, expert_map=None: (*moe_align_block_size(ids + 1 - ids, e, block),
                                                block)))  # every slot to expert 1: wrong
    with pytest.raises(AssertionError, match="align-excluded fused_moe differs"):
        bm._build_fused("triton")(_case(), 1, "cpu")


def test_fp8_pair():
    w = {"use_fp8_w8a8": True, "per_channel_quant": True,
         "w1_scale": torch.ones(4, 6, 1), "w2_scale": torch.ones(4, 3, 1)}
    up, down = bm._fp8_pair(w, API)
    assert up[0].shape == (4, 6) and down[0].shape == (4, 3) and up[1] is None
    assert bm._fp8_pair({}, API) == (None, None)


# ---- notes and the CLI ------------------------------------------------------------------------


def _outcome(model, tokens, us, kernel="fused_moe", dtype=torch.bfloat16):
    case = cli.Case(kernel, {"tokens": tokens}, dtype, model=model)
    return cli.Outcome(case, None, Timing(us, us, us, 10, "graph"))


def test_reference_note():
    note = bm.reference_note(_outcome("mixtral-8x7b", 1, 190.0))
    assert note == "stored ref 203 us (vLLM Triton, H200; ANCHORS.md) -> 1.07x"
    assert "55.6 us" in bm.reference_note(_outcome("qwen3-30b-a3b", 1, 55.6))
    assert bm.reference_note(_outcome("deepseek-v3", 1, 100.0)) == ""
    assert bm.reference_note(_outcome("mixtral-8x7b", 1, 100.0, kernel="fused_moe_e2e")) == ""
    assert bm.reference_note(_outcome("mixtral-8x7b", 1, 100.0, dtype=bm.FP8)) == ""


def test_cpu_smoke(fake_moe, tmp_path, capsys):
    real_run_cases = cli.run_cases
    status = bm.main(["--cpu", "--backend", "triton,torch", "--compare", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert status == 0, out
    assert cli.run_cases is real_run_cases
    df = pd.read_csv(tmp_path / "cpu" / "results.csv")
    assert set(zip(df.kernel, df.provider)) == {
        ("fused_moe", "triton"), ("fused_moe_e2e", "triton"), ("moe_align", "triton"),
        ("fused_moe", "torch"), ("moe_align", "torch")}
    assert set(df.tokens) == set(bm.CPU_M) and set(df.metric) >= {"time", "bandwidth"}
    assert "fused_moe" in out and "moe_align" in out and "vs triton" in out


def test_cpu_smoke_cuda_align_is_skipped(fake_moe, capsys):
    assert bm.main(["--cpu", "--backend", "cuda", "--no-save"]) == 0
    assert "skipped cuda: needs a CUDA GPU" in capsys.readouterr().out


def _real_kernels_import() -> bool:
    try:
        bm._api()
    except ImportError:
        return False
    return True


@pytest.mark.skipif(torch.cuda.is_available() or not _real_kernels_import(),
                    reason="CPU-only check of the real ops (the GPU test below covers the GPU)")
def test_cpu_smoke_real_kernels(tmp_path, capsys):
    # pykernels.moe itself (Triton interpreted, fp32): the align-excluded path agrees with the
    # public call (build checks it) and every row is measured.
    status = bm.main(["--cpu", "--backend", "triton,torch", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert status == 0, out
    df = pd.read_csv(tmp_path / "cpu" / "results.csv")
    assert len(df[df.metric == "time"]) == 2 * 5


@pytest.mark.gpu
def test_gpu_quick_qwen3(tmp_path, monkeypatch, capsys):
    # The real kernels on the GPU: every row measured, the stored reference beside fused_moe.
    notes = []
    real_note = bm.reference_note
    monkeypatch.setattr(bm, "reference_note", lambda o: notes.append(real_note(o)) or notes[-1])
    status = bm.main(["--model", "qwen3-30b-a3b", "--quick", "--rep-ms", "10",
                      "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert status == 0, out
    # one note per fused_moe provider row (triton and torch) at each quick M
    assert sum(n.startswith("stored ref ") for n in notes) == 2 * len(bm.QUICK_M), notes
    assert "stored ref 55.6 us" in " ".join(notes)
    df = pd.read_csv(next(tmp_path.glob("*/results.csv")))
    assert {"fused_moe", "fused_moe_e2e", "moe_align"} <= set(df.kernel)
    assert {"triton", "torch", "cuda"} <= set(df.provider)
    times = df[df.metric == "time"].set_index(["kernel", "provider", "tokens"]).value
    for m in bm.QUICK_M:  # align excluded is faster than align included
        assert times["fused_moe", "triton", m] < times["fused_moe_e2e", "triton", m]
    frac = df[(df.kernel == "fused_moe") & (df.metric == "time") & (df.provider == "triton")]
    assert frac.fraction.between(0.05, 1.05).all()  # a floor above the time means a wrong floor
