"""fused_moe on the CPU: the Triton kernels in the interpreter (tiny shapes) and the torch backend
against the fp32 reference; fp8 w8a8 against dequantize-then-matmul; expert maps, empty experts,
chunking, in place, strided inputs; the sm_90 compile of the tuner's tiles; bad inputs. The GPU
grid is in test_fused_moe_gpu.py."""

from __future__ import annotations

import re

import pytest
import torch

from pykernels.moe import distribution, fused_moe, quant, ref
from pykernels.moe import fused_moe_triton as kern
from tests.moe._fused_cases import (
    CPU_ONLY,
    TOL,
    TORCH_TOL,
    _own_cache,  # noqa: F401 (an autouse fixture)
    check,
    check_fp8,
    close,
    make_routing,
    make_weights,
    quantize_weight,
    routing_with_counts,
    run,
)

# ---- CPU: the interpreter and the torch backend ------------------------------------------------

E, H, I, TOPK = 4, 64, 32, 2  # noqa: E741
SMALL = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 16, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 2,
         "num_warps": 4, "num_stages": 2}


@CPU_ONLY
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("m", [1, 3, 17])
def test_triton_cpu_matches_reference(dtype, m):
    w1, w2 = make_weights(E, H, I, dtype)
    tw, ti = make_routing(m, E, TOPK)
    check(torch.randn(m, H).to(dtype), w1, w2, tw, ti)


@CPU_ONLY
@pytest.mark.parametrize("h, i", [(48, 24), (80, 40)])
def test_triton_cpu_odd_sizes_small_tiles(h, i):
    """H, I not multiples of the blocks: masked K tails, wrapped N columns, several N blocks,
    grouped program order (GROUP_SIZE_M 2), up and down on separate configs."""
    w1, w2 = make_weights(E, h, i, torch.float16)
    tw, ti = make_routing(17, E, TOPK)
    x = torch.randn(17, h).half()
    check(x, w1, w2, tw, ti, config=SMALL)
    split = {"up": SMALL, "down": {**SMALL, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 64}}
    check(x, w1, w2, tw, ti, config=split)


@CPU_ONLY
def test_triton_cpu_experts_without_tokens_and_top1():
    w1, w2 = make_weights(8, H, I, torch.float16)
    x = torch.randn(9, H).half()
    tw, ti = make_routing(9, 8, 2, experts=[1, 6])  # 6 of 8 experts get nothing
    check(x, w1, w2, tw, ti)
    tw, ti = make_routing(9, 8, 1, experts=[0, 3, 5])  # top-1: the down GEMM writes out itself
    check(x, w1, w2, tw, ti)
    ti = torch.full((9, 1), 7, dtype=torch.int32)  # one expert takes everything
    check(x, w1, w2, torch.ones(9, 1), ti)


# Per expert at 64-row blocks: exactly half a block (its row 32 is padding: half tile), one row
# more (full tile), a full block then 5 rows (full, then half), none, one row (half).
HALF_TAIL_COUNTS = [32, 33, 69, 0, 1]


def test_half_tail_where():
    """Half tiles from 64-row blocks (bf16/fp16) and 128-row blocks (fp8: a 32-row fp8 half
    is not a wgmma tile and sums differently), unless the config turns them off."""
    assert [kern.half_tail({}, bm, False) for bm in (16, 32, 64, 128)] == [0, 0, 1, 1]
    assert [kern.half_tail({}, bm, True) for bm in (32, 64, 128)] == [0, 0, 1]
    assert not kern.half_tail({"HALF_TAIL": False}, 128, False)


@CPU_ONLY
@pytest.mark.parametrize("half", [True, False])
def test_triton_cpu_half_tail(half):
    """Blocks padded past their middle row run as half-height tiles (HALF_TAIL, from 64-row
    blocks), in both GEMMs; the same layer with the option off."""
    tw, ti = routing_with_counts(HALF_TAIL_COUNTS)
    r = kern.route(ti, 64, len(HALF_TAIL_COUNTS))
    middle = r.sorted_ids[32:r.total.item():64]  # each block's row 32: padding = half tile
    assert (middle >= ti.numel()).tolist() == [True, False, False, True, True]
    w1, w2 = make_weights(len(HALF_TAIL_COUNTS), H, I, torch.float16)
    config = {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 16, "BLOCK_SIZE_K": 32, "num_stages": 2,
              "HALF_TAIL": half}
    check(torch.randn(ti.shape[0], H).half(), w1, w2, tw, ti, config=config)


