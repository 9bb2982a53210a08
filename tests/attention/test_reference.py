"""The reference (pykernels.attention.ref) against a float64 oracle written from the definitions,
and the page-table helpers. CPU only."""

from __future__ import annotations

import pytest
import torch

from pykernels.attention import append_slots, page_table, ref
from tests.attention._cases import Paged, naive

HQ, HKV, D = 6, 2, 64


def _blocks(p: Paged):
    ptr, idx = p.kv_indptr.tolist(), p.kv_indices.tolist()
    return lambda r: idx[ptr[r]:ptr[r + 1]]


@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("kw", [{}, {"logits_soft_cap": 3.0}, {"window_left": 4},
                                {"sm_scale": 0.3, "k_scale": 0.5, "v_scale": 2.0}])
def test_decode_ref_matches_oracle(page_size, kw):
    p = Paged([1, 7, 16, 17, 0, 33], page_size, HKV, D, torch.float32)
    q = p.q(HQ, D, torch.float32)
    got = ref.decode_ref(q, p.cache, *p.table, **kw)
    oracle_kw = {("soft_cap" if k == "logits_soft_cap" else k): v for k, v in kw.items()}
    want = naive(q, p.cache, p.kv_lens, p.q_lens, _blocks(p), **oracle_kw)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    assert torch.count_nonzero(got[4]) == 0  # the empty request


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kw", [{}, {"window_left": 3}, {"logits_soft_cap": 2.0}])
def test_prefill_ref_matches_oracle_with_prefix(causal, kw):
    # q shorter than kv (cached prefix), q == kv, an empty request, one with no queries.
    p = Paged([9, 5, 0, 12, 20], 4, HKV, D, torch.float32, q_lens=[3, 5, 0, 0, 7])
    q = p.q(HQ, D, torch.float32)
    got = ref.prefill_ref(q, p.cache, p.qo_indptr, *p.table, causal=causal, **kw)
    oracle_kw = {("soft_cap" if k == "logits_soft_cap" else k): v for k, v in kw.items()}
    want = naive(q, p.cache, p.kv_lens, p.q_lens, _blocks(p), causal=causal, **oracle_kw)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_window_zero_sees_only_itself():
    p = Paged([5], 2, 1, 64, torch.float32)
    q = p.q(1, 64, torch.float32)
    got = ref.decode_ref(q, p.cache, *p.table, window_left=0)
    last_v = p.cache[p.kv_indices[2], 1, 0, 0]  # position 4 = page 2, slot 0
    torch.testing.assert_close(got[0, 0], last_v)


def test_page_table_from_block_tables():
    blocks = torch.tensor([[3, 1, 8], [0, 9, 9], [5, 5, 5]])
    indptr, indices, last = page_table(blocks, torch.tensor([17, 5, 0]), 16)
    assert indptr.tolist() == [0, 2, 3, 3]
    assert indices.tolist() == [3, 1, 0]
    assert last.tolist() == [1, 5, 0]
    assert indptr.dtype == indices.dtype == last.dtype == torch.int32
    with pytest.raises(ValueError, match="fewer than the 2 pages"):
        page_table(torch.tensor([[1]]), torch.tensor([17]), 16)


def test_append_slots_are_the_last_positions():
    # Lengths already include the appended tokens: 5 (2 new), 1 (1 new), 8 (0 new).
    indptr, indices, last = page_table(torch.tensor([[7, 2], [4, 0], [1, 3]]),
                                       torch.tensor([5, 1, 8]), 4)
    append = torch.tensor([0, 2, 3, 3], dtype=torch.int32)
    slots = append_slots(indptr, indices, last, append, 4)
    # request 0: positions 3 (page 7, slot 3) and 4 (page 2, slot 0); request 1: position 0.
    assert slots.tolist() == [7 * 4 + 3, 2 * 4 + 0, 4 * 4 + 0]
    assert append_slots(indptr, indices, last, append, 4, num_tokens=3).tolist() == slots.tolist()


def test_append_ref_fp8_saturates_and_skips_padding():
    cache = torch.zeros(2, 2, 4, 1, 64, dtype=torch.float8_e4m3fn)
    k = torch.full((2, 1, 64), 1000.0, dtype=torch.bfloat16)
    v = torch.full((2, 1, 64), -3.0, dtype=torch.bfloat16)
    ref.append_ref(k, v, cache, torch.tensor([5, -1]), k_scale=1.0, v_scale=0.5)
    assert cache[1, 0, 1].float().unique().tolist() == [448.0]
    assert cache[1, 1, 1].float().unique().tolist() == [-6.0]
    assert cache.float().count_nonzero() == 2 * 64
