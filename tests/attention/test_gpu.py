"""Every attention backend against the reference on the GPU: a sampled grid of dtype x GQA ratio x
head_dim x page size over ragged lengths in random page order, options (soft cap, window, fp8,
strided q, prefixes), CUDA-graph capture of plan/run, opcheck and torch.compile of the ops.

The full cross product would compile hundreds of kernel variants; CASES rotates every factor
through its levels instead, so each level meets several others (~2 min on an H200)."""

from __future__ import annotations

import itertools

import pytest
import torch

from pykernels import attention
from pykernels.attention import PagedDecode, PagedPrefill, ref
from tests.attention._cases import TOL, Paged

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16]
HEADS = [(32, 8), (8, 8), (12, 2), (16, 1), (32, 4), (40, 8)]  # groups 4, 1, 6, 16, 8, 5
HEAD_DIMS = [128, 64, 256]
PAGES = [16, 1, 32, 64, 5]
KV_LENS = [1, 7, 16, 17, 1000, 4097, 0]
CASES = [(DTYPES[i % 2], HEADS[i % 6], HEAD_DIMS[i % 3], PAGES[i % 5]) for i in range(16)]
# FlashInfer JIT-compiles each new variant (head_dim, soft cap, window, fp8...) on first use,
# a minute or more each on a machine without its cache: those cases are marked slow, and
# `-m "gpu and not slow"` keeps FlashInfer to the anchor configuration (d=128, no options).
FI_SLOW = pytest.param("fi", marks=pytest.mark.slow)
DECODE_BACKENDS = ["triton", "cuda", FI_SLOW]
PREFILL_BACKENDS = ["triton", FI_SLOW]


def _ids(case):
    dt, (hq, hkv), d, ps = case
    return f"{str(dt)[6:]}-{hq}q{hkv}kv-d{d}-p{ps}"


def _available(backend):
    reason = attention.backends().get(backend)
    if reason is not None:
        pytest.skip(reason)


def _close(got, want, dtype, scale=1.0):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=atol * scale, rtol=rtol * scale)


def _decode(backend, p, q, **kw):
    out = torch.full_like(q, float("nan"))
    _run_or_skip_fi(backend, lambda: attention.paged_decode(q, p.cache, *p.table, out=out,
                                                            backend=backend, **kw))
    return out


def _run_or_skip_fi(backend, fn):
    """Runs fn; a FlashInfer error (a variant it does not build) skips, any other backend's
    error fails the test."""
    try:
        fn()
    except (RuntimeError, NotImplementedError) as err:
        if backend == "fi":
            pytest.skip(f"FlashInfer does not run this case: {err}")
        raise