@CPU_ONLY
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("topk", [1, 3])
# Padding rows of the down GEMM read slot 0's act row, which no GEMM wrote here (token 0 is
# unrouted): numpy warns about the garbage, whose rows are never stored.
@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")
def test_unrouted_slots_add_nothing(backend, topk):
    """Ids -1 (a token routed nowhere) and >= E: no GEMM writes their slots, the sum skips
    them (the poisoned output stays finite); a token with no routed slot gets zeros."""
    w1, w2 = make_weights(E, H, I, torch.float16)
    x = torch.randn(6, H).half()
    tw, ti = make_routing(6, E, topk)
    ti[0, :] = -1
    ti[1, 0] = E
    ti[2, -1] = -1
    got = check(x, w1, w2, tw, ti[:, :topk].t().contiguous().t(), backend)
    assert torch.equal(got[0], torch.zeros_like(got[0]))


@CPU_ONLY
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_expert_map(backend):
    """8 global experts, 4 local: slots of non-local experts contribute zero."""
    w1, w2 = make_weights(4, H, I, torch.float16)
    expert_map = torch.tensor([-1, 0, -1, 1, 2, -1, 3, -1], dtype=torch.int32)
    x = torch.randn(17, H).half()
    tw, ti = make_routing(17, 8, 3)
    got = check(x, w1, w2, tw, ti, backend, expert_map=expert_map, global_num_experts=8)
    local_only = ref.fused_moe(x, w1, w2, tw, ti, expert_map=expert_map)
    assert (local_only != ref.fused_moe(x, w1, w2, tw, ti.remainder(4))).any()
    assert torch.isfinite(got).all()


@CPU_ONLY
@pytest.mark.parametrize("inplace", [False, True])
def test_chunking(monkeypatch, inplace):
    """17 tokens in chunks of 4 (the last 1 token): same result as one chunk, and in place."""
    monkeypatch.setenv("VLLM_FUSED_MOE_CHUNK_SIZE", "4")
    w1, w2 = make_weights(E, H, I, torch.float16)
    x = torch.randn(17, H).half()
    tw, ti = make_routing(17, E, TOPK)
    want = ref.fused_moe(x, w1, w2, tw, ti, act_dtype=x.dtype)
    if inplace:
        y = x.clone()
        assert fused_moe(y, w1, w2, tw, ti, inplace=True, backend="triton") is y
    else:
        y = run(x, w1, w2, tw, ti, "triton")
    close(y, want, TOL[torch.float16])


@CPU_ONLY
def test_inplace_and_strided_hidden():
    w1, w2 = make_weights(E, H, I, torch.float16)
    tw, ti = make_routing(5, E, TOPK)
    big = torch.randn(7, H + 16).half()
    rows = big[1:6, 8:8 + H]  # strided rows, contiguous last dim: read in place
    want = ref.fused_moe(rows, w1, w2, tw, ti, act_dtype=torch.float16)
    close(run(rows, w1, w2, tw, ti, "triton"), want, TOL[torch.float16])
    cols = torch.randn(H, 5).half().t()  # last-dim stride 5: copied first
    close(run(cols, w1, w2, tw, ti, "triton"),
          ref.fused_moe(cols, w1, w2, tw, ti, act_dtype=torch.float16), TOL[torch.float16])
    before = big.clone()
    fused_moe(rows, w1, w2, tw, ti, inplace=True, backend="triton")
    close(big[1:6, 8:8 + H], want, TOL[torch.float16])
    assert torch.equal(big[0], before[0]) and torch.equal(big[:, :8], before[:, :8])
    for k in (1, 2):  # in place into column-strided rows: summed, or written by the down GEMM
        tw, ti = make_routing(5, E, k)
        want = ref.fused_moe(cols, w1, w2, tw, ti, act_dtype=torch.float16)
        y = cols.clone().t().contiguous().t()
        assert fused_moe(y, w1, w2, tw, ti, inplace=True, backend="triton") is y
        close(y, want, TOL[torch.float16])


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_torch_backend_matches_reference(dtype):
    w1, w2 = make_weights(E, H, I, dtype)
    tw, ti = make_routing(17, E, TOPK)
    check(torch.randn(17, H).to(dtype), w1, w2, tw, ti, "torch")


