"""FP8WeightOnlyLinear, quantize_model_fp8 and select_fp8_linear_method.

CPU: backend "auto" is the torch reference there, so these tests check the module's wiring
(packing, bias, state dicts, errors, model conversion); the kernels have their own tests. The
gpu-marked tests run a small CUDA model through the real kernels."""

from __future__ import annotations

import io
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pykernels.quant import pack
from pykernels.quant.linear import (
    FP8WeightOnlyLinear,
    quantize_model_fp8,
    select_fp8_linear_method,
)

# e4m3 keeps 3 mantissa bits: +-1/16 relative per weight, ~3.6% rms; a K-long dot product keeps
# that relative size, so the whole output differs from bf16 by ~4% of its norm.
FP8_REL = 0.06
# Same packed weight, fp32 reference vs the module: bf16/fp16 rounding of the output and bias.
TOL = {torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}
K, N = 256, 192


def _linear(k=K, n=N, bias=True, dtype=torch.bfloat16, device="cpu") -> nn.Linear:
    lin = nn.Linear(k, n, bias=bias, dtype=dtype, device=device)
    with torch.no_grad():
        lin.weight.normal_(0, k ** -0.5)
        if bias:
            lin.bias.normal_(0, 0.5)
    return lin


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _dequant(mod: FP8WeightOnlyLinear) -> torch.Tensor:
    from pykernels.quant.pack import Fp8Weight, fp8_weight_unpack

    packed = Fp8Weight(mod.qweight, mod.scales, mod.in_features, mod.group_size)
    return fp8_weight_unpack(packed, torch.float32)


def _expected(mod: FP8WeightOnlyLinear, x: torch.Tensor) -> torch.Tensor:
    y = (x.float() @ _dequant(mod).T).to(x.dtype)
    return y if mod.bias is None else y + mod.bias.to(x.dtype)


# ---- from_linear and forward -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group_size", [-1, 128])
@pytest.mark.parametrize("bias", [True, False])
def test_from_linear_matches_the_bf16_linear(dtype, group_size, bias):
    lin = _linear(bias=bias, dtype=dtype)
    q = FP8WeightOnlyLinear.from_linear(lin, group_size=group_size)
    assert (q.in_features, q.out_features, q.group_size) == (K, N, group_size)
    assert q.qweight.dtype == torch.float8_e4m3fn and q.qweight.shape == (2, N, 128)
    assert q.scales.shape == ((N,) if group_size == -1 else (2, N))
    assert (q.bias is None) == (not bias)
    x = torch.randn(2, 5, K, dtype=dtype)  # leading dims are kept
    with torch.no_grad():
        got, want = q(x), lin(x)
    assert got.shape == (2, 5, N) and got.dtype == dtype
    assert _rel(got, want) < FP8_REL
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got, _expected(q, x), atol=atol, rtol=rtol)


def test_bias_is_added_in_the_activation_dtype():
    lin = _linear(bias=True)
    q = FP8WeightOnlyLinear.from_linear(lin)
    assert q.bias.dtype == torch.bfloat16
    torch.testing.assert_close(q.bias, lin.bias.detach())
    x = torch.randn(3, K, dtype=torch.bfloat16)
    no_bias = FP8WeightOnlyLinear.from_linear(_linear(bias=False))
    no_bias.qweight, no_bias.scales = q.qweight, q.scales
    torch.testing.assert_close(q(x), no_bias(x) + lin.bias.detach(), atol=1e-2, rtol=1e-2)


def test_grouped_scales_track_a_per_group_range():
    # One K group 10^5 x larger than the other: per-channel scales push the small group deep into
    # e4m3's subnormals (below 2^-6 of the scale), per-group scales keep its 3 mantissa bits.
    lin = _linear(bias=False)
    with torch.no_grad():
        lin.weight[:, :128] *= 1e5
    x = torch.randn(8, K, dtype=torch.bfloat16)
    x[:, :128] = 0  # only the small group contributes
    want = lin(x).detach()
    err = {g: _rel(FP8WeightOnlyLinear.from_linear(lin, g)(x), want) for g in (-1, 128)}
    assert err[128] < FP8_REL < err[-1]