@pytest.mark.parametrize("backend", DECODE_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_decode_grid(backend, case):
    _available(backend)
    dt, (hq, hkv), d, ps = case
    p = Paged(KV_LENS[::-1] if ps % 2 else KV_LENS, ps, hkv, d, dt, device="cuda")
    q = p.q(hq, d, dt)
    _close(_decode(backend, p, q), ref.decode_ref(q, p.cache, *p.table), dt)


@pytest.mark.parametrize("backend", ["fi", "triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(32, 8), (8, 8)])
@pytest.mark.parametrize("page_size", [16, 1])
def test_decode_anchor_config(backend, dtype, heads, page_size):
    """d=128 (FlashInfer's prebuilt/anchor variants), CUDA-core and tensor-core FI paths."""
    _available(backend)
    p = Paged(KV_LENS, page_size, heads[1], 128, dtype, device="cuda")
    q = p.q(heads[0], 128, dtype)
    _close(_decode(backend, p, q), ref.decode_ref(q, p.cache, *p.table), dtype)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("splits", [1, 2, 7, 64, 128])
def test_decode_forced_splits(backend, splits):
    _available(backend)
    p = Paged([1, 130, 4097, 0, 65], 16, 8, 128, torch.bfloat16, device="cuda")
    q = p.q(32, 128, torch.bfloat16)
    got = _decode(backend, p, q, config={"num_splits": splits})
    _close(got, ref.decode_ref(q, p.cache, *p.table), torch.bfloat16)


def test_triton_decode_merge_pdl(monkeypatch):
    """The merge launched early (programmatic dependent launch) waits for every split: the same
    bits as a plain launch, eagerly and replayed from a CUDA graph."""
    p = Paged([4097, 1, 300, 0], 16, 8, 128, torch.bfloat16, device="cuda", seed=3)
    q = p.q(32, 128, torch.bfloat16)
    cfg = {"num_splits": 16}
    got = _decode("triton", p, q, config=cfg)
    out = torch.empty_like(q)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        attention.paged_decode(q, p.cache, *p.table, out=out, backend="triton", config=cfg)
    out.fill_(float("nan"))
    graph.replay()
    monkeypatch.setenv("PYKERNELS_ENABLE_PDL", "0")
    plain = _decode("triton", p, q, config=cfg)
    torch.cuda.synchronize()
    assert torch.equal(got, plain) and torch.equal(out, plain)
    _close(got, ref.decode_ref(q, p.cache, *p.table), torch.bfloat16)


@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("head_dim,kv_dtype", [(64, None), (128, None), (256, None),
                                               (128, torch.float8_e4m3fn),
                                               (256, torch.float8_e4m3fn)])
def test_cuda_decode_stages(stages, head_dim, kv_dtype):
    """Both pipeline depths of the CUDA kernel (a tuning knob), 1 and 3 splits, GQA 6."""
    _available("cuda")
    p = Paged([1, 130, 4097, 0, 65], 16, 2, head_dim, torch.float16, device="cuda",
              kv_dtype=kv_dtype)
    q = p.q(12, head_dim, torch.float16, strided=True)
    want = ref.decode_ref(q, p.cache, *p.table)
    for splits in (1, 3):
        got = _decode("cuda", p, q, config={"num_splits": splits, "num_stages": stages})
        _close(got, want, torch.float16)


OPTIONS = [
    {"logits_soft_cap": 30.0, "sm_scale": 0.3},
    {"window_left": 100},
    {"window_left": 0},
    {"k_scale": 0.7, "v_scale": 1.3},
]


@pytest.mark.parametrize("backend", DECODE_BACKENDS)
@pytest.mark.parametrize("kw", OPTIONS, ids=lambda kw: ",".join(kw))
def test_decode_options(backend, kw):
    _available(backend)
    p = Paged([1, 333, 2048, 17], 16, 8, 128, torch.bfloat16, device="cuda")
    q = p.q(32, 128, torch.bfloat16, strided=True)
    _close(_decode(backend, p, q, **kw), ref.decode_ref(q, p.cache, *p.table, **kw),
           torch.bfloat16)


@pytest.mark.parametrize("backend", DECODE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_decode_fp8_cache(backend, dtype, head_dim):
    _available(backend)
    p = Paged([5, 1000, 17, 0], 16, 2, head_dim, dtype, device="cuda",
              kv_dtype=torch.float8_e4m3fn)
    q = p.q(8, head_dim, dtype)
    kw = {"k_scale": 0.25, "v_scale": 0.5}
    _close(_decode(backend, p, q, **kw), ref.decode_ref(q, p.cache, *p.table, **kw), dtype)


@pytest.mark.parametrize("backend", ["triton", "fi"])
@pytest.mark.parametrize("case", CASES[:8], ids=_ids)
def test_prefill_grid(backend, case):
    _available(backend)
    dt, (hq, hkv), d, ps = case
    if backend == "fi" and d != 128:
        pytest.skip("FlashInfer off the anchor head_dim: see test_prefill_options (slow)")
    # a full prompt, a prefix + chunk, a 1-token extension, an empty request, no new queries
    p = Paged([300, 1000, 17, 0, 40], ps, hkv, d, dt, device="cuda", q_lens=[300, 77, 1, 0, 0])
    q = p.q(hq, d, dt, strided=ps == 16)
    out = torch.full_like(q, float("nan"))
    _run_or_skip_fi(backend, lambda: attention.paged_prefill(q, p.cache, p.qo_indptr, *p.table,
                                                             out=out, backend=backend))
    _close(out, ref.prefill_ref(q, p.cache, p.qo_indptr, *p.table), dt)


@pytest.mark.parametrize("backend", PREFILL_BACKENDS)
@pytest.mark.parametrize("kw", [{"causal": False}, {"window_left": 64},
                                {"logits_soft_cap": 20.0}, {"k_scale": 0.5, "v_scale": 2.0}],
                         ids=lambda kw: ",".join(kw))
def test_prefill_options(backend, kw):
    _available(backend)
    p = Paged([500, 129], 16, 8, 128, torch.bfloat16, device="cuda", q_lens=[200, 129])
    q = p.q(32, 128, torch.bfloat16)
    got = attention.paged_prefill(q, p.cache, p.qo_indptr, *p.table, backend=backend, **kw)
    _close(got, ref.prefill_ref(q, p.cache, p.qo_indptr, *p.table, **kw), torch.bfloat16)


def test_prefill_fp8_cache_triton():
    p = Paged([300, 64], 16, 2, 128, torch.bfloat16, device="cuda", q_lens=[100, 64],
              kv_dtype=torch.float8_e4m3fn)
    q = p.q(8, 128, torch.bfloat16)
    got = attention.paged_prefill(q, p.cache, p.qo_indptr, *p.table, backend="triton",
                                  k_scale=0.3, v_scale=0.6)
    want = ref.prefill_ref(q, p.cache, p.qo_indptr, *p.table, k_scale=0.3, v_scale=0.6)
    _close(got, want, torch.bfloat16)


@pytest.mark.parametrize("backend", ["auto", "triton", "cuda", "fi", "torch"])
def test_empty_batch(backend):
    if backend != "auto":
        _available(backend)
    p = Paged([], 16, 8, 128, torch.bfloat16, device="cuda")
    q = p.q(32, 128, torch.bfloat16, rows=0)
    assert attention.paged_decode(q, p.cache, *p.table, backend=backend).shape == (0, 32, 128)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_append(backend, kv_dtype):
    _available(backend)
    p = Paged([40, 3, 17], 16, 8, 128, torch.bfloat16, device="cuda", kv_dtype=kv_dtype)
    qkv = torch.randn(5, 48, 128, dtype=torch.bfloat16, device="cuda")
    k, v = qkv[:, 32:40], qkv[:, 40:48]  # strided rows, as sliced from a fused projection
    slots = torch.tensor([0, 17, -1, 63, 100], device="cuda")
    want = p.cache.clone()
    ref.append_ref(k, v, want, slots, 0.5, 2.0)
    attention.append_paged_kv(k, v, p.cache, slots, k_scale=0.5, v_scale=2.0, backend=backend)
    assert torch.equal(p.cache.view(torch.uint8), want.view(torch.uint8))


STEPS = [[100, 3000, 1, 17], [4000, 16, 0, 900], [1, 1, 2000, 64]]


def _step(lens, seed, pool_pages=1024):
    spare = pool_pages - sum(-(-n // 16) for n in lens)  # every step fills the whole pool
    return Paged(lens, 16, 8, 128, torch.bfloat16, device="cuda", seed=seed, spare=spare)


@pytest.mark.parametrize("backend", ["triton", "cuda", "fi"])
def test_decode_cuda_graph_replans(backend):
    """Capture run once; re-plan with other lengths and page orders; replays stay correct."""
    _available(backend)
    dec = PagedDecode(32, 8, 128, 16, max_batch=4, max_pages=1024, backend=backend)
    first = _step(STEPS[0], 0)
    cache = first.cache.clone()
    q = torch.randn(4, 32, 128, dtype=torch.bfloat16, device="cuda")
    out = torch.empty_like(q)
    dec.plan(*first.table)
    dec.run(q, cache, out=out)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        dec.run(q, cache, out=out)
    for i, lens in enumerate(STEPS):
        step = _step(lens, 10 + i)
        cache.copy_(step.cache)
        q.copy_(torch.randn_like(q))
        out.fill_(float("nan"))
        dec.plan(*(t.cpu() for t in step.table))  # host tables: validated, copied in
        graph.replay()
        torch.cuda.synchronize()
        _close(out, ref.decode_ref(q, cache, *step.table), torch.bfloat16)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_plain_decode_in_cuda_graph(backend):
    """The way bench.attention times us: the plain function captured with device tables."""
    _available(backend)
    p = Paged([4096], 16, 8, 128, torch.bfloat16, device="cuda")
    q = p.q(32, 128, torch.bfloat16)
    out = torch.empty_like(q)
    attention.paged_decode(q, p.cache, *p.table, out=out, backend=backend)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(3):
            attention.paged_decode(q, p.cache, *p.table, out=out, backend=backend)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    _close(out, ref.decode_ref(q, p.cache, *p.table), torch.bfloat16)


@pytest.mark.parametrize("backend", ["triton"])
def test_prefill_cuda_graph(backend):
    pre = PagedPrefill(32, 8, 128, 16, max_batch=2, max_pages=256, max_tokens=512,
                       backend=backend)
    q = torch.randn(512, 32, 128, dtype=torch.bfloat16, device="cuda")
    out = torch.zeros_like(q)
    first = Paged([300, 200], 16, 8, 128, torch.bfloat16, device="cuda", q_lens=[300, 200])
    cache = torch.empty(256, 2, 16, 8, 128, dtype=torch.bfloat16, device="cuda")
    cache[:first.num_pages] = first.cache
    pre.plan(first.qo_indptr, *first.table, num_tokens=500)
    pre.run(q, cache, out=out)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        pre.run(q, cache, out=out)
    step = Paged([700, 100], 16, 8, 128, torch.bfloat16, device="cuda", q_lens=[50, 100])
    cache[:step.num_pages] = step.cache
    pre.plan(step.qo_indptr.cpu(), *(t.cpu() for t in step.table))
    graph.replay()
    torch.cuda.synchronize()
    want = ref.prefill_ref(q[:150], cache, step.qo_indptr, *step.table)
    _close(out[:150], want, torch.bfloat16)


def test_opcheck_and_compile():
    _available("cuda")
    import pykernels.attention.cuda  # noqa: F401  (loads the op library)

    p = Paged([33, 200], 16, 2, 128, torch.bfloat16, device="cuda")
    q = p.q(8, 128, torch.bfloat16)
    out = torch.empty_like(q)
    n = 2 * 8 * 4
    po = torch.empty(n * 128, device="cuda")
    plse = torch.empty(n, device="cuda")
    ctr = torch.zeros(2 * 8, dtype=torch.int32, device="cuda")
    args = (out, q, p.cache, *p.table, po, plse, ctr, 4, 0, 0.088, 0.0, -1, 1.0, 1.0)
    torch.library.opcheck(torch.ops.pykernels.paged_decode.default, args)
    k = torch.randn(3, 2, 128, dtype=torch.bfloat16, device="cuda")
    slots = torch.tensor([1, 5, 40], device="cuda")
    torch.library.opcheck(torch.ops.pykernels.append_paged_kv.default,
                          (k, k.clone(), p.cache, slots, 1.0, 1.0))

    def step(q, cache, out):
        torch.ops.pykernels.paged_decode(out, q, cache, *p.table, po, plse, ctr, 4, 2, 0.088,
                                         0.0, -1, 1.0, 1.0)
        return out * 2

    got = torch.compile(step, fullgraph=True)(q, p.cache, out)
    _close(got, 2 * ref.decode_ref(q, p.cache, *p.table, sm_scale=0.088), torch.bfloat16, 2)


def test_cuda_launcher_checks():
    _available("cuda")
    import pykernels.attention.cuda  # noqa: F401

    p = Paged([20], 16, 2, 128, torch.bfloat16, device="cuda")
    q = p.q(8, 128, torch.bfloat16)
    e = torch.empty(0, device="cuda")
    decode = torch.ops.pykernels.paged_decode
    with pytest.raises(TypeError, match="kv_indptr must be int32"):
        decode(torch.empty_like(q), q, p.cache, p.kv_indptr.long(), p.kv_indices,
               p.kv_last_page_len, e, e, e, 1, 0, 1.0, 0.0, -1, 1.0, 1.0)
    with pytest.raises(ValueError, match="partial_o must be contiguous with >="):
        decode(torch.empty_like(q), q, p.cache, *p.table, e, e, e, 4, 0, 1.0, 0.0, -1, 1.0, 1.0)
    with pytest.raises(ValueError, match="num_splits must be in 1..64"):
        decode(torch.empty_like(q), q, p.cache, *p.table, e, e, e, 65, 0, 1.0, 0.0, -1, 1.0, 1.0)
    with pytest.raises(ValueError, match="num_stages must be 0 \\(default\\), 2 or 3, got 4"):
        decode(torch.empty_like(q), q, p.cache, *p.table, e, e, e, 1, 4, 1.0, 0.0, -1, 1.0, 1.0)
    with pytest.raises(ValueError, match="kv_cache must have layout"):
        decode(torch.empty_like(q), q, p.cache[:, 0], *p.table, e, e, e, 1, 0, 1.0, 0.0, -1, 1.0,
               1.0)


def test_all_levels_covered():
    """The rotation meets every level of every factor (guards edits of the lists above)."""
    for i, levels in enumerate((DTYPES, HEADS, HEAD_DIMS, PAGES)):
        assert {c[i] for c in CASES} == set(levels)
    assert len(set(itertools.product(*[[c[i] for c in CASES] for i in range(2)]))) > 1
