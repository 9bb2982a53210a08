"""fp8_marlin_gemm on the GPU: the cuda and triton backends against the torch backend (fp32
reference cast to the dtype) over decode-to-prefill M and real and odd (N, K), per channel and per
group, bf16 and fp16, with and without prefetch; deterministic runs bitwise identical; the atomic
split-K reduction; tiny activations; strided, 3-D and empty x; ``out=``; CUDA-graph replay;
torch.compile; bad inputs. Every test is gpu-marked (skipped on CPU-only machines)."""

from __future__ import annotations

import pytest
import torch

from pykernels.quant import fp8_marlin_gemm
from tests.quant._cases import (  # noqa: F401
    CUDA_GROUP_TOL,
    TOL,
    close,
    make_weight,
    make_x,
    own_cache,
    poisoned,
)

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("own_cache")]

BACKENDS = ["cuda", "triton"]
BF16, FP16 = torch.bfloat16, torch.float16
MS = [1, 3, 16, 33, 64, 257, 1024]
# (N, K): a 4096 square, K % 128 == 64 (a half last panel), a small odd one, a Llama-3-70B MLP
# slice at tensor parallel 4 (28672 / 4 = 7168)
SHAPES = [(4096, 4096), (1024, 4160), (192, 320), (7168, 4096)]
# Every shape meets every M once; (dtype, group) pairs rotate over both, stages (tuned / 1 =
# prefetch off) alternate over M, so each pair runs with both: 28 cases a backend.
_COMBOS = [(BF16, -1), (FP16, 128), (BF16, 128), (FP16, -1)]
GRID = [(m, n, k, *_COMBOS[(i + j) % 4], (None, 1)[j % 2]) for i, (n, k) in enumerate(SHAPES)
        for j, m in enumerate(MS)]


def _tol(backend: str, dtype, group_size: int):
    return CUDA_GROUP_TOL[dtype] if backend == "cuda" and group_size == 128 else TOL[dtype]


def _weight(n, k, group_size):
    return make_weight(n, k, group_size, device="cuda")


def _want(x, p):
    return fp8_marlin_gemm(x, p.qweight, p.scales, backend="torch")


def _run(x, p, backend, **kw):
    out = poisoned(*x.shape[:-1], p.qweight.shape[1], dtype=x.dtype, device="cuda")
    got = fp8_marlin_gemm(x, p.qweight, p.scales, out=out, backend=backend, **kw)
    assert got is out
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m, n, k, dtype, group_size, stages", GRID)
def test_matches_reference(m, n, k, dtype, group_size, backend, stages):
    p = _weight(n, k, group_size)
    x = make_x(m, k, dtype, device="cuda")
    close(_run(x, p, backend, stages=stages), _want(x, p), _tol(backend, dtype, group_size))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("group_size", [-1, 128])
@pytest.mark.parametrize("m", [1, 33])
def test_deterministic_is_bitwise_identical(monkeypatch, m, group_size, backend):
    # Atomic split-K asked for by the env: deterministic must win over it.
    monkeypatch.setenv("VLLM_MARLIN_USE_ATOMIC_ADD", "1")
    p = _weight(4096, 4096, group_size)
    x = make_x(m, 4096, BF16, device="cuda")
    runs = [_run(x, p, backend, deterministic=True) for _ in range(3)]
    assert all(torch.equal(r, runs[0]) for r in runs[1:])
    close(runs[0], _want(x, p), _tol(backend, BF16, group_size))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("group_size", [-1, 128])
@pytest.mark.parametrize("m", [1, 16, 64])
def test_atomic_split_k(monkeypatch, m, group_size, backend):
    monkeypatch.setenv("VLLM_MARLIN_USE_ATOMIC_ADD", "1")
    p = _weight(1024, 4160, group_size)
    x = make_x(m, 4160, FP16, device="cuda")
    close(_run(x, p, backend), _want(x, p), _tol(backend, FP16, group_size))


# The CUDA kernel's wgmma path (config key `wgmma`) at every block_m and both block_n, per
# channel and per group, bf16 and fp16, a K % 128 == 64 tail, rows past M, split-K and prefetch
# off: its activations go to shared memory as two 128-byte-swizzled K-major halves read by the
# wgmma descriptor, so a wrong slot or a missed zero-fill shows as an error far above the
# tolerance, against the reference and against the mma.sync path.
_WG = [  # (block_n, block_m, dtype, group_size, m, k, splits, num_stages)
    (128, 8, BF16, -1, 1, 4096, 1, 4),
    (64, 16, FP16, 128, 13, 4160, 3, 1),
    (128, 32, BF16, 128, 33, 4096, 0, 3),
    (128, 64, FP16, -1, 64, 4160, 1, 4),
    (64, 64, BF16, -1, 100, 4096, 3, 1),
    (128, 16, FP16, 128, 16, 4160, 0, 3),
    (64, 8, BF16, 128, 3, 4096, 1, 4),
    (128, 64, FP16, -1, 257, 4160, 3, 1),
]