def test_auto_on_cpu_is_torch_and_empty_batch():
    w1, w2 = make_weights(E, H, I, torch.float32)
    tw, ti = make_routing(3, E, TOPK)
    x = torch.randn(3, H)
    close(fused_moe(x, w1, w2, tw, ti), ref.fused_moe(x, w1, w2, tw, ti), TORCH_TOL[x.dtype])
    empty = fused_moe(x[:0], w1, w2, tw[:0], ti[:0], backend="triton")
    assert empty.shape == (0, H)


@CPU_ONLY
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("static", [False, True])
def test_fp8_cpu(per_channel, static):
    """fp8 GEMMs in the interpreter (activation quantization by the torch path on CPU tensors)
    and the torch backend, against dequantize-then-matmul."""
    wf1, wf2 = make_weights(E, H, I, torch.float32)
    x = torch.randn(17, H).half()
    want, tw, ti = check_fp8(x, wf1, wf2, E, TOPK, per_channel, static, a2=0.01)
    # and the fp8 reference stays near the unquantized one (the scales are applied right)
    close(want, ref.fused_moe(x, wf1, wf2, tw, ti), (0.5, 0.2))


@CPU_ONLY
def test_quantize_fp8_triton_cpu(monkeypatch):
    """Scales and values of the quantization kernel on values the interpreter rounds exactly
    (fp8 grid points; its float8 cast truncates some other values)."""
    grid = torch.randn(5, 100).to(torch.float8_e4m3fn).float()
    grid[:, 7] = quant.FP8_MAX
    x = (grid * torch.tensor([2.0 ** -3, 1, 2.0 ** -2, 4, 0.5])[:, None]).half()
    x[4] = 0  # an all-zero row: scale MIN_SCALE, zeros
    want_q, want_s = quant.quantize_fp8_torch(x)
    for one_pass_max in (quant.ONE_PASS_MAX, 32):  # one pass, then 4 chunks read twice
        monkeypatch.setattr(quant, "ONE_PASS_MAX", one_pass_max)
        q, s = quant.quantize_fp8(x, backend="triton")
        assert torch.equal(s, want_s) and torch.equal(q.float(), want_q.float())
    q, s = quant.quantize_fp8(x[:1], torch.tensor([2.0 ** -3]), backend="triton")
    assert torch.equal(q.float(), grid[:1]) and s.tolist() == [0.125]
    assert torch.equal(want_q.float()[:4], grid[:4])
    assert want_s[4].item() == pytest.approx(quant.MIN_SCALE)


