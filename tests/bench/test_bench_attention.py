"""bench.attention on the CPU: the torch references and the FlashInfer wiring (through a stand-in
with FlashInfer 0.6's plan/run signatures, so the fi builders run here without a GPU)."""

from __future__ import annotations

import types

import pandas as pd
import pytest
import torch

from bench import attention, cli, paged_kv


def _dense_decode(q, k, v):
    group = q.shape[1] // k.shape[2]
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bhd,bnhd->bhn", q, k) / q.shape[-1] ** 0.5
    return torch.einsum("bhn,bnhd->bhd", scores.softmax(-1), v)


def test_torch_paged_decode_matches_dense_attention():
    case = attention.decode_case(3, 37, (4, 2, 16), 16, torch.float32)
    x = attention.Inputs(case, 1, "cpu")
    out = paged_kv.torch_decode(x.q[0], x.kv[0], x.table, x.out[0])
    k, v = paged_kv.gather_kv(x.kv[0], x.table)
    torch.testing.assert_close(out, _dense_decode(x.q[0], k, v), rtol=1e-5, atol=1e-5)
    assert x.table.kv_last_page_len.tolist() == [5, 5, 5]  # 37 = 2 * 16 + 5
    assert sorted(x.table.kv_indices.tolist()) == list(range(9))  # every page once, shuffled
    assert x.table.kv_indices.tolist() != list(range(9))


def test_gather_follows_the_page_table():
    table = paged_kv.uniform_page_table(2, 20, 16, device="cpu")
    cache = torch.arange(table.num_pages, dtype=torch.float32).view(-1, 1, 1, 1, 1)
    cache = cache.expand(-1, 2, 16, 1, 1).contiguous()
    k, _ = paged_kv.gather_kv(cache, table)
    pages = table.kv_indices.view(2, 2)
    assert k.shape == (2, 20, 1, 1)
    assert k[1, 0].item() == pages[1, 0].item() and k[1, 19].item() == pages[1, 1].item()


def test_causal_flops_count():
    assert attention.causal_pairs(4, 4) == 10
    assert attention.causal_pairs(2, 6) == 2 * 4 + 3  # a cached prefix of 4
    case = attention.prefill_case(1, 8192, (32, 8, 128), 16, torch.bfloat16)
    assert case.flops == pytest.approx(4 * 32 * 128 * 8192 * 8193 / 2)


class _FakeDecodeWrapper:
    """FlashInfer 0.6's BatchDecodeWithPagedKVCacheWrapper surface, computed with torch."""

    def __init__(self, workspace, kv_layout="NHD", use_cuda_graph=False, use_tensor_cores=False,
                 paged_kv_indptr_buffer=None, paged_kv_indices_buffer=None,
                 paged_kv_last_page_len_buffer=None, backend="auto"):
        assert kv_layout == "NHD" and workspace.dtype == torch.uint8
        assert use_cuda_graph and paged_kv_last_page_len_buffer is not None
        self.buffers = (paged_kv_indptr_buffer, paged_kv_indices_buffer)

    def plan(self, indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim,
             page_size, *, pos_encoding_mode="NONE", q_data_type=None, kv_data_type=None):
        assert indices.dtype == torch.int32 and q_data_type == kv_data_type
        for buf, src in zip(self.buffers, (indptr, indices)):
            buf.copy_(src)  # what the real plan does in CUDA-graph mode
        kv_len = int(indptr[1] - 1) * page_size + int(last_page_len[0])
        self.table = paged_kv.uniform_page_table(len(last_page_len), kv_len, page_size,
                                                 device="cpu")
        self.table.page_ids = indices.long().view(len(last_page_len), -1)

    def run(self, q, paged_kv_cache, *, out=None):
        return paged_kv.torch_decode(q, paged_kv_cache, self.table, out)


class _FakePrefillWrapper:
    def __init__(self, workspace, kv_layout="NHD"):
        assert kv_layout == "NHD"

    def plan(self, qo_indptr, kv_indptr, kv_indices, kv_last_page_len, num_qo_heads,
             num_kv_heads, head_dim_qk, page_size, *, causal=False, q_data_type="float16",
             kv_data_type=None):
        assert causal
        n = int(qo_indptr[1])
        self.table = paged_kv.uniform_page_table(len(kv_last_page_len), n, page_size, q_len=n,
                                                 device="cpu")
        self.table.page_ids = kv_indices.long().view(len(kv_last_page_len), -1)

    def run(self, q, paged_kv_cache, *, out=None):
        return paged_kv.torch_prefill(q, paged_kv_cache, self.table, out)


@pytest.fixture
def fake_flashinfer(monkeypatch):
    fake = types.SimpleNamespace(BatchDecodeWithPagedKVCacheWrapper=_FakeDecodeWrapper,
                                 BatchPrefillWithPagedKVCacheWrapper=_FakePrefillWrapper)
    monkeypatch.setattr(cli, "load", lambda module="flashinfer": fake)
    return fake


@pytest.mark.parametrize("builder", [attention.build_fi, attention.build_fi_tc])
def test_fi_decode_wiring_matches_the_reference(fake_flashinfer, builder):
    # Same seed, same inputs: the wrapper, planned from the CSR table the builder passes, must
    # agree with the torch provider (40 tokens = 2 full pages + 8).
    case = attention.decode_case(2, 40, (4, 2, 16), 16, torch.float32)
    torch.manual_seed(0)
    fn = builder(case, 2, "cpu")
    torch.manual_seed(0)
    ref = attention.build_torch(case, 2, "cpu")
    torch.testing.assert_close(fn(1), ref(1))
    assert fn(0).shape == (2, 4, 16)


def test_fi_prefill_wiring(fake_flashinfer):
    case = attention.prefill_case(2, 17, (4, 2, 16), 16, torch.float32)
    torch.manual_seed(0)
    out = attention.build_fi(case, 1, "cpu")(0)
    torch.manual_seed(0)
    torch.testing.assert_close(out, attention.build_torch(case, 1, "cpu")(0))
    assert out.shape == (34, 4, 16)


def test_cpu_smoke_attention(tmp_path):
    status = cli.main(attention.FAMILY, ["--cpu", "--mode", "all", "--out", str(tmp_path)])
    assert status == 0
    df = pd.read_csv(tmp_path / "cpu" / "results.csv")
    assert set(zip(df.kernel, df.provider)) == {
        ("paged_decode", "torch"), ("paged_prefill", "torch"), ("paged_prefill", "torch-sdpa")}
    assert set(df.metric) == {"time", "bandwidth", "compute"}
