"""fp8_weight_pack / unpack / codes: round trip within e4m3 precision, exact codes, the packed
layout contract (docs/quant.md), scales per channel and per group, zero rows, bad inputs; and the
torch reference GEMM against an fp64 oracle."""

from __future__ import annotations

import doctest

import pytest
import torch

from pykernels.quant import pack, ref
from pykernels.quant.pack import (
    fp8_weight_codes,
    fp8_weight_pack,
    fp8_weight_unpack,
    from_fragment_order,
)
from tests.quant._cases import make_weight, make_x, oracle, poisoned

FP8 = torch.float8_e4m3fn
SHAPES = [(64, 64), (128, 192), (192, 320), (64, 1024)]  # K % 128 == 64 and aligned


def _groups(t: torch.Tensor, k: int) -> torch.Tensor:
    """[N, K] -> [N, KT, 128], zero padded."""
    kt = -(-k // 128)
    return torch.nn.functional.pad(t, (0, kt * 128 - k)).view(t.shape[0], kt, 128)


def _scale_per_element(p: pack.Fp8Weight) -> torch.Tensor:
    n = p.qweight.shape[1]
    if p.scales.dim() == 1:
        return p.scales[:, None].expand(n, p.k)
    return p.scales.t().repeat_interleave(128, dim=1)[:, :p.k]


def _random_codes(n: int, k: int) -> torch.Tensor:
    """Every finite e4m3 value (no NaN codes 0x7f / 0xff) at random, as fp32."""
    bits = torch.randint(0, 256, (n, k), dtype=torch.uint8)
    bits[(bits & 0x7F) == 0x7F] = 0x3F
    return bits.view(FP8).float()


@pytest.mark.parametrize("group_size", [-1, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_within_e4m3_precision(shape, dtype, group_size):
    n, k = shape
    w = (torch.randn(n, k) * torch.rand(n, 1) * 3).to(dtype)  # channel magnitudes differ
    p = fp8_weight_pack(w, group_size)
    assert p.qweight.dtype == FP8 and p.scales.dtype == torch.float32
    assert p.k == k and p.group_size == group_size
    back = fp8_weight_unpack(p)
    assert back.shape == (n, k) and back.dtype == torch.float32
    err = (back - w.float()).abs()
    # 3 mantissa bits: half an ulp is 2^-4 of the value's binade, so of the amax at most.
    amax = w.float().abs().amax(1, keepdim=True) if group_size == -1 else \
        _groups(w.float().abs(), k).amax(2).repeat_interleave(128, dim=1)[:, :k]
    assert (err <= amax * 2.0 ** -4 * (1 + 1e-6)).all()
    # elementwise: 2^-4 of |w| for normals, half the subnormal step (2^-10 scale) below them
    assert (err <= w.float().abs() * 2.0 ** -4 + _scale_per_element(p) * 2.0 ** -10).all()
    assert fp8_weight_unpack(p, torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("group_size", [-1, 128])
@pytest.mark.parametrize("exp", [0, -5, 3])
def test_exact_codes_for_representable_values(group_size, exp):
    # Each row (group) holds +-448 * 2^exp: its scale is exactly 2^exp, every value a code.
    n, k = 128, 320
    codes = _random_codes(n, k)
    codes[:, ::128] = 448.0
    codes[::2, 1] = -448.0
    w = codes * 2.0 ** exp
    p = fp8_weight_pack(w, group_size)
    assert (p.scales == 2.0 ** exp).all()
    assert torch.equal(fp8_weight_codes(p).float(), codes)
    assert torch.equal(fp8_weight_unpack(p), w)


@pytest.mark.parametrize("group_size", [-1, 128])
@pytest.mark.parametrize("shape", SHAPES)
def test_layout_contract(shape, group_size):
    n, k = shape
    w = torch.randn(n, k)
    p = fp8_weight_pack(w, group_size)
    kt = -(-k // 128)
    assert p.qweight.shape == (kt, n, 128) and p.qweight.is_contiguous()
    # codes from the plain layout, computed here independently of the packer's reshapes
    want = (w / _scale_per_element(p)).clamp(-448, 448).to(FP8)
    codes = fp8_weight_codes(p)
    assert codes.shape == (n, k)
    assert torch.equal(codes.view(torch.uint8), want.view(torch.uint8))
    # layout 2: byte 4t + 2h + e of each 16-byte group holds k 8h + 2t + e (docs/quant.md)
    pos = torch.arange(128)
    t_, h_, e_ = (pos % 16) // 4, (pos % 4) // 2, pos % 2
    k_of_pos = pos // 16 * 16 + 8 * h_ + 2 * t_ + e_
    q = p.qweight.view(torch.uint8)
    plain = torch.nn.functional.pad(want.view(torch.uint8), (0, kt * 128 - k))
    for t in range(kt):
        assert torch.equal(q[t], plain[:, 128 * t + k_of_pos])  # zero padding past K included
    assert torch.equal(from_fragment_order(q), plain.view(n, kt, 128).permute(1, 0, 2))


@pytest.mark.parametrize("shape", SHAPES)
def test_group_and_channel_scales(shape):
    n, k = shape
    w = torch.randn(n, k).bfloat16()
    ch, gr = fp8_weight_pack(w, -1), fp8_weight_pack(w, 128)
    kt = -(-k // 128)
    assert ch.scales.shape == (n,) and gr.scales.shape == (kt, n)
    assert ch.scales.is_contiguous() and gr.scales.is_contiguous()
    amax = _groups(w.float().abs(), k).amax(2)  # [N, KT]
    torch.testing.assert_close(gr.scales, amax.t() / 448, rtol=0, atol=0)
    torch.testing.assert_close(ch.scales, amax.amax(1) / 448, rtol=0, atol=0)
    # group scales are finer: the round trip error is no larger
    e_ch = (fp8_weight_unpack(ch) - w.float()).abs().sum()
    e_gr = (fp8_weight_unpack(gr) - w.float()).abs().sum()
    assert e_gr <= e_ch


@pytest.mark.parametrize("group_size", [-1, 128])
def test_zero_rows_and_groups(group_size):
    w = torch.randn(128, 256)
    w[5] = 0
    w[9, 128:] = 0  # one zero group
    p = fp8_weight_pack(w, group_size)
    if group_size == -1:
        assert p.scales[5] == 1.0 and p.scales[9] != 1.0
    else:
        assert (p.scales[:, 5] == 1.0).all()
        assert p.scales[1, 9] == 1.0 and p.scales[0, 9] != 1.0
    back = fp8_weight_unpack(p)
    assert (back[5] == 0).all() and (back[9, 128:] == 0).all()
    assert torch.isfinite(back).all()


def test_saturation_and_tiny_values():
    # the amax maps to +-448 exactly; a row in fp32's subnormals still packs finitely
    w = torch.zeros(64, 64)
    w[0, 0], w[0, 1] = 3.0, -3.0
    w[1, :] = 1e-42
    p = fp8_weight_pack(w)
    codes = fp8_weight_codes(p).float()
    assert codes[0, 0] == 448 and codes[0, 1] == -448
    assert torch.isfinite(fp8_weight_unpack(p)).all() and torch.isfinite(p.scales).all()


def test_packs_on_the_input_device_and_from_views():
    w = torch.randn(256, 128)
    p = fp8_weight_pack(w.t().contiguous().t()[:128])  # a view with odd strides
    q = fp8_weight_pack(w[:128].contiguous())
    assert torch.equal(p.qweight.view(torch.uint8), q.qweight.view(torch.uint8))
    assert p.qweight.device == w.device


BAD = [
    (torch.randn(128), {}, ValueError, r"w must be 2-D \[N, K\], got shape \(128,\)"),
    (torch.randn(2, 64, 64), {}, ValueError, r"w must be 2-D"),
    (torch.ones(64, 64, dtype=torch.int32), {}, TypeError,
     r"w must be bfloat16 or float16 or float32, got int32"),
    (torch.randn(64, 64, dtype=torch.float64), {}, TypeError, r"w must be .*got float64"),
    ([[1.0] * 64] * 64, {}, TypeError, r"w must be a torch.Tensor, got list"),
    (torch.randn(64, 64), {"group_size": 64}, ValueError,
     r"group_size must be -1 \(per channel\) or 128, got 64"),
    (torch.randn(64, 64), {"group_size": 0}, ValueError, r"group_size must be .* got 0"),
    (torch.randn(64, 64), {"group_size": True}, ValueError, r"group_size .* got True"),
    (torch.randn(100, 64), {}, ValueError, r"N \(w.shape\[0\]\) must be a multiple of 64, got 100"),
    (torch.randn(64, 96), {}, ValueError, r"K \(w.shape\[1\]\) must be a multiple of 64, got 96"),
    (torch.randn(0, 64), {}, ValueError, r"w must not be empty, got shape \(0, 64\)"),
    (torch.full((64, 64), float("inf")), {}, ValueError, r"w must be finite"),
    (torch.full((64, 64), float("nan")).bfloat16(), {}, ValueError, r"w must be finite"),
]


@pytest.mark.parametrize("w, kw, err, msg", BAD)
def test_bad_inputs(w, kw, err, msg):
    with pytest.raises(err, match=msg):
        fp8_weight_pack(w, **kw)


# ---- the torch reference GEMM ------------------------------------------------------------------

REF_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3),
           torch.bfloat16: (8e-3, 8e-3)}  # one output rounding: the dtype's half ulp


@pytest.mark.parametrize("group_size", [-1, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [0, 1, 7, 33])
@pytest.mark.parametrize("shape", [(64, 64), (192, 320)])
def test_ref_gemm_against_fp64(shape, m, dtype, group_size):
    n, k = shape
    p = make_weight(n, k, group_size)
    x = make_x(m, k, dtype, strided=m % 2 == 1)
    out = poisoned(m, n, dtype=dtype)
    ref.gemm(x, p.qweight, p.scales, out, stages=1, deterministic=True)
    atol, rtol = REF_TOL[dtype]
    torch.testing.assert_close(out.float(), oracle(x, p).float(), atol=atol, rtol=rtol)


def test_fp8_gemm_ref_shapes_and_errors():
    p = make_weight(128, 192, 128)
    x = torch.randn(2, 5, 192, dtype=torch.float16)
    y = ref.fp8_gemm_ref(x, p)
    assert y.shape == (2, 5, 128) and y.dtype == torch.float16
    torch.testing.assert_close(y.view(10, 128), oracle(x.view(10, 192), p), atol=1e-3,
                               rtol=1e-3)
    assert ref.fp8_gemm_ref(torch.randn(0, 192), p).shape == (0, 128)
    with pytest.raises(ValueError, match=r"x's last dimension K=128 .* k=192"):
        ref.fp8_gemm_ref(torch.randn(3, 128), p)


@pytest.mark.parametrize("module", [pack, ref])
def test_docstring_examples(module):
    result = doctest.testmod(module, raise_on_error=False)
    assert result.attempted > 0 and result.failed == 0