def test_extra_repr_and_module_api():
    q = FP8WeightOnlyLinear.from_linear(_linear(), group_size=128)
    text = repr(q)
    assert "in_features=256, out_features=192, bias=True, group_size=128" in text
    assert "float8_e4m3fn" in text
    assert dict(q.named_parameters()) == {}  # buffers only: nothing for an optimizer
    assert {n for n, _ in q.named_buffers()} == {"qweight", "scales", "bias", "qweight_layout"}


def test_dtype_casts_keep_the_packed_weight():
    q = FP8WeightOnlyLinear.from_linear(_linear(), group_size=128)
    qweight, scales = q.qweight.clone(), q.scales.clone()
    x = torch.randn(2, K, dtype=torch.float16)
    for cast in (lambda m: m.to(torch.float16), lambda m: m.half(), lambda m: m.float()):
        cast(q)
        assert q.qweight.dtype == torch.float8_e4m3fn and q.scales.dtype == torch.float32
        assert torch.equal(q.qweight.view(torch.uint8), qweight.view(torch.uint8))
        assert torch.equal(q.scales, scales)
    assert q.bias.dtype == torch.float32  # the bias follows: forward casts it to x's dtype
    assert q(x).dtype == torch.float16
    q.to("cpu")  # a device move still moves everything
    assert q.qweight.device.type == "cpu"


# ---- state dicts ------------------------------------------------------------------------------


@pytest.mark.parametrize("group_size", [-1, 128])
@pytest.mark.parametrize("bias", [True, False])
def test_state_dict_round_trip(group_size, bias):
    q = FP8WeightOnlyLinear.from_linear(_linear(bias=bias), group_size=group_size)
    sd = q.state_dict()
    assert set(sd) == {"qweight", "scales", "qweight_layout"} | ({"bias"} if bias else set())
    assert int(sd["qweight_layout"]) == pack.LAYOUT == 2
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    fresh = FP8WeightOnlyLinear(K, N, bias=bias, group_size=group_size)
    fresh.load_state_dict(loaded)
    x = torch.randn(4, K, dtype=torch.bfloat16)
    assert torch.equal(fresh(x), q(x))
    assert torch.equal(fresh.qweight.view(torch.uint8), q.qweight.view(torch.uint8))


def test_from_state_dict_bf16_weight_packs_it():
    lin = _linear()
    sd = {"layer.weight": lin.weight.detach(), "layer.bias": lin.bias.detach()}
    q = FP8WeightOnlyLinear.from_state_dict(sd, prefix="layer.", group_size=128)
    ref = FP8WeightOnlyLinear.from_linear(lin, group_size=128)
    assert q.group_size == 128
    for name in ("qweight", "scales", "bias"):
        a, b = getattr(q, name), getattr(ref, name)
        assert a.dtype == b.dtype and torch.equal(a.float(), b.float()), name


@pytest.mark.parametrize("group_size", [-1, 128])
def test_from_state_dict_packed_pair_loads_it(group_size):
    ref = FP8WeightOnlyLinear.from_linear(_linear(), group_size=group_size)
    sd = {f"model.proj.{k}": v for k, v in ref.state_dict().items()}
    q = FP8WeightOnlyLinear.from_state_dict(sd, prefix="model.proj.")
    assert (q.in_features, q.out_features, q.group_size) == (K, N, group_size)
    x = torch.randn(3, K, dtype=torch.bfloat16)
    assert torch.equal(q(x), ref(x))
    # K = 192 packs into 2 panels too: in_features says which K the panels hold.
    small = FP8WeightOnlyLinear.from_linear(_linear(k=192), group_size=group_size)
    q = FP8WeightOnlyLinear.from_state_dict(small.state_dict(), in_features=192)
    assert q.in_features == 192
    x = torch.randn(3, 192, dtype=torch.bfloat16)
    assert torch.equal(q(x), small(x))


