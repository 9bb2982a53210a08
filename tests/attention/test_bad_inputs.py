"""Bad inputs give TypeError/ValueError naming the argument (CPU, torch backend)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from pykernels import attention
from pykernels.attention import PagedDecode, _common
from tests.attention._cases import Paged

DT = torch.float16


@pytest.fixture
def paged():
    p = Paged([5, 9], 4, 2, 64, DT)
    return p, p.q(4, 64, DT)


def test_page_index_out_of_range(paged):
    p, q = paged
    bad = p.kv_indices.clone()
    bad[1] = p.num_pages + 5
    with pytest.raises(ValueError, match=r"page index \d+, out of range for a kv_cache of"):
        attention.paged_decode(q, p.cache, p.kv_indptr, bad, p.kv_last_page_len,
                               backend="torch")
    bad[1] = -1
    with pytest.raises(ValueError, match="negative page index"):
        attention.paged_decode(q, p.cache, p.kv_indptr, bad, p.kv_last_page_len,
                               backend="torch")


def test_page_index_checked_at_run_of_a_plan(paged):
    p, q = paged
    dec = PagedDecode(4, 2, 64, 4, dtype=DT, device="cpu", backend="torch")
    dec.plan(*p.table)
    with pytest.raises(ValueError, match="out of range for a kv_cache of 2 pages"):
        dec.run(q, p.cache[:2])


def test_bad_last_page_len_and_indptr(paged):
    p, q = paged
    with pytest.raises(ValueError, match=r"kv_last_page_len\[1\] = 7 must be in 1..page_size"):
        attention.paged_decode(q, p.cache, p.kv_indptr, p.kv_indices,
                               torch.tensor([1, 7], dtype=torch.int32), backend="torch")
    with pytest.raises(ValueError, match="non-decreasing"):
        attention.paged_decode(q, p.cache, torch.tensor([0, 3, 2], dtype=torch.int32),
                               p.kv_indices, p.kv_last_page_len, backend="torch")
    with pytest.raises(ValueError, match="kv_indptr must have 3 entries, got 2"):
        attention.paged_decode(q, p.cache, p.kv_indptr[:2], p.kv_indices, p.kv_last_page_len,
                               backend="torch")
    with pytest.raises(TypeError, match="kv_indices must be int32 or int64, got float32"):
        attention.paged_decode(q, p.cache, p.kv_indptr, p.kv_indices.float(),
                               p.kv_last_page_len, backend="torch")


def test_wrong_layout_and_heads(paged):
    p, q = paged
    hnd = p.cache.permute(0, 1, 3, 2, 4).contiguous()  # [pages, 2, heads=2, page=4, d]
    with pytest.raises(ValueError, match=r"num_q_heads \(6, q dim 1\) must be a multiple of "
                                         r"num_kv_heads \(4, kv_cache dim 3\); is the cache "
                                         "in HND layout"):
        attention.paged_decode(torch.randn(2, 6, 64, dtype=DT), hnd, *p.table, backend="torch")
    with pytest.raises(ValueError, match="kv_cache must have layout"):
        attention.paged_decode(q, p.cache[:, 0], *p.table, backend="torch")
    with pytest.raises(ValueError, match="head_dim \\(dim 4\\) must equal q's head_dim 64"):
        attention.paged_decode(q, torch.zeros(4, 2, 4, 2, 128, dtype=DT), *p.table,
                               backend="torch")
    with pytest.raises(ValueError, match="must be a multiple of num_kv_heads"):
        attention.paged_decode(torch.randn(2, 3, 64, dtype=DT), p.cache, *p.table,
                               backend="torch")
    with pytest.raises(ValueError, match="contiguous within a token"):
        attention.paged_decode(q, hnd.transpose(2, 3), *p.table, backend="torch")


def test_bad_q_and_out(paged):
    p, q = paged
    with pytest.raises(TypeError, match="q must be bfloat16 or float16, got float32"):
        attention.paged_decode(q.float(), p.cache, *p.table, backend="torch")
    with pytest.raises(ValueError, match="head_dim must be one of"):
        attention.paged_decode(torch.randn(2, 4, 96, dtype=DT), p.cache, *p.table,
                               backend="torch")
    with pytest.raises(TypeError, match="kv_cache must be float16 or float8_e4m3fn"):
        attention.paged_decode(q, p.cache.bfloat16(), *p.table, backend="torch")
    with pytest.raises(ValueError, match=r"out must have shape \(2, 4, 64\)"):
        attention.paged_decode(q, p.cache, *p.table, out=torch.empty(3, 4, 64, dtype=DT),
                               backend="torch")


def test_bad_options_and_backends(paged):
    p, q = paged
    with pytest.raises(ValueError, match="window_left must be >= 0, or -1"):
        attention.paged_decode(q, p.cache, *p.table, window_left=-3, backend="torch")
    with pytest.raises(ValueError, match="logits_soft_cap must be >= 0"):
        attention.paged_decode(q, p.cache, *p.table, logits_soft_cap=-1.0, backend="torch")
    for name, value in (("sm_scale", -0.1), ("sm_scale", float("nan")), ("k_scale", 0.0)):
        with pytest.raises(ValueError, match=f"{name} must be a finite number > 0, got"):
            attention.paged_decode(q, p.cache, *p.table, backend="torch", **{name: value})
    with pytest.raises(ValueError, match="v_scale must be finite, got inf"):
        attention.paged_prefill(q, p.cache, p.qo_indptr, *p.table, v_scale=float("inf"),
                                backend="torch")
    with pytest.raises(ValueError, match="backend must be one of"):
        attention.paged_decode(q, p.cache, *p.table, backend="nope")
    with pytest.raises(ValueError, match="'cuda' has no such kernel"):
        attention.paged_prefill(q, p.cache, p.qo_indptr, *p.table, backend="cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            attention.paged_decode(q, p.cache, *p.table, backend="cuda")


def test_env_default_backend(paged, monkeypatch):
    p, q = paged
    monkeypatch.setenv("VLLM_ATTENTION_BACKEND", "TORCH_SDPA")  # vLLM's name, any case
    want = attention.paged_decode(q, p.cache, *p.table, backend="torch")
    torch.testing.assert_close(attention.paged_decode(q, p.cache, *p.table), want)
    monkeypatch.setenv("VLLM_ATTENTION_BACKEND", "cuda")  # no prefill kernel: falls back
    attention.paged_prefill(q, p.cache, p.qo_indptr, *p.table)


def test_plan_limits_and_mismatch(paged):
    p, q = paged
    dec = PagedDecode(4, 2, 64, 4, dtype=DT, device="cpu", backend="torch", max_batch=1,
                      max_pages=64)
    with pytest.raises(ValueError, match="batch 2 exceeds max_batch 1"):
        dec.plan(*p.table)
    dec = PagedDecode(4, 2, 64, 4, dtype=DT, device="cpu", backend="torch")
    with pytest.raises(RuntimeError, match="before plan"):
        dec.run(q, p.cache)
    dec.plan(*p.table)
    with pytest.raises(ValueError, match="num_q_heads is 2 in q/kv_cache but the plan was made "
                                         "for 4"):
        dec.run(q[:, :2], p.cache)
    with pytest.raises(ValueError, match="q must have 2 rows"):
        dec.run(q[:1], p.cache)
    with pytest.raises(ValueError, match="max_pages is needed"):
        PagedDecode(4, 2, 64, 4, dtype=DT, device="cpu", backend="torch", max_batch=4)


def test_append_bad_inputs(paged):
    p, _ = paged
    k = torch.randn(2, 2, 64, dtype=DT)
    with pytest.raises(ValueError, match=r"v must have shape \(2, 2, 64\)"):
        attention.append_paged_kv(k, k[:1], p.cache, torch.tensor([0, 1]), backend="torch")
    with pytest.raises(ValueError, match="slot_mapping must have 2 entries"):
        attention.append_paged_kv(k, k, p.cache, torch.tensor([0]), backend="torch")
    with pytest.raises(ValueError, match="v_scale must be a finite number > 0, got 0.0"):
        attention.append_paged_kv(k, k, p.cache, torch.tensor([0, 1]), v_scale=0.0,
                                  backend="torch")
    with pytest.raises(ValueError, match="k has 3 heads but kv_cache has 2"):
        k3 = torch.randn(2, 3, 64, dtype=DT)
        attention.append_paged_kv(k3, k3, p.cache, torch.tensor([0, 1]), backend="torch")


@pytest.mark.parametrize("op,backend,config,msg", [
    ("decode", "triton", {"BLOCK_N": 48}, "config['BLOCK_N'] must be a power of two >= 16, got 48"),
    ("decode", "triton", {"num_splits": 129}, "config['num_splits'] must be an int in [0, 128]"),
    ("decode", "triton", {"num_warps": 3}, "config['num_warps'] must be one of 1, 2, 4, 8, 16"),
    ("decode", "triton", {"num_stages": 0}, "config['num_stages'] must be an int >= 1, got 0"),
    ("decode", "triton", {"splits": 4}, "config has unknown keys ['splits']"),
    ("decode", "cuda", {"num_splits": -1}, "config['num_splits'] must be an int in [0, 128]"),
    ("decode", "cuda", {"num_stages": 4}, "config['num_stages'] must be 0 (the default"),
    ("decode", "cuda", {"BLOCK_N": 64}, "unknown keys ['BLOCK_N']; this backend takes"),
    ("prefill", "triton", {"BLOCK_M": 100}, "config['BLOCK_M'] must be a power of two >= 16"),
    ("prefill", "triton", {"HEADS_INNER": 1}, "config['HEADS_INNER'] must be a bool, got 1"),
    ("prefill", "triton", {"BLOCK_M": True}, "config['BLOCK_M'] must be a power of two"),
    ("prefill", "triton", [("BLOCK_M", 64)], "config must be a dict, got list"),
])
def test_bad_launch_configs(op, backend, config, msg):
    """Checked when the plan object is made, before any launch (a bad tile would otherwise be a
    Triton compile error, an unknown key silently ignored)."""
    import types

    from pykernels.attention import _dispatch, plan

    # the runner only needs the backend module's name here (the CUDA one needs a GPU to import)
    mod = types.SimpleNamespace(__name__=f"pykernels.attention.{backend}")
    q, cache = torch.empty(2, 4, 64, dtype=DT), torch.empty(3, 2, 4, 2, 64, dtype=DT)
    spec, attn = _dispatch.spec_from(q, cache), _dispatch.attn_params(64, None, 0.0, -1)
    cls = plan.GenericDecodeRunner if op == "decode" else plan.GenericPrefillRunner
    with pytest.raises((ValueError, TypeError), match=re.escape(msg)):
        cls(mod, spec, attn, config=config)
    cls(plan._NoPlan, spec, attn, config=config)  # a module without launch configs takes any


def test_cuda_split_limit_is_the_kernels():
    """_common.CUDA_MAX_SPLITS (what the tuner searches and the plan clamps to) is the merge's
    kMaxSplits, read from the CUDA header: no GPU or built library needed."""
    header = Path(__file__).resolve().parents[2] / "csrc/attention/decode_utils.cuh"
    found = re.search(r"constexpr int kMaxSplits = (\d+);", header.read_text())
    assert found and int(found.group(1)) == _common.CUDA_MAX_SPLITS
