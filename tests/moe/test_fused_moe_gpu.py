"""fused_moe on the GPU: the bench shapes, odd sizes and tuner tiles (TMA weight tiles included)
against the fp32 reference; fp8 w8a8, expert maps with chunking and in place, non-contiguous
hidden states, the backends at a bench shape and CUDA-graph replay."""

from __future__ import annotations

import contextlib
import os
import tempfile

import pytest
import torch

from pykernels._backends import tma_ready
from pykernels.moe import fused_moe, quant, ref
from tests.moe._fused_cases import (
    FP8_TOL,
    TOL,
    _own_cache,  # noqa: F401 (an autouse fixture)
    check,
    check_fp8,
    close,
    gpu,
    make_routing,
    make_weights,
    quantize_weight,
    routing_with_counts,
    run,
)

# (E, topk, H, I): the bench presets (Mixtral-8x7B, Qwen3-30B-A3B, DeepSeek-V3-style).
MODELS = {"mixtral": (8, 2, 4096, 14336), "qwen3-30b-a3b": (128, 8, 2048, 768),
          "deepseek-v3": (256, 8, 7168, 2048)}
_WEIGHTS: dict = {}


_BIG = 8 << 30  # bytes of weights above which pytest workers take turns


def gpu_weights(E, H, I, dtype=torch.bfloat16):  # noqa: E741
    """One model's weights at a time (DeepSeek's are 22 GB in bf16)."""
    key = (E, H, I, dtype)
    if key not in _WEIGHTS:
        _WEIGHTS.clear()
        torch.cuda.empty_cache()
        _WEIGHTS[key] = make_weights(E, H, I, dtype, "cuda")
    return _WEIGHTS[key]


@contextlib.contextmanager
def weights_turn(E, H, I, dtype=torch.bfloat16):  # noqa: E741
    """gpu_weights, but weights over 8 GB are held by one pytest worker at a time (a file lock)
    and freed after the test: four workers each holding DeepSeek's 22 GB ran an 80 GB H100 out
    of memory."""
    if 3 * E * H * I * dtype.itemsize <= _BIG:
        yield gpu_weights(E, H, I, dtype)
        return
    from filelock import FileLock  # a torch dependency

    with FileLock(os.path.join(tempfile.gettempdir(), "pykernels-test-big-weights.lock")):
        try:
            yield gpu_weights(E, H, I, dtype)
        finally:
            _WEIGHTS.clear()
            torch.cuda.empty_cache()


@gpu
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("m", [1, 16, 64, 256, 1024])
def test_gpu_bench_shapes(model, m):
    E_, k, h, i = MODELS[model]
    with weights_turn(E_, h, i) as (w1, w2):
        tw, ti = make_routing(m, E_, k, "cuda")
        check(torch.randn(m, h, device="cuda").bfloat16(), w1, w2, tw, ti)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("E_, k, h, i, m", [(8, 2, 1000, 333, 7), (8, 2, 1000, 333, 333),
                                            (60, 4, 2048, 1408, 333), (16, 1, 576, 200, 257),
                                            (64, 6, 1024, 352, 1)])
def test_gpu_odd_sizes(dtype, E_, k, h, i, m):
    w1, w2 = make_weights(E_, h, i, dtype, "cuda")
    tw, ti = make_routing(m, E_, k, "cuda")
    check(torch.randn(m, h, device="cuda").to(dtype), w1, w2, tw, ti)


# Tiles the tuner may pick, each at an odd shape: small/large M blocks, deep K, grouping, 8 warps,
# prefetch off (num_stages 1), separate up/down configs.
GPU_CONFIGS = [
    {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 16, "BLOCK_SIZE_K": 256, "num_stages": 2},
    {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 64, "num_warps": 8,
     "num_stages": 5},
    {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 128, "GROUP_SIZE_M": 16,
     "num_stages": 1},
    {"BLOCK_SIZE_M": 128, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 16,
     "num_warps": 8, "num_stages": 3},
    {"up": {"BLOCK_SIZE_M": 32, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 128, "num_stages": 3},
     "down": {"BLOCK_SIZE_N": 256, "BLOCK_SIZE_K": 64, "num_warps": 8, "num_stages": 3}},
]