@pytest.mark.parametrize("bn, bm, dtype, group_size, m, k, splits, stages", _WG)
def test_cuda_wgmma(bn, bm, dtype, group_size, m, k, splits, stages):
    from pykernels.quant import cuda

    p = _weight(1024, k, group_size)
    x = make_x(m, k, dtype, device="cuda")
    cfg = {"block_n": bn, "block_m": bm, "splits": splits, "num_stages": stages}
    got, plain = (poisoned(m, 1024, dtype=dtype, device="cuda") for _ in range(2))
    cuda.gemm(x, p.qweight, p.scales, got, config={**cfg, "wgmma": True})
    cuda.gemm(x, p.qweight, p.scales, plain, config=cfg)
    close(got, _want(x, p), _tol("cuda", dtype, group_size))
    close(got, plain, _tol("cuda", dtype, group_size))


@pytest.mark.parametrize("atomic", [False, True])
@pytest.mark.parametrize("split_k", [2, 5])
def test_triton_split_k(monkeypatch, split_k, atomic):
    """The public op runs Triton at its tuned SPLIT_K (1 by default): force the split here."""
    from pykernels.quant import triton as tq

    monkeypatch.setenv("VLLM_MARLIN_USE_ATOMIC_ADD", "1" if atomic else "0")
    p = _weight(4096, 4160, 128)
    x = make_x(7, 4160, BF16, device="cuda")
    runs = []
    for _ in range(3):
        out = poisoned(7, 4096, dtype=BF16, device="cuda")
        tq.gemm(x, p.qweight, p.scales, out, config={"SPLIT_K": split_k})
        runs.append(out)
    close(runs[0], _want(x, p), TOL[BF16])
    if not atomic:
        assert all(torch.equal(r, runs[0]) for r in runs[1:])


@pytest.mark.parametrize("tma", [True, False])
@pytest.mark.parametrize("dtype", [BF16, FP16])
def test_wgmma_register_reuse(dtype, tma):
    """The tile that summed stale registers before PIN_ACC (pykernels/quant/triton.py): 64 x 256
    x 64, 3 stages, two programs an SM at M = 1024 (inf in 7% of the outputs on an H200)."""
    from pykernels.quant import triton as tq

    p = _weight(4096, 4096, -1)
    x = make_x(1024, 4096, dtype, device="cuda")
    cfg = {"BLOCK_N": 64, "BLOCK_M": 256, "BLOCK_K": 64, "SPLIT_K": 1, "num_warps": 4,
           "num_stages": 3, "TMA": tma}
    want = _want(x, p)
    for _ in range(3):
        out = poisoned(1024, 4096, dtype=dtype, device="cuda")
        tq.gemm(x, p.qweight, p.scales, out, config=cfg)
        close(out, want, TOL[dtype])


@pytest.mark.parametrize("group_size", [-1, 128])
@pytest.mark.parametrize("m, n, k", [(257, 192, 320), (33, 1024, 4160), (1, 7168, 4096),
                                     (1024, 320, 4160)])
@pytest.mark.parametrize("tma", [True, False])
def test_triton_tma_tiles(m, n, k, group_size, tma):
    """Tensor-memory-access tiles past M, N (the last panel) and K (a half panel) come back
    zero-filled; x one element off 16-byte alignment falls back to pointer loads."""
    from pykernels.quant import triton as tq

    p = _weight(n, k, group_size)
    aligned = make_x(m, k, BF16, device="cuda", nan_around=True)  # NaN past m and k
    off = make_x(m, k + 1, BF16, device="cuda", nan_around=True)[:, 1:]  # 2 bytes off
    for x in (aligned, off):
        out = poisoned(m, n, dtype=BF16, device="cuda")
        tq.gemm(x, p.qweight, p.scales, out,
                config={"TMA": tma, "BLOCK_M": 16 if m <= 16 else 64, "SPLIT_K": 1})
        close(out, _want(x, p), TOL[BF16])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("group_size", [-1, 128])