def _compile_sm90(gated: bool, fp8: bool, block: tuple, tma: bool = False,
                  even_k: bool = True, half_tail: bool = True):
    """Compile the GEMM kernel for sm_90a without a GPU (Triton's bundled ptxas): returns the
    cubin's (registers, stack bytes) and whether the main loop became async copies + wgmma."""
    from tests.triton_sm90 import compile_sm90

    fn, act, w = kern._moe_gemm_kernel, "*bf16", "*fp8e4nv" if fp8 else "*bf16"
    aux = "*fp32" if fp8 else act
    bm, bn, bk, group, warps, stages = block
    a, b = w, w
    elt = "fp8e4nv" if fp8 else "bf16"
    if tma:  # the weight's descriptor: [E, 2, N, K] gated, [E, N, K] otherwise
        box = [1, 2, bn, bk] if gated else [1, bn, bk]
        b = f"tensordesc<{elt}{box}>"
    a_tma = tma and not gated  # GEMM 2's sorted rows come by TMA with the weights (as launched)
    a_half = a
    if a_tma:
        a, a_half = (f"tensordesc<{elt}{[rows, bk]}>" for rows in (bm, bm // 2))
    half_tail = kern.half_tail({"HALF_TAIL": half_tail}, bm, fp8)  # as _gemm launches it
    sig = {"a_ptr": a, "a_half_ptr": a_half, "b_ptr": b, "c_ptr": act, "a_scale_ptr": aux,
           "b_scale_ptr": aux, "topk_w_ptr": "*fp32", "sorted_ids_ptr": "*i32",
           "expert_ids_ptr": "*i32", "total_ptr": "*i32", **{n: "i32" for n in fn.arg_names[10:21]}}
    const = dict(ROW_DIV=2 if gated else 1, GATED=gated, MUL_ROUTED_WEIGHT=not gated,
                 USE_FP8=fp8, EVEN_K=even_k, DOT_PRECISION="tf32", B_TMA=tma, A_TMA=a_tma,
                 BLOCK_SIZE_M=bm, BLOCK_SIZE_N=bn, BLOCK_SIZE_K=bk, GROUP_SIZE_M=group,
                 HALF_TAIL=half_tail, PDL=True)  # as launched on Hopper (PYKERNELS_ENABLE_PDL)
    aligned = [n for n in sig if n.endswith("_ptr") and not sig[n].startswith("tensordesc")] + \
        ["N", "K", "stride_am", "stride_be", "stride_bn", "stride_cm"]
    r = compile_sm90(fn, sig, const, aligned, warps, stages)
    return r["regs"], r["stack"], r["pipelined"], r["wgmma"]


SM90_TILES = [  # (gated, fp8, (BM, BN, BK, GROUP_SIZE_M, warps, stages), TMA, uses wgmma)
    (True, False, (16, 32, 256, 1, 4, 3), False, False),  # decode: mma.sync, deep K
    (True, False, (128, 64, 64, 16, 8, 4), False, True),
    (False, False, (128, 256, 64, 16, 8, 3), False, True),  # vLLM's tuned prefill tile
    (True, True, (64, 64, 128, 16, 4, 3), False, True),
    # Weight tiles by TMA: the gated [1, 2, BN, BK] box reshaped in shared memory feeds wgmma.
    (True, False, (16, 64, 256, 1, 4, 3), True, False),
    (True, False, (128, 128, 64, 16, 8, 3), True, True),
    (False, False, (128, 256, 64, 16, 8, 4), True, True),
    (True, True, (64, 64, 128, 16, 4, 3), True, True),
    # GEMM 2 with its act rows by TMA too, bf16 and fp8 (Qwen3's short K: 768).
    (False, True, (64, 128, 128, 1, 4, 3), True, True),
]


@CPU_ONLY
def test_kernel_compiles_for_sm90():
    """Tiles the tuner searches compile for Hopper, pipelined (cp.async; wgmma from 64-row
    blocks) and without spilling: caught here, before a GPU run."""
    from tests.triton_sm90 import results_in_child

    results = results_in_child("tests.moe.test_fused_moe", "_compile_sm90(*t[:4])")
    for (*_, block, _, wgmma), (regs, stack, pipelined, uses_wgmma) in zip(SM90_TILES, results):
        assert pipelined and uses_wgmma == wgmma and stack == 0 and regs <= 255, block


def test_layer_id_is_recorded(monkeypatch):
    seen = []
    monkeypatch.setattr(distribution, "record", lambda *a: seen.append(a))
    w1, w2 = make_weights(E, H, I, torch.float32)
    tw, ti = make_routing(3, E, TOPK)
    fused_moe(torch.randn(3, H), w1, w2, tw, ti, layer_id=5, backend="torch")
    assert len(seen) == 1 and seen[0][0] == 5 and seen[0][1] is ti and seen[0][2] == E


def test_default_configs_are_sane():
    for tokens, e, k in [(1, 8, 2), (64, 128, 8), (4096, 8, 2), (1024, 256, 8)]:
        up = kern.default_config(tokens, e, k)
        down = kern.default_config(tokens, e, k, down=True)
        assert "BLOCK_SIZE_M" not in down and up["BLOCK_SIZE_N"] * 2 == down["BLOCK_SIZE_N"]
        assert up["BLOCK_SIZE_M"] in (16, 32, 64, 128) and up["prefetch"]
    # 64 tokens x top-8 over 128 experts: 4 slots per expert, the thinnest block
    assert kern.default_config(64, 128, 8)["BLOCK_SIZE_M"] == 16
    assert kern.default_config(4096, 8, 2)["BLOCK_SIZE_M"] == 128


# ---- bad inputs --------------------------------------------------------------------------------

def _good():
    w1, w2 = make_weights(E, H, I, torch.float16)
    tw, ti = make_routing(3, E, TOPK)
    return dict(hidden=torch.randn(3, H).half(), w1=w1, w2=w2, topk_weights=tw, topk_ids=ti)


def _fp8(per_channel=False):
    a = _good()
    (a["w1"], s1), (a["w2"], s2) = (quantize_weight(a["w1"], per_channel),
                                    quantize_weight(a["w2"], per_channel))
    return a, dict(use_fp8_w8a8=True, per_channel_quant=per_channel, w1_scale=s1, w2_scale=s2)


BAD = [
    (lambda a: a.update(hidden=a["hidden"].double()), {}, TypeError,
     "hidden must be bfloat16 or float16 or float32, got float64"),
    (lambda a: a.update(hidden=a["hidden"][None]), {}, ValueError, "hidden must be 2-D [M, H]"),
    (lambda a: a.update(w1=a["w1"][:, :, :32]), {}, ValueError,
     "w1 must have shape [E, 2I, H] with H = 64"),
    (lambda a: a.update(w1=a["w1"][:, :63]), {}, ValueError, "an even, non-zero 2I"),
    (lambda a: a.update(w2=a["w2"][:, :, :16]), {}, ValueError,
     "w2 must have shape [E, H, I] = (4, 64, 32)"),
    (lambda a: a.update(w1=a["w1"].float()), {}, TypeError, "w1 must be float16, got float32"),
    (lambda a: a.update(w1=a["w1"].transpose(1, 2).contiguous().transpose(1, 2)), {},
     ValueError, "w1 must have a contiguous last dimension"),
    (lambda a: a.update(topk_ids=a["topk_ids"].long()), {}, TypeError,
     "topk_ids must be int32, got int64"),
    (lambda a: a.update(topk_weights=a["topk_weights"].half()), {}, TypeError,
     "topk_weights must be float32, got float16"),
    (lambda a: a.update(topk_ids=a["topk_ids"][:2]), {}, ValueError,
     "topk_ids must have shape [M, k] with M = 3"),
    (lambda a: a.update(topk_ids=a["topk_ids"][:, :1]), {}, ValueError,
     "topk_weights and topk_ids must have one shape"),
    (None, {"activation": "gelu"}, ValueError, "activation must be 'silu', got 'gelu'"),
    (None, {"w1_scale": torch.ones(4)}, ValueError, "w1_scale only apply with use_fp8_w8a8"),
    (None, {"per_channel_quant": True}, ValueError, "per_channel_quant only apply"),
    (None, {"use_fp8_w8a8": True}, TypeError, "w1 must be float8_e4m3fn, got float16"),
    (None, {"expert_map": torch.arange(4)}, TypeError, "expert_map must be int32, got int64"),
    (None, {"global_num_experts": 8}, ValueError,
     "global_num_experts (8) differs from w1's 4 experts"),
    (None, {"expert_map": torch.arange(8, dtype=torch.int32), "global_num_experts": 6},
     ValueError, "expert_map must have global_num_experts = 6 entries, got 8"),
    (None, {"inplace": True, "out": torch.empty(3, H).half()}, ValueError,
     "pass either inplace=True or out"),
    (None, {"out": torch.empty(3, H + 1).half()}, ValueError, "out must have shape (3, 64)"),
    (None, {"out": torch.empty(3, H)}, TypeError, "out must be float16, got float32"),
    (None, {"backend": "cuda"}, ValueError, "fused_moe: backend must be one of"),
    (None, {"config": [16]}, TypeError, "config must be a dict or None, got list"),
]


@pytest.mark.parametrize("mutate, kw, err, msg", BAD, ids=[b[3][:40] for b in BAD])
def test_bad_inputs(mutate, kw, err, msg):
    a, kw = _good(), dict(kw)
    backend = kw.pop("backend", "torch")
    if mutate is not None:
        mutate(a)
    with pytest.raises(err) as info:
        fused_moe(**a, **kw, backend=backend)
    assert msg in str(info.value)


FP8_BAD = [
    (False, {"w1_scale": None}, ValueError, "use_fp8_w8a8 needs w1_scale (fp32 [4])"),
    (False, {"w2_scale": torch.ones(4, 64)}, ValueError,
     "w2_scale must hold per tensor scales [4], got shape (4, 64)"),
    (True, {"w1_scale": torch.ones(4)}, ValueError,
     "w1_scale must hold per channel scales [4, 64], got shape (4,)"),
    (False, {"w1_scale": torch.ones(4).half()}, TypeError, "w1_scale must be float32"),
    (False, {"a1_scale": torch.ones(2)}, ValueError,
     "a1_scale must be a per-tensor scale (1 element), got shape (2,)"),
]


@pytest.mark.parametrize("per_channel, kw, err, msg", FP8_BAD, ids=[b[3][:40] for b in FP8_BAD])
def test_bad_fp8_inputs(per_channel, kw, err, msg):
    a, fp8 = _fp8(per_channel)
    with pytest.raises(err) as info:
        fused_moe(**a, **{**fp8, **kw}, backend="torch")
    assert msg in str(info.value)


@CPU_ONLY
@pytest.mark.parametrize("config, msg", [
    ({"BLOCK_SIZE_M": 16}, "config needs BLOCK_SIZE_M, BLOCK_SIZE_N, BLOCK_SIZE_K"),
    ({**SMALL, "BLOCK_SIZE_N": 24}, "config['up']['BLOCK_SIZE_N'] must be a positive int (a "
                                    "power of two >= 16"),
    ({"up": SMALL, "down": 3}, "config['up'] and config['down'] must both be dicts"),
    ({**SMALL, "TMA": 1}, "config['up']['TMA'] must be a bool, got 1"),
    ({"up": SMALL, "down": {**SMALL, "HALF_TAIL": "no"}},
     "config['down']['HALF_TAIL'] must be a bool, got 'no'"),
    ({**SMALL, "BLOCK_SIZE_K": 8}, "power of two >= 16 for block sizes), got 8"),
    ({"up": SMALL, "down": {**SMALL, "BLOCK_SIZE_M": 32}},
     "config['down']['BLOCK_SIZE_M'] (32) must equal config['up']'s (16)"),
])
def test_bad_configs(config, msg):
    a = _good()
    with pytest.raises((ValueError, TypeError)) as info:
        fused_moe(**a, config=config, backend="triton")
    assert msg in str(info.value)


@CPU_ONLY
def test_bad_chunk_size(monkeypatch):
    monkeypatch.setenv("VLLM_FUSED_MOE_CHUNK_SIZE", "0")
    with pytest.raises(ValueError, match="VLLM_FUSED_MOE_CHUNK_SIZE must be >= 1, got 0"):
        fused_moe(**_good(), backend="triton")


@CPU_ONLY
def test_stage_act_too_short():
    """A hand-built act buffer shorter than the padded slot bound is refused by both stages (the
    kernels would read past it, or take TMA's zero fill for rows)."""
    a = _good()
    r = kern.route(a["topk_ids"], 16, E)
    short = torch.empty(r.em - 1, I, dtype=torch.float16)
    cfg_up, cfg_down = kern.chunk_configs(3, a["w1"], a["w2"], TOPK, torch.float16, "none", None)
    msg = re.escape(f"act needs {r.em} rows (the padded slot bound), has {r.em - 1}")
    with pytest.raises(ValueError, match=msg):
        kern.up_stage(a["hidden"], a["w1"], short, r, TOPK, cfg_up)
    y = torch.empty(3 * TOPK, H, dtype=torch.float16)
    with pytest.raises(ValueError, match=msg):
        kern.down_stage(short, a["w2"], y, a["topk_weights"], r, cfg_down)