@gpu
@pytest.mark.parametrize("config", GPU_CONFIGS)
@pytest.mark.parametrize("m", [5, 600])
def test_gpu_configs(config, m):
    w1, w2 = make_weights(8, 1000, 333, torch.bfloat16, "cuda")
    tw, ti = make_routing(m, 8, 2, "cuda")
    check(torch.randn(m, 1000, device="cuda").bfloat16(), w1, w2, tw, ti, config=config)


TMA_CONFIGS = [  # weight tiles by TMA: decode (mma.sync), wgmma tiles, split up/down configs
    {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 256, "num_stages": 3, "TMA": True},
    {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 16,
     "num_stages": 4, "TMA": True},
    {"up": {"BLOCK_SIZE_M": 128, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 16,
            "num_warps": 8, "num_stages": 3, "TMA": True},
     "down": {"BLOCK_SIZE_N": 256, "BLOCK_SIZE_K": 64, "num_warps": 8, "num_stages": 3,
              "TMA": True}},
]


@gpu
@pytest.mark.parametrize("config", TMA_CONFIGS)
@pytest.mark.parametrize("m", [5, 600])
def test_gpu_tma(config, m):
    """H = 1016 and I = 344 keep TMA's 16-byte strides but leave K tails (1016 = 15 x 64 + 56)
    and N tails (344 rows of gate and of up, 2.7 x 128): the descriptor's zero fill must not
    leak the next expert's or the up half's rows."""
    h, i = 1016, 344
    w1, w2 = make_weights(8, h, i, torch.bfloat16, "cuda")
    assert tma_ready(w1) and tma_ready(w2)  # the TMA path is the one under test
    tw, ti = make_routing(m, 8, 2, "cuda")
    check(torch.randn(m, h, device="cuda").bfloat16(), w1, w2, tw, ti, config=config)


# Per expert at 128-row blocks: half a block exactly (half tile), one row more (full), a block
# and one row (full, half), a block and 64 (full, half), none, one row, 127 rows, two blocks.
GPU_HALF_TAIL_COUNTS = [64, 65, 129, 192, 0, 1, 127, 256]


@gpu
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("tma", [False, True])
def test_gpu_half_tail(fp8, tma):
    """Blocks padded past their middle row as half-height tiles (wgmma 64-row tiles, the act
    rows of GEMM 2 by a half-height TMA box): the same bits as full tiles (each row's sum runs
    over the same K steps and wgmma shapes), and bf16 against the reference (fp8 full tiles
    against theirs: test_gpu_fp8)."""
    h, i = 1016, 344  # K and N tails, as test_gpu_tma
    tw, ti = routing_with_counts(GPU_HALF_TAIL_COUNTS, "cuda")
    wf1, wf2 = make_weights(len(GPU_HALF_TAIL_COUNTS), h, i, torch.float32 if fp8 else
                            torch.bfloat16, "cuda")
    x = torch.randn(ti.shape[0], h, device="cuda").bfloat16()
    config = {"BLOCK_SIZE_M": 128, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 64, "num_warps": 8,
              "num_stages": 3, "TMA": tma}
    w1, w2, kw = wf1, wf2, {}
    if fp8:
        (w1, s1), (w2, s2) = quantize_weight(wf1, True), quantize_weight(wf2, True)
        kw = dict(use_fp8_w8a8=True, per_channel_quant=True, w1_scale=s1, w2_scale=s2)
    got = run(x, w1, w2, tw, ti, "triton", config={**config, "HALF_TAIL": True}, **kw)
    full = run(x, w1, w2, tw, ti, "triton", config={**config, "HALF_TAIL": False}, **kw)
    assert torch.equal(got, full)
    if not fp8:
        close(got, ref.fused_moe(x, w1, w2, tw, ti, act_dtype=x.dtype), TOL[x.dtype])