@pytest.mark.parametrize("dtype, x_scale", [(BF16, 1e-3), (BF16, 1e-7), (FP16, 1e-3)])
def test_tiny_activations(dtype, x_scale, group_size, backend):
    """The CUDA kernel accumulates bf16 weights times 2^-120 (the bias is undone in the epilogue):
    products of tiny activations land in fp32's subnormal range and must still come out right,
    relative to the output's own magnitude (close() would pass anything below 1)."""
    p = _weight(1024, 4160, group_size)
    x = (torch.randn(16, 4160, device="cuda") * x_scale).to(dtype)
    got, want = _run(x, p, backend).float(), _want(x, p).float()
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err < _tol(backend, dtype, group_size)[1], err


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [BF16, FP16])
def test_strided_and_3d_x(backend, dtype):
    p = _weight(1024, 4160, 128)
    x = make_x(33, 4160, dtype, device="cuda", strided=True)
    assert not x.is_contiguous() and x.stride(1) == 1
    tol = _tol(backend, dtype, 128)
    close(_run(x, p, backend), _want(x, p), tol)
    x3 = torch.randn(2, 5, 4160, device="cuda").to(dtype)
    got = _run(x3, p, backend)
    assert got.shape == (2, 5, p.qweight.shape[1])
    close(got, _want(x3, p), tol)


@pytest.mark.parametrize("backend", [*BACKENDS, "torch"])
def test_empty_m(backend):
    p = _weight(192, 320, -1)
    for shape in [(0, 320), (2, 0, 320)]:
        x = torch.randn(shape, device="cuda", dtype=BF16)
        got = fp8_marlin_gemm(x, p.qweight, p.scales, backend=backend)
        assert got.shape == (*shape[:-1], 192) and got.dtype == BF16


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_argument(backend):
    p = _weight(4096, 4096, -1)
    x = make_x(16, 4096, FP16, device="cuda")
    out = poisoned(16, 4096, dtype=FP16, device="cuda")
    assert fp8_marlin_gemm(x, p.qweight, p.scales, out=out, backend=backend) is out
    close(out, _want(x, p), TOL[FP16])
    y = fp8_marlin_gemm(x, p.qweight, p.scales, backend=backend)  # allocated
    assert y.shape == (16, 4096) and torch.equal(y, out)


@pytest.mark.parametrize("group_size", [-1, 128])
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_graph_replay(backend, group_size):
    p = _weight(4096, 4096, group_size)
    x = make_x(16, 4096, BF16, device="cuda")
    out = torch.empty(16, 4096, dtype=BF16, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compile, look up configs) off the capture
        fp8_marlin_gemm(x, p.qweight, p.scales, out=out, backend=backend)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fp8_marlin_gemm(x, p.qweight, p.scales, out=out, backend=backend)
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        eager = fp8_marlin_gemm(x, p.qweight, p.scales, backend=backend)
        assert torch.equal(out, eager)
        close(out, _want(x, p), _tol(backend, BF16, group_size))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    p = _weight(1024, 4160, -1)

    def f(x, qweight, scales):
        return fp8_marlin_gemm(x, qweight, scales, backend="cuda") * 2

    compiled = torch.compile(f, fullgraph=True)
    for m in (3, 16):
        x = make_x(m, 4160, BF16, device="cuda")
        # eager first: the backend module is imported (and memoized) outside the trace, as a
        # served model's warm-up does; dynamo cannot trace importlib
        want = f(x, p.qweight, p.scales)
        torch.testing.assert_close(compiled(x, p.qweight, p.scales), want, atol=0, rtol=0)


def _bad_cases():
    p = _weight(192, 320, -1)
    g = _weight(192, 320, 128)
    x = torch.randn(3, 320, device="cuda", dtype=BF16)
    return [
        ((x.float(), p.qweight, p.scales), TypeError,
         r"x must be bfloat16 or float16, got float32"),
        ((x[:, :256], p.qweight, p.scales), ValueError, r"x's last dimension K=256 .*qweight"),
        ((torch.randn(3, 448, device="cuda", dtype=BF16), p.qweight, p.scales), ValueError,
         r"x's last dimension K=448 .*qweight"),
        ((x, p.qweight, g.scales[:1]), ValueError, r"scales must be .*got shape \(1, 192\)"),
        ((x, p.qweight, p.scales[:64]), ValueError, r"scales must be .*got shape \(64,\)"),
        ((x, p.qweight, p.scales.cpu()), ValueError, r"scales must be on x's device"),
        ((x, p.qweight.cpu(), p.scales), ValueError, r"qweight must be on x's device"),
        ((x.cpu(), p.qweight, p.scales), ValueError, r"qweight must be on x's device"),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(8))
def test_bad_inputs(backend, case):
    args, err, msg = _bad_cases()[case]
    with pytest.raises(err, match=msg):
        fp8_marlin_gemm(*args, backend=backend)
