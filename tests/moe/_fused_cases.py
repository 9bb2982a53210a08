"""fused_moe test inputs and checks shared by the CPU and GPU test files: weights scaled so the
outputs stay ~1, softmax routing, per-expert/per-channel fp8 weights, the fp32-reference check and
its per-dtype tolerances, and the cache isolation every fused_moe test runs under."""

from __future__ import annotations

import math

import pytest
import torch

import autotune
from pykernels.moe import fused_moe, quant, ref

HAS_CUDA = torch.cuda.is_available()

# (atol, rtol) against the fp32 reference on outputs of magnitude ~1 (weights scaled so). The
# reference rounds the SiLU output where the kernel stores it (act_dtype), so what remains is
# fp32 summation order plus the rounding of each routed output and of the sum.
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (3e-3, 3e-3),
       torch.bfloat16: (2.5e-2, 2.5e-2)}
# fp8 w8a8 against the reference that rounds activations through fp8 the same way: an SiLU value
# that rounds differently before quantization can land in the next fp8 bin (6% apart).
FP8_TOL = (4e-2, 4e-2)
# The torch backend computes in the input dtype (h, act and the products rounded there).
TORCH_TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (1e-2, 1e-2),
             torch.bfloat16: (6e-2, 6e-2)}
TORCH_FP8_TOL = (1e-1, 5e-2)

CPU_ONLY = pytest.mark.skipif(HAS_CUDA, reason="interpreter test for CPU-only machines; the gpu "
                                               "tests cover triton")
gpu = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """No user cache; configs come from the defaults (or the shipped ones)."""
    monkeypatch.setenv("PYKERNELS_CACHE_DIR", str(tmp_path / "cache"))
    autotune.invalidate()
    yield
    autotune.invalidate()


# ---- inputs ------------------------------------------------------------------------------------

def make_weights(E, H, I, dtype, device="cpu"):  # noqa: E741
    # Drawn in the target dtype: an fp32 draw of DeepSeek-V3's w1 is a 30 GB transient, which
    # ran out of memory with 8 pytest workers on one H200.
    w1 = torch.randn(E, 2 * I, H, device=device, dtype=dtype).div_(math.sqrt(H))
    w2 = torch.randn(E, H, I, device=device, dtype=dtype).div_(math.sqrt(I))
    return w1, w2


def make_routing(M, E, topk, device="cpu", experts=None):
    """Softmax top-k routing; `experts` restricts it to those ids (others never chosen)."""
    logits = torch.randn(M, E, device=device)
    if experts is not None:
        mask = torch.full((E,), float("-inf"), device=device)
        mask[list(experts)] = 0
        logits = logits + mask
    return ref.fused_topk(logits, topk, True)


def routing_with_counts(counts, device="cpu"):
    """Top-1 routing giving expert e exactly counts[e] tokens, in shuffled token order."""
    ids = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    ids = ids[torch.randperm(ids.numel())].to(torch.int32)[:, None]
    return torch.rand(ids.shape[0], 1).add_(0.5).to(device), ids.to(device)


def quantize_weight(w, per_channel):
    wf = w.float()
    amax = wf.abs().amax(dim=2) if per_channel else wf.abs().amax(dim=(1, 2))
    scale = (amax / quant.FP8_MAX).clamp_min(1e-12)
    s = scale[..., None] if per_channel else scale[:, None, None]
    return (wf / s).to(torch.float8_e4m3fn), scale.float()


def run(x, w1, w2, tw, ti, backend, **kw):
    out = torch.full(x.shape, float("nan"), dtype=x.dtype, device=x.device)
    got = fused_moe(x, w1, w2, tw, ti, out=out, backend=backend, **kw)
    assert got is out
    return out


def close(got, want, tol):
    atol, rtol = tol
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol)


def close_fp8(got, want, tol):
    """close() for fp8 w8a8 outputs, allowing the intermediate's bin flips: an SiLU value that
    the kernel's fp32 sum order rounds to the other side of an fp8 boundary moves its token's
    outputs by one e4m3 step (6-12%) times a w2 column. On an H100 (m = 333, static scales) that
    put 1 of 341K outputs 0.054 off where FP8_TOL allows 0.04. At most 1 in 10^4 outputs may
    miss `tol`, and none may miss 3x `tol`."""
    atol, rtol = tol
    g, w = got.float(), want.float()
    miss = ((g - w).abs() > atol + rtol * w.abs()) | g.isnan()
    assert miss.sum().item() <= max(1, miss.numel() // 10_000), (
        f"{miss.sum().item()} of {miss.numel()} fp8 outputs beyond atol={atol}, rtol={rtol}")
    close(got, want, (3 * atol, 3 * rtol))


def check(x, w1, w2, tw, ti, backend="triton", **kw):
    got = run(x, w1, w2, tw, ti, backend, **kw)
    want = ref.fused_moe(x, w1, w2, tw, ti, expert_map=kw.get("expert_map"),
                         act_dtype=x.dtype)
    close(got, want, (TORCH_TOL if backend == "torch" else TOL)[x.dtype])
    return got


def check_fp8(x, wf1, wf2, E, topk, per_channel, static, a2):
    """fp8 w8a8 against dequantize-then-matmul, Triton and torch backends: weights quantized per
    expert or per channel, activation scales dynamic or static (a1 from x, a2 given). Returns
    the fp8 reference and the routing, for checks against the unquantized layer."""
    (w1, s1), (w2, s2) = quantize_weight(wf1, per_channel), quantize_weight(wf2, per_channel)
    a1 = (x.float().abs().amax() / quant.FP8_MAX).reshape(1) if static else None
    a2 = torch.tensor([a2], device=x.device) if static else None
    tw, ti = make_routing(x.shape[0], E, topk, x.device)
    kw = dict(use_fp8_w8a8=True, per_channel_quant=per_channel, w1_scale=s1, w2_scale=s2,
              a1_scale=a1, a2_scale=a2)
    want = ref.fused_moe(x, w1, w2, tw, ti, w1_scale=s1, w2_scale=s2, a1_scale=a1,
                         a2_scale=a2, act_dtype=x.dtype)
    close_fp8(run(x, w1, w2, tw, ti, "triton", **kw), want, FP8_TOL)
    close_fp8(run(x, w1, w2, tw, ti, "torch", **kw), want, TORCH_FP8_TOL)
    return want, tw, ti