def _layout1(sd: dict, prefix: str = "") -> dict:
    """The state dict as saved before layout 2: natural k order, no qweight_layout."""
    old = {k: v for k, v in sd.items() if k != prefix + "qweight_layout"}
    old[prefix + "qweight"] = pack.from_fragment_order(sd[prefix + "qweight"])
    return old


@pytest.mark.parametrize("group_size", [-1, 128])
def test_layout1_state_dicts_load_converted(group_size):
    # A checkpoint saved before layout 2 has natural k order and no qweight_layout: both
    # load_state_dict and from_state_dict convert it, and the caller's dict is left as it was.
    ref = FP8WeightOnlyLinear.from_linear(_linear(), group_size=group_size)
    old = _layout1(ref.state_dict())
    before = old["qweight"].view(torch.uint8).clone()
    assert not torch.equal(before, ref.qweight.view(torch.uint8))  # the orders differ
    fresh = FP8WeightOnlyLinear(K, N, group_size=group_size)
    fresh.load_state_dict(old)
    built = FP8WeightOnlyLinear.from_state_dict(old)
    x = torch.randn(3, K, dtype=torch.bfloat16)
    for mod in (fresh, built):
        assert torch.equal(mod.qweight.view(torch.uint8), ref.qweight.view(torch.uint8))
        assert int(mod.qweight_layout) == pack.LAYOUT
        assert torch.equal(mod(x), ref(x))
    assert torch.equal(old["qweight"].view(torch.uint8), before) and "qweight_layout" not in old
    # an explicit layout 1 marker converts too; an unknown one is an error naming the key
    marked = {**old, "qweight_layout": torch.tensor(1, dtype=torch.int32)}
    assert torch.equal(FP8WeightOnlyLinear.from_state_dict(marked)(x), ref(x))
    with pytest.raises(ValueError, match="qweight_layout must be 1 or 2, got 7"):
        FP8WeightOnlyLinear.from_state_dict({**old, "qweight_layout": torch.tensor(7)})
    with pytest.raises(RuntimeError, match="qweight_layout must be 1 or 2, got 7"):
        FP8WeightOnlyLinear(K, N, group_size=group_size).load_state_dict(
            {**old, "qweight_layout": torch.tensor(7)})


def _packed_sd(group_size=-1, bias=True):
    return dict(FP8WeightOnlyLinear.from_linear(_linear(bias=bias), group_size).state_dict())


BAD_STATE_DICTS = {
    "empty": (lambda: {}, KeyError, "neither weight nor qweight and scales"),
    "qweight only": (lambda: {"qweight": _packed_sd()["qweight"]}, KeyError,
                     "has scales but no qweight|has qweight but no scales"),
    "both forms": (lambda: {**_packed_sd(), "weight": torch.zeros(N, K, dtype=torch.bfloat16)},
                   ValueError, "both weight and qweight"),
    "bf16 qweight": (lambda: {**_packed_sd(), "qweight": torch.zeros(2, N, 128,
                                                                     dtype=torch.bfloat16)},
                     ValueError, "qweight must be float8_e4m3fn, got bfloat16"),
    "fp16 scales": (lambda: {**_packed_sd(), "scales": torch.ones(N, dtype=torch.float16)},
                    ValueError, "scales must be float32, got float16"),
    "scales of another N": (lambda: {**_packed_sd(), "scales": torch.ones(N + 64)},
                            ValueError, r"scales must have shape \(192,\)"),
    "2-D qweight": (lambda: {**_packed_sd(), "qweight": torch.zeros(N, K).to(torch.float8_e4m3fn)},
                    ValueError, r"qweight must have shape \[ceil\(K/128\), N, 128\]"),
    "fp32 weight": (lambda: {"weight": torch.zeros(N, K)}, TypeError,
                    "weight must be bfloat16 or float16, got float32"),
    "unaligned weight": (lambda: {"weight": torch.zeros(100, K, dtype=torch.bfloat16)},
                         ValueError, "multiples of 64"),
    "bias of another N": (lambda: {**_packed_sd(), "bias": torch.zeros(7, dtype=torch.bfloat16)},
                          ValueError, r"must have shape \(192,\)"),
    "fp32 bias": (lambda: {**_packed_sd(), "bias": torch.zeros(N)}, TypeError,
                  "bias must be bfloat16 or float16, got float32"),
}


