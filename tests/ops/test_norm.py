"""rms_norm and fused_add_rms_norm: every backend against the fp32 reference; bad inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pykernels
from pykernels.norm.ref import fused_add_rms_norm_ref, rms_norm_ref

# (atol, rtol) against the fp32 reference: one rounding to the dtype; fp32 sums reordered.
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 2e-3),
    torch.bfloat16: (1e-2, 1.6e-2),
}
GPU_BACKENDS = ["cuda", "triton", "torch"]
# 1..199 odd/tiny; 4096/5120/8192 models; 16392 > Triton's one-pass block; 70001 > the CUDA
# kernel's register cache (re-read path), odd so the scalar path runs too.
HIDDEN = [1, 7, 111, 128, 199, 4096, 5120, 8192, 16392, 70001]
ROWS = [1, 3, 257]
EPS = 1e-6


def _inputs(rows, hidden, dtype, device="cuda"):
    x = torch.randn(rows, hidden, dtype=dtype, device=device)
    w = torch.randn(hidden, dtype=dtype, device=device)
    return x, w


def _check_rms(backend, x, w):
    out = torch.full(x.shape, float("nan"), dtype=x.dtype, device=x.device)
    assert pykernels.rms_norm(x, w, EPS, out=out, backend=backend) is out
    atol, rtol = TOL[x.dtype]
    torch.testing.assert_close(out.float(), rms_norm_ref(x.float(), w.float(), EPS),
                               atol=atol, rtol=rtol)


def _check_fused(backend, x, r, w):
    normed, summed = fused_add_rms_norm_ref(x, r, w, EPS)  # sum rounded like the kernels
    x0 = x.clone()
    got_x, got_r = pykernels.fused_add_rms_norm(x, r, w, EPS, backend=backend)
    assert got_x is x and got_r is r
    atol, rtol = TOL[x.dtype]
    # The stored sum is one rounding of an exact fp32 add: identical across backends.
    torch.testing.assert_close(r, summed, atol=0, rtol=0)
    torch.testing.assert_close(x.float(), rms_norm_ref(summed.float(), w.float(), EPS),
                               atol=atol, rtol=rtol)
    assert not torch.equal(x, x0) or x.numel() == 0


def test_reference_matches_torch_rms_norm_float64():
    x = torch.randn(4, 37, dtype=torch.float64)
    w = torch.randn(37, dtype=torch.float64)
    expected = F.rms_norm(x, (37,), w, EPS)
    torch.testing.assert_close(rms_norm_ref(x.float(), w.float(), EPS).double(), expected,
                               atol=1e-6, rtol=1e-6)
    normed, summed = fused_add_rms_norm_ref(x, x, w, EPS)
    torch.testing.assert_close(summed, 2 * x)
    torch.testing.assert_close(normed.double(), F.rms_norm(2 * x, (37,), w, EPS),
                               atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("hidden", [1, 7, 64, 111])
def test_triton_interpreter_cpu(dtype, hidden):
    if torch.cuda.is_available():
        pytest.skip("interpreter test is for CPU-only machines; the gpu tests cover triton")
    x, w = _inputs(3, hidden, dtype, "cpu")
    _check_rms("triton", x, w)
    _check_fused("triton", x, torch.randn_like(x), w)


def test_triton_interpreter_row_slice():
    if torch.cuda.is_available():
        pytest.skip("CPU-only interpreter test")
    big = torch.randn(5, 100, dtype=torch.float32)
    w = torch.randn(37, dtype=torch.float32)
    _check_rms("triton", big[:, 3:40], w)  # input rows strided, out contiguous
    _check_fused("triton", big[:, 3:40], torch.randn(5, 60)[:, 10:47], w)


def test_triton_interpreter_multi_pass():
    if torch.cuda.is_available():
        pytest.skip("CPU-only interpreter test")
    from pykernels.norm import triton as norm_triton

    x, w = _inputs(3, 100, torch.float32, "cpu")
    out = torch.full_like(x, float("nan"))
    norm_triton.rms_norm(out, x, w, EPS, config={"BLOCK": 32, "num_warps": 1})
    torch.testing.assert_close(out, rms_norm_ref(x, w, EPS), atol=1e-5, rtol=1e-5)
    r = torch.randn_like(x)
    normed, summed = fused_add_rms_norm_ref(x, r, w, EPS)
    norm_triton.fused_add_rms_norm(x, r, w, EPS, config={"BLOCK": 32, "num_warps": 1})
    torch.testing.assert_close(r, summed)
    torch.testing.assert_close(x, normed, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("rows", ROWS)
def test_rms_norm_matches_reference(backend, dtype, hidden, rows):
    _check_rms(backend, *_inputs(rows, hidden, dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("rows", ROWS)
def test_fused_add_rms_norm_matches_reference(backend, dtype, hidden, rows):
    x, w = _inputs(rows, hidden, dtype)
    _check_fused(backend, x, torch.randn_like(x), w)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_strided_rows(backend):
    big = torch.randn(33, 5000, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(4096, dtype=torch.bfloat16, device="cuda")
    _check_rms(backend, big[:, 8 : 8 + 4096], w)  # row slice, aligned
    _check_rms(backend, big[:, 3 : 3 + 4096], w)  # misaligned: scalar path
    x3 = torch.randn(2, 7, 4096, dtype=torch.bfloat16, device="cuda")
    _check_rms(backend, x3, w)
    _check_rms(backend, x3.transpose(0, 1), w)  # rows do not flatten: input copied
    resid_big = torch.randn(33, 5000, dtype=torch.bfloat16, device="cuda")
    _check_fused(backend, big[:, 8 : 8 + 4096], resid_big[:, 16 : 16 + 4096], w)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", *GPU_BACKENDS])
def test_empty_batch(backend):
    x, w = _inputs(0, 4096, torch.bfloat16)
    assert pykernels.rms_norm(x, w, backend=backend).shape == (0, 4096)
    r = torch.empty_like(x)
    assert pykernels.fused_add_rms_norm(x, r, w, backend=backend)[0].shape == (0, 4096)


@pytest.mark.gpu
def test_opcheck():
    import pykernels.norm.cuda  # noqa: F401  (loads the op library)

    for hidden in (111, 4096):
        x, w = _inputs(5, hidden, torch.bfloat16)
        out = torch.empty_like(x)
        torch.library.opcheck(torch.ops.pykernels.rms_norm.default, (out, x, w, EPS))
        r = torch.randn_like(x)
        torch.library.opcheck(torch.ops.pykernels.fused_add_rms_norm.default, (x, r, w, EPS))


@pytest.mark.gpu
def test_torch_compile_fullgraph():
    def block_end(h, resid, w):
        h, resid = pykernels.fused_add_rms_norm(h, resid, w, backend="cuda")
        return pykernels.rms_norm(h * 2, w, backend="cuda"), resid

    x, w = _inputs(8, 1024, torch.bfloat16)
    r = torch.randn_like(x)
    expected = block_end(x.clone(), r.clone(), w)
    compiled = torch.compile(block_end, fullgraph=True)
    got = compiled(x.clone(), r.clone(), w)
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])


@pytest.mark.gpu
def test_cuda_graph_capture():
    x, w = _inputs(16, 2048, torch.bfloat16)
    r = torch.randn_like(x)
    pykernels.fused_add_rms_norm(x.clone(), r.clone(), w, backend="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        pykernels.fused_add_rms_norm(x, r, w, backend="cuda")
    x.copy_(torch.randn_like(x))
    r.copy_(torch.randn_like(r))
    normed, summed = fused_add_rms_norm_ref(x, r, w, EPS)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(r, summed, atol=0, rtol=0)
    torch.testing.assert_close(x.float(), normed.float(), atol=1e-2, rtol=1.6e-2)


# ---- bad inputs ---------------------------------------------------------------------------------
def test_bad_weight():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\), got \(7,\)"):
        pykernels.rms_norm(x, torch.ones(7))
    with pytest.raises(TypeError, match="weight must be float32, got float16"):
        pykernels.rms_norm(x, torch.ones(8, dtype=torch.float16))
    with pytest.raises(ValueError, match="weight must be contiguous"):
        pykernels.rms_norm(x, torch.ones(16)[::2])


def test_bad_x_and_residual():
    with pytest.raises(TypeError, match="x must be bfloat16 or float16 or float32, got int64"):
        pykernels.rms_norm(torch.ones(2, 8, dtype=torch.long), torch.ones(8))
    with pytest.raises(ValueError, match="x must have a contiguous last dimension"):
        pykernels.rms_norm(torch.randn(8, 4).t(), torch.ones(8))
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"residual must have shape \(2, 8\), got \(3, 8\)"):
        pykernels.fused_add_rms_norm(x, torch.randn(3, 8), torch.ones(8))
    bad_rows = torch.randn(4, 3, 8).transpose(0, 1)[:, :2]  # written in place, cannot flatten
    with pytest.raises(ValueError, match="x is written in place"):
        pykernels.fused_add_rms_norm(bad_rows, torch.randn(3, 2, 8), torch.ones(8))


@pytest.mark.gpu
def test_device_mismatch():
    x = torch.randn(2, 8, device="cuda")
    with pytest.raises(ValueError, match="weight must be on x's device cuda:0, got cpu"):
        pykernels.rms_norm(x, torch.ones(8))
