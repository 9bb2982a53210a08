"""fused_topk and grouped_topk: the Triton kernels against the reference (pykernels.moe.ref).

Logits are distinct by construction (a random permutation of evenly spaced values, exact in
bf16 and fp16), so the chosen set is unique: ids must match exactly (both sides order best first,
so as sequences), weights within fp32 rounding of the softmax/sigmoid."""

from __future__ import annotations

import pytest
import torch

from pykernels.moe import ref
from pykernels.moe.topk import fused_topk, grouped_topk

HAS_CUDA = torch.cuda.is_available()
# (atol, rtol) of the fp32 weights: scores from the same rounded logits, exp/sum reordered.
TOL = (2e-6, 2e-5)
POISON = float("nan")


def _logits(m, num_experts, dtype=torch.float32, device="cpu"):
    """Each row a random permutation of (j - E/2) * 8 / E: distinct and exact in bf16/fp16
    for E <= 256 (at most 8 significant bits)."""
    steps = (torch.arange(num_experts, dtype=torch.float32) - num_experts // 2) * (8.0 / 256)
    perm = torch.rand(m, num_experts).argsort(dim=1)
    return steps[perm].to(dtype).to(device)


def _compare(got, want):
    (gw, gi), (ww, wi) = got, want
    assert gw.dtype == torch.float32 and gi.dtype == torch.int32
    assert gw.shape == ww.shape and gi.shape == wi.shape
    torch.testing.assert_close(gi.cpu(), wi.cpu(), atol=0, rtol=0)
    torch.testing.assert_close(gw.cpu(), ww.cpu(), atol=TOL[0], rtol=TOL[1])


def _interp():
    if HAS_CUDA:
        pytest.skip("interpreter test is for CPU-only machines; the gpu tests cover triton")


def test_reference_ties_and_renormalize():
    w, ids = ref.fused_topk(torch.tensor([[1.0, 3.0, 3.0, 0.0]]), 2, True)
    assert sorted(ids[0].tolist()) == [1, 2]
    torch.testing.assert_close(w, torch.tensor([[0.5, 0.5]]))


# ---- CPU (interpreter) -------------------------------------------------------------------------

# (E, topk, renormalize, scoring): every E and scoring, topk 1..8, renormalize both ways.
CPU_CASES = [(8, 1, True, "softmax"), (8, 8, False, "sigmoid"), (60, 3, True, "sigmoid"),
             (64, 6, False, "softmax"), (128, 2, False, "sigmoid"), (256, 8, True, "softmax"),
             (60, 5, False, "softmax"), (256, 4, True, "sigmoid"), (64, 7, True, "sigmoid")]


@pytest.mark.parametrize("num_experts,topk,renormalize,scoring", CPU_CASES)
def test_fused_topk_interpreter(num_experts, topk, renormalize, scoring):
    _interp()
    x = _logits(5, num_experts)
    _compare(fused_topk(x, topk, renormalize, scoring, backend="triton"),
             ref.fused_topk(x, topk, renormalize, scoring))


def test_fused_topk_interpreter_strided_fp16():
    _interp()
    x = _logits(6, 128, torch.float16).t().contiguous().t()  # column-major [6, 128]
    _compare(fused_topk(x, 4, True, backend="triton"), ref.fused_topk(x, 4, True))
    y = _logits(3, 64)[:, :60]  # row stride 64
    _compare(fused_topk(y, 2, False, "sigmoid", backend="triton"),
             ref.fused_topk(y, 2, False, "sigmoid"))


GROUPED_CPU = [
    # (E, groups, topk_group, topk, scoring, bias, renormalize, scale)
    (256, 8, 4, 8, "sigmoid", True, True, 2.5),   # DeepSeek-V3
    (64, 8, 3, 6, "softmax", False, False, 1.0),
    (60, 6, 2, 4, "sigmoid", False, True, 1.0),   # groups of 10: padded to 16
    (24, 3, 1, 3, "softmax", True, True, 0.5),
]


@pytest.mark.parametrize("e,groups,tg,topk,scoring,bias,renorm,scale", GROUPED_CPU)
def test_grouped_topk_interpreter(e, groups, tg, topk, scoring, bias, renorm, scale):
    _interp()
    x = _logits(4, e)
    b = torch.randn(e) * 0.01 if bias else None
    _compare(grouped_topk(x, topk, groups, tg, renorm, scoring, b, scale, backend="triton"),
             ref.grouped_topk(x, topk, groups, tg, renorm, scoring, b, scale))


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_empty_rows(backend):
    if backend == "triton":
        _interp()
    x = torch.empty(0, 64)
    w, ids = fused_topk(x, 4, True, backend=backend)
    assert w.shape == (0, 4) and w.dtype == torch.float32 and ids.dtype == torch.int32
    w, ids = grouped_topk(x, 4, 8, 2, True, backend=backend)
    assert ids.shape == (0, 4)


def test_torch_backend_matches_reference():
    x = _logits(7, 60, torch.bfloat16)
    _compare(fused_topk(x, 6, True, backend="torch"), ref.fused_topk(x, 6, True))


# ---- bad inputs --------------------------------------------------------------------------------

X = torch.zeros(4, 16)
BAD = [
    ("int logits", lambda: fused_topk(X.int(), 2, True), TypeError,
     "gating_logits must be bfloat16 or float16 or float32, got int32"),
    ("1-D logits", lambda: fused_topk(X[0], 2, True), ValueError,
     "gating_logits must be 2-D [tokens, num_experts], got shape (16,)"),
    ("no experts", lambda: fused_topk(X[:, :0], 1, True), ValueError,
     "gating_logits must have at least one expert column"),
    ("topk 0", lambda: fused_topk(X, 0, True), ValueError, "topk must be in [1, 16], got 0"),
    ("topk > E", lambda: fused_topk(X, 17, True), ValueError, "topk must be in [1, 16], got 17"),
    ("topk float", lambda: fused_topk(X, 2.0, True), TypeError, "topk must be an int, got float"),
    ("scoring", lambda: fused_topk(X, 2, True, "relu"), ValueError,
     "scoring must be 'softmax' or 'sigmoid', got 'relu'"),
    ("backend", lambda: fused_topk(X, 2, True, backend="cuda"), ValueError,
     "backend must be one of 'auto', 'triton', 'torch', got 'cuda'"),
    ("groups divide", lambda: grouped_topk(X, 2, 3, 1, True), ValueError,
     "num_expert_group must divide the 16 experts, got 3"),
    ("topk_group", lambda: grouped_topk(X, 2, 4, 5, True), ValueError,
     "topk_group must be in [1, 4], got 5"),
    ("grouped topk", lambda: grouped_topk(X, 9, 4, 2, True), ValueError,
     "topk must be in [1, 8], got 9"),
    ("bias shape", lambda: grouped_topk(X, 2, 4, 2, True, correction_bias=torch.zeros(8)),
     ValueError, "correction_bias must have shape (16,), got (8,)"),
    ("bias dtype", lambda: grouped_topk(X, 2, 4, 2, True,
                                        correction_bias=torch.zeros(16, dtype=torch.int64)),
     TypeError, "correction_bias must be bfloat16 or float16 or float32, got int64"),
    ("bias groups of 1", lambda: grouped_topk(X, 2, 16, 4, True, correction_bias=torch.zeros(16)),
     ValueError, "groups need >= 2 experts, got 1"),
]


@pytest.mark.parametrize("name,call,exc,message", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs(name, call, exc, message):
    with pytest.raises(exc) as info:
        call()
    assert message in str(info.value), str(info.value)


# ---- GPU ---------------------------------------------------------------------------------------

E_LEVELS = [8, 60, 64, 128, 256]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _gpu_cases():
    # Every (E, topk) pair; renormalize, scoring and dtype rotate through their levels.
    cases = []
    for i, (e, k) in enumerate((e, k) for e in E_LEVELS for k in range(1, 9) if k <= e):
        cases.append((e, k, i % 2 == 0, ("softmax", "sigmoid")[(i // 2) % 2], DTYPES[i % 3]))
    return cases


@pytest.mark.gpu
@pytest.mark.parametrize("num_experts,topk,renormalize,scoring,dtype", _gpu_cases())
@pytest.mark.parametrize("m", [1, 7, 1000])
def test_gpu_fused_topk(m, num_experts, topk, renormalize, scoring, dtype):
    x = _logits(m, num_experts, dtype, "cuda")
    _compare(fused_topk(x, topk, renormalize, scoring, backend="triton"),
             ref.fused_topk(x.cpu(), topk, renormalize, scoring))
    _compare(fused_topk(x, topk, renormalize, scoring),  # auto
             ref.fused_topk(x.cpu(), topk, renormalize, scoring))


@pytest.mark.gpu
def test_gpu_fused_topk_large_and_strided():
    x = _logits(16384, 256, torch.bfloat16, "cuda")
    _compare(fused_topk(x, 8, True, backend="triton"), ref.fused_topk(x.cpu(), 8, True))
    y = _logits(2000, 128, torch.float32, "cuda")[:, :60]
    _compare(fused_topk(y, 4, False, "sigmoid", backend="triton"),
             ref.fused_topk(y.cpu(), 4, False, "sigmoid"))


GROUPED_GPU = GROUPED_CPU + [(256, 8, 4, 8, "sigmoid", False, False, 1.0),
                             (128, 4, 2, 8, "softmax", True, True, 1.0),
                             (160, 10, 3, 6, "sigmoid", True, True, 16.0)]


@pytest.mark.gpu
@pytest.mark.parametrize("e,groups,tg,topk,scoring,bias,renorm,scale", GROUPED_GPU)
@pytest.mark.parametrize("m,dtype", [(1, torch.bfloat16), (333, torch.float32),
                                     (4096, torch.bfloat16)])
def test_gpu_grouped_topk(m, dtype, e, groups, tg, topk, scoring, bias, renorm, scale):
    x = _logits(m, e, dtype, "cuda")
    b = torch.randn(e, device="cuda") * 0.01 if bias else None
    want = ref.grouped_topk(x.cpu(), topk, groups, tg, renorm, scoring,
                            b.cpu() if bias else None, scale)
    got = grouped_topk(x, topk, groups, tg, renorm, scoring, b, scale, backend="triton")
    _compare((got[0] / scale, got[1]), (want[0] / scale, want[1]))


@pytest.mark.gpu
def test_gpu_cuda_graph():
    x = _logits(64, 128, torch.bfloat16, "cuda")
    fused_topk(x, 8, True)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        w, ids = fused_topk(x, 8, True)
    x.copy_(_logits(64, 128, torch.bfloat16, "cuda"))
    graph.replay()
    torch.cuda.synchronize()
    _compare((w, ids), ref.fused_topk(x.cpu(), 8, True))