@pytest.mark.parametrize("name", sorted(BAD_STATE_DICTS))
def test_bad_state_dicts_give_clear_errors(name):
    make, error, message = BAD_STATE_DICTS[name]
    with pytest.raises(error, match=message):
        FP8WeightOnlyLinear.from_state_dict(make())


def test_bad_group_size_and_in_features():
    sd = _packed_sd(group_size=128)
    with pytest.raises(ValueError, match="group_size=-1 was asked but scales has shape"):
        FP8WeightOnlyLinear.from_state_dict(sd, group_size=-1)
    with pytest.raises(ValueError, match="in_features=512 needs ceil"):
        FP8WeightOnlyLinear.from_state_dict(sd, in_features=512)
    with pytest.raises(ValueError, match="group_size must be -1"):
        FP8WeightOnlyLinear.from_linear(_linear(), group_size=64)
    with pytest.raises(TypeError, match="must be a torch.nn.Linear"):
        FP8WeightOnlyLinear.from_linear(nn.Conv1d(4, 4, 1))


def test_load_state_dict_rejects_a_silent_cast():
    q = FP8WeightOnlyLinear(K, N)
    sd = _packed_sd()
    sd["qweight"] = sd["qweight"].to(torch.bfloat16)  # same shape: copy_ would cast silently
    with pytest.raises(RuntimeError, match="qweight must be float8_e4m3fn, got bfloat16"):
        q.load_state_dict(sd)
    grouped = _packed_sd(group_size=128)
    with pytest.raises(RuntimeError, match=r"scales must have shape \(192,\) \(per channel"):
        q.load_state_dict(grouped)


# ---- quantize_model_fp8 -----------------------------------------------------------------------


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = _linear(K, 3 * 64)
        self.odd = _linear(100, 64)  # K not a multiple of 64: kept
        self.fp32 = _linear(K, 64, dtype=torch.float32)  # not bf16/fp16: kept
        self.attn = nn.MultiheadAttention(64, 2, dtype=torch.bfloat16)  # out_proj: a subclass


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_Block(), _Block()])
        self.mlp = nn.Sequential(_linear(K, 128), nn.SiLU(), _linear(128, K, bias=False))
        self.lm_head = _linear(K, 512)