@gpu
@pytest.mark.parametrize("per_channel", [False, True])
def test_gpu_fp8_tma_matches_cp_async(per_channel):
    """fp8 weights by TMA: the same bits as the same tile loaded by cp.async (one dynamic
    quantization of the activations; a reference comparison flips an fp8 bin in 2-3 of 340K
    outputs at this tile, beyond FP8_TOL)."""
    E_, k, h, i, m = 8, 2, 1024, 1536, 333
    wf1, wf2 = make_weights(E_, h, i, torch.float32, "cuda")
    (w1, s1), (w2, s2) = quantize_weight(wf1, per_channel), quantize_weight(wf2, per_channel)
    x = torch.randn(m, h, device="cuda").bfloat16()
    tw, ti = make_routing(m, E_, k, "cuda")
    kw = dict(use_fp8_w8a8=True, per_channel_quant=per_channel, w1_scale=s1, w2_scale=s2)
    config = {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 128, "num_stages": 3}
    got = run(x, w1, w2, tw, ti, "triton", config={**config, "TMA": True}, **kw)
    want = run(x, w1, w2, tw, ti, "triton", config={**config, "TMA": False}, **kw)
    assert torch.equal(got, want)


@gpu
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("m", [1, 64, 333])
def test_gpu_fp8(per_channel, static, m):
    wf1, wf2 = make_weights(8, 1024, 1536, torch.float32, "cuda")
    x = torch.randn(m, 1024, device="cuda").bfloat16()
    check_fp8(x, wf1, wf2, 8, 2, per_channel, static, a2=0.02)


@gpu
def test_gpu_quantize_fp8_matches_torch():
    """Bit-exact: both divide with round-to-nearest and round to fp8 to nearest even."""
    for rows, cols in [(1, 7), (333, 2048), (5, 14336), (3, 20000)]:  # one pass, then two
        x = torch.randn(rows, cols, device="cuda").bfloat16() * 3
        x[0] = 0
        q, s = quant.quantize_fp8(x)
        want_q, want_s = quant.quantize_fp8_torch(x)
        assert torch.equal(s, want_s) and torch.equal(q.float(), want_q.float())
        a_scale = torch.tensor([0.01], device="cuda")
        q, s = quant.quantize_fp8(x[1:], a_scale)
        assert torch.equal(q.float(), quant.quantize_fp8_torch(x[1:], a_scale)[0].float())


@gpu
def test_gpu_expert_map_chunking_inplace(monkeypatch):
    monkeypatch.setenv("VLLM_FUSED_MOE_CHUNK_SIZE", "64")
    w1, w2 = make_weights(6, 1024, 384, torch.bfloat16, "cuda")
    expert_map = torch.full((16,), -1, dtype=torch.int32, device="cuda")
    expert_map[torch.tensor([1, 4, 5, 9, 12, 15])] = torch.arange(6, dtype=torch.int32,
                                                                  device="cuda")
    x = torch.randn(333, 1024, device="cuda").bfloat16()
    tw, ti = make_routing(333, 16, 4, "cuda")
    check(x, w1, w2, tw, ti, expert_map=expert_map)
    want = ref.fused_moe(x, w1, w2, tw, ti, expert_map=expert_map, act_dtype=x.dtype)
    assert fused_moe(x, w1, w2, tw, ti, expert_map=expert_map, inplace=True) is x
    close(x, want, TOL[torch.bfloat16])


@gpu
def test_gpu_non_contiguous_hidden():
    w1, w2 = make_weights(8, 1024, 512, torch.bfloat16, "cuda")
    tw, ti = make_routing(100, 8, 2, "cuda")
    big = torch.randn(120, 1300, device="cuda").bfloat16()
    check(big[10:110, 100:1124], w1, w2, tw, ti)  # strided rows
    check(torch.randn(1024, 100, device="cuda").bfloat16().t(), w1, w2, tw, ti)  # copied


@gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gpu_backends_bench_shape(backend):
    E_, k, h, i = MODELS["qwen3-30b-a3b"]
    w1, w2 = gpu_weights(E_, h, i)
    tw, ti = make_routing(64, E_, k, "cuda")
    check(torch.randn(64, h, device="cuda").bfloat16(), w1, w2, tw, ti, backend)


@gpu
@pytest.mark.parametrize("fp8", [False, True])
def test_gpu_cuda_graph(fp8):
    """Capture once (align included), replay on new tokens and new routing."""
    E_, k, h, i, m = 16, 4, 1024, 512, 48
    w1, w2 = make_weights(E_, h, i, torch.bfloat16, "cuda")
    kw = {}
    if fp8:
        (w1, s1), (w2, s2) = quantize_weight(w1, False), quantize_weight(w2, False)
        kw = dict(use_fp8_w8a8=True, w1_scale=s1, w2_scale=s2)
    x = torch.randn(m, h, device="cuda").bfloat16()
    tw, ti = make_routing(m, E_, k, "cuda")
    out = torch.empty_like(x)
    fused_moe(x, w1, w2, tw, ti, out=out, **kw)  # compile, look up configs, warm up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fused_moe(x, w1, w2, tw, ti, out=out, **kw)
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        new_w, new_ids = make_routing(m, E_, k, "cuda")
        tw.copy_(new_w)
        ti.copy_(new_ids)
        out.fill_(float("nan"))
        graph.replay()
        want = ref.fused_moe(x, w1, w2, tw, ti, act_dtype=x.dtype,
                             **({"w1_scale": s1, "w2_scale": s2} if fp8 else {}))
        close(out, want, FP8_TOL if fp8 else TOL[torch.bfloat16])


@gpu
@pytest.mark.parametrize("m", [1, 333])
def test_gpu_pdl_matches_plain_launch(monkeypatch, m):
    """GEMM 1, GEMM 2 and the top-k sum launched early (programmatic dependent launch) wait for
    the kernel before them: the same bits as plain launches, eagerly and replayed from a CUDA
    graph with new inputs, back to back (a replay's GEMM 1 overwrites act while nothing may still
    read it)."""
    E_, k, h, i = 16, 4, 1024, 512
    w1, w2 = make_weights(E_, h, i, torch.bfloat16, "cuda")
    x = torch.randn(m, h, device="cuda").bfloat16()
    tw, ti = make_routing(m, E_, k, "cuda")
    monkeypatch.setenv("PYKERNELS_ENABLE_PDL", "1")
    out = torch.empty_like(x)
    fused_moe(x, w1, w2, tw, ti, out=out)  # compile, look up configs, warm up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fused_moe(x, w1, w2, tw, ti, out=out)
    inputs = [(torch.randn_like(x), *make_routing(m, E_, k, "cuda")) for _ in range(3)]
    replayed = []
    for xi, wi, ii in inputs:
        x.copy_(xi)
        tw.copy_(wi)
        ti.copy_(ii)
        out.fill_(float("nan"))
        graph.replay()
        replayed.append(out.clone())
    eager = [fused_moe(xi, w1, w2, wi, ii) for xi, wi, ii in inputs]
    monkeypatch.setenv("PYKERNELS_ENABLE_PDL", "0")
    plain = [fused_moe(xi, w1, w2, wi, ii) for xi, wi, ii in inputs]
    torch.cuda.synchronize()
    for got_graph, got_eager, want, (xi, wi, ii) in zip(replayed, eager, plain, inputs):
        assert torch.equal(got_graph, want) and torch.equal(got_eager, want)
        close(want, ref.fused_moe(xi, w1, w2, wi, ii, act_dtype=x.dtype), TOL[torch.bfloat16])
