"""silu_and_mul: every backend against the fp32 reference; bad inputs raise named errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pykernels
from pykernels.activation.ref import silu_and_mul_ref

# (atol, rtol) of a backend's output against the fp32 reference: one rounding to the dtype
# (bf16 keeps 8 bits, fp16 11) plus __expf's few-ulp error in fp32.
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 2e-3),
    torch.bfloat16: (1e-2, 1.6e-2),
}
GPU_BACKENDS = ["cuda", "triton", "torch"]
WIDTHS = [1, 7, 64, 111, 199, 384, 4097, 14336]  # d: odd, aligned, model sizes
ROWS = [1, 3, 257]


def _ref_fp32(x: torch.Tensor) -> torch.Tensor:
    return silu_and_mul_ref(x.float())


def _check(backend: str, x: torch.Tensor) -> None:
    d = x.shape[-1] // 2
    out = torch.full((*x.shape[:-1], d), float("nan"), dtype=x.dtype, device=x.device)
    got = pykernels.silu_and_mul(x, out=out, backend=backend)
    assert got is out
    atol, rtol = TOL[x.dtype]
    torch.testing.assert_close(out.float(), _ref_fp32(x), atol=atol, rtol=rtol)


def test_reference_matches_float64_formula():
    x = torch.randn(5, 2 * 33, dtype=torch.float64)
    expected = x[:, :33] * torch.sigmoid(x[:, :33]) * x[:, 33:]
    torch.testing.assert_close(silu_and_mul_ref(x), expected)
    torch.testing.assert_close(silu_and_mul_ref(x.float()).double(), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("d", [1, 7, 64, 111])
def test_triton_interpreter_cpu(dtype, d):
    if torch.cuda.is_available():
        pytest.skip("interpreter test is for CPU-only machines; the gpu tests cover triton")
    _check("triton", torch.randn(3, 2 * d, dtype=dtype))


def test_triton_interpreter_row_slice():
    if torch.cuda.is_available():
        pytest.skip("CPU-only interpreter test")
    big = torch.randn(4, 100, dtype=torch.float32)
    _check("triton", big[:, :38])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("d", WIDTHS)
@pytest.mark.parametrize("rows", ROWS)
def test_backend_matches_reference(backend, dtype, d, rows):
    _check(backend, torch.randn(rows, 2 * d, dtype=dtype, device="cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_strided_and_batched_inputs(backend):
    big = torch.randn(9, 3000, dtype=torch.bfloat16, device="cuda")
    _check(backend, big[:, 8 : 8 + 2 * 1024])  # row slice, 16-byte aligned
    _check(backend, big[:, 1 : 1 + 2 * 1024])  # row slice, misaligned start: scalar path
    _check(backend, torch.randn(2, 5, 2 * 77, dtype=torch.float16, device="cuda"))  # 3-D
    x = torch.randn(6, 4, 2 * 64, dtype=torch.bfloat16, device="cuda").transpose(0, 1)
    _check(backend, x)  # leading dims not flattenable: copied


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", *GPU_BACKENDS])
def test_empty_batch(backend):
    x = torch.randn(0, 2 * 128, dtype=torch.bfloat16, device="cuda")
    assert pykernels.silu_and_mul(x, backend=backend).shape == (0, 128)


@pytest.mark.gpu
def test_auto_uses_fastest_and_cpu_uses_torch():
    from pykernels.activation import _FAMILY

    assert _FAMILY.get("auto", torch.device("cuda")).__name__ == "pykernels.activation.triton"
    assert _FAMILY.get("auto", torch.device("cpu")).__name__ == "pykernels.activation.ref"


@pytest.mark.gpu
def test_opcheck():
    import pykernels.activation.cuda  # noqa: F401  (loads the op library)

    for d in (7, 128):
        x = torch.randn(5, 2 * d, dtype=torch.bfloat16, device="cuda")
        out = torch.empty(5, d, dtype=torch.bfloat16, device="cuda")
        torch.library.opcheck(torch.ops.pykernels.silu_and_mul.default, (out, x))


@pytest.mark.gpu
def test_torch_compile_fullgraph():
    def mlp_act(h):
        return pykernels.silu_and_mul(h, backend="cuda") * 2

    x = torch.randn(8, 2 * 256, dtype=torch.bfloat16, device="cuda")
    mlp_act(x)  # resolve the backend once eagerly
    compiled = torch.compile(mlp_act, fullgraph=True)
    torch.testing.assert_close(compiled(x), mlp_act(x))


@pytest.mark.gpu
def test_cuda_graph_capture():
    x = torch.randn(16, 2 * 512, dtype=torch.bfloat16, device="cuda")
    out = torch.empty(16, 512, dtype=torch.bfloat16, device="cuda")
    pykernels.silu_and_mul(x, out=out, backend="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        pykernels.silu_and_mul(x, out=out, backend="cuda")
    x.copy_(torch.randn_like(x))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out.float(), _ref_fp32(x), atol=1e-2, rtol=1.6e-2)


# ---- bad inputs ---------------------------------------------------------------------------------
def test_bad_dtype():
    with pytest.raises(TypeError, match="x must be bfloat16 or float16 or float32, got int32"):
        pykernels.silu_and_mul(torch.ones(2, 4, dtype=torch.int32))


def test_odd_width():
    with pytest.raises(ValueError, match="must be even, got 7"):
        pykernels.silu_and_mul(torch.randn(2, 7))


def test_non_contiguous_last_dim():
    with pytest.raises(ValueError, match="x must have a contiguous last dimension"):
        pykernels.silu_and_mul(torch.randn(8, 4).t())


def test_bad_out():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"out must have shape \(2, 4\), got \(2, 8\)"):
        pykernels.silu_and_mul(x, out=torch.empty(2, 8))
    with pytest.raises(TypeError, match="out must be float32, got float16"):
        pykernels.silu_and_mul(x, out=torch.empty(2, 4, dtype=torch.float16))
    out = torch.empty(4, 3, 4).transpose(0, 1)[:, :2]  # [3, 2, 4] whose rows do not flatten
    with pytest.raises(ValueError, match="out is written in place"):
        pykernels.silu_and_mul(torch.randn(3, 2, 8), out=out)


def test_unknown_backend_and_cuda_on_cpu():
    x = torch.randn(2, 8)
    choices = "backend must be one of 'auto', 'cuda', 'triton', 'torch'"
    with pytest.raises(ValueError, match=choices):
        pykernels.silu_and_mul(x, backend="nope")
    with pytest.raises(ValueError, match="backend 'cuda' needs CUDA tensors, got device cpu"):
        pykernels.silu_and_mul(x, backend="cuda")


def test_cpu_auto_is_reference():
    x = torch.randn(3, 10)
    torch.testing.assert_close(pykernels.silu_and_mul(x), F.silu(x[:, :5]) * x[:, 5:])