def test_quantize_model_fp8_swaps_the_right_modules(caplog):
    model = _Model()
    x = torch.randn(3, K, dtype=torch.bfloat16)
    want = model.mlp(x).detach()
    with caplog.at_level(logging.INFO, logger="pykernels.quant"):
        out = quantize_model_fp8(model, group_size=128)
    assert out is model
    swapped = {n for n, m in model.named_modules() if isinstance(m, FP8WeightOnlyLinear)}
    assert swapped == {"layers.0.qkv", "layers.1.qkv", "mlp.0", "mlp.2"}
    assert all(model.get_submodule(n).group_size == 128 for n in swapped)
    assert type(model.lm_head) is nn.Linear  # skipped by name
    for block in model.layers:
        assert type(block.odd) is nn.Linear and type(block.fp32) is nn.Linear
        assert type(block.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert _rel(model.mlp(x), want) < 2 * FP8_REL
    assert "4 linear layer(s) now FP8 weight-only" in caplog.text
    assert "left 4 linear layer(s) unquantized" in caplog.text


def test_quantize_model_fp8_skip_and_bare_linear():
    model = _Model()
    quantize_model_fp8(model, skip=("mlp", "layers.1.qkv"))
    swapped = {n for n, m in model.named_modules() if isinstance(m, FP8WeightOnlyLinear)}
    assert swapped == {"layers.0.qkv", "lm_head"}
    lin = _linear()
    assert isinstance(quantize_model_fp8(lin), FP8WeightOnlyLinear)
    with pytest.raises(ValueError, match="group_size must be -1"):
        quantize_model_fp8(_Model(), group_size=32)


def test_quantize_model_fp8_says_when_it_uses_marlin_on_a_w8a8_device(monkeypatch, caplog):
    from pykernels.quant import linear as linear_mod

    monkeypatch.setattr(linear_mod, "select_fp8_linear_method", lambda device: "w8a8")
    with caplog.at_level(logging.INFO, logger="pykernels.quant"):
        quantize_model_fp8(_Model())
    assert "has no W8A8 linear yet; using the FP8 weight-only (Marlin) path" in caplog.text


# ---- select_fp8_linear_method -----------------------------------------------------------------


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA device of a chosen compute capability, as far as the selection can tell."""
    cap = {"value": (9, 0)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: cap["value"])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.delenv("VLLM_TEST_FORCE_FP8_MARLIN", raising=False)
    return cap


def test_select_fp8_linear_method(fake_gpu, monkeypatch):
    assert select_fp8_linear_method("cuda:0") == "w8a8"
    assert select_fp8_linear_method(torch.device("cuda")) == "w8a8"
    fake_gpu["value"] = (8, 9)  # Ada: FP8 tensor cores
    assert select_fp8_linear_method("cuda") == "w8a8"
    fake_gpu["value"] = (8, 0)  # A100: no FP8 tensor cores
    assert select_fp8_linear_method("cuda") == "marlin"
    assert select_fp8_linear_method("cpu") == "marlin"


@pytest.mark.parametrize("value, method", [("1", "marlin"), ("true", "marlin"),
                                           ("0", "w8a8"), ("", "w8a8")])
def test_select_honours_force_marlin(fake_gpu, monkeypatch, value, method):
    monkeypatch.setenv("VLLM_TEST_FORCE_FP8_MARLIN", value)
    assert select_fp8_linear_method("cuda:0") == method


# ---- GPU ----------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "cuda", "triton"])
@pytest.mark.parametrize("group_size", [-1, 128])
def test_gpu_model_forward_matches(backend, group_size):
    torch.manual_seed(0)
    model = nn.Sequential(_linear(1024, 4096, device="cuda"), nn.SiLU(),
                          _linear(4096, 1024, bias=False, device="cuda")).eval()
    x = torch.randn(2, 33, 1024, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        want = model(x)
        quantize_model_fp8(model, group_size=group_size)
        for m in model:
            if isinstance(m, FP8WeightOnlyLinear):
                m.backend = backend
        got = model(x)
        # Layer by layer against the torch backend on the same packed weights.
        h = x
        for m in model:
            if isinstance(m, FP8WeightOnlyLinear):
                ref = F.linear(h.float(), _dequant(m)).to(h.dtype)
                ref = ref if m.bias is None else ref + m.bias
                torch.testing.assert_close(m(h), ref, atol=3e-2, rtol=3e-2)
            h = m(h)
    assert got.shape == want.shape and torch.isfinite(got).all()
    assert _rel(got, want) < 2 * FP8_REL


@pytest.mark.gpu
def test_gpu_state_dict_round_trip_and_graph_capture():
    q = FP8WeightOnlyLinear.from_linear(_linear(4096, 4096, device="cuda"))
    fresh = FP8WeightOnlyLinear(4096, 4096, device="cuda")
    fresh.load_state_dict(q.state_dict())
    x = torch.randn(16, 4096, dtype=torch.bfloat16, device="cuda")
    want = q(x)
    assert torch.equal(fresh(x), want)
    fresh(x)  # warm up (config lookup, lazy loads) before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = fresh(x)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(y, want, atol=1e-2, rtol=1e-2)
