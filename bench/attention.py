"""``python -m bench.attention``: paged decode and causal prefill, ours vs FlashInfer vs torch.

Layout: KV cache ``[num_pages, 2, page_size, num_kv_heads, head_dim]`` (NHD), CSR page table,
random page order (bench/paged_kv.py). Grid: ``DECODE_GRID`` / ``PREFILL_GRID`` of bench/shapes.py
with the model's heads (default llama-3-8b: 32 q / 8 kv heads, head_dim 128), page 16, bf16, as
../shared/ANCHORS.md measured them.

- decode: every provider timed as CUDA-graph replays with fixed buffers (plan outside the graph,
  run inside); effective TB/s = KV bytes / time, fraction of the copy ceiling.
- prefill: TFLOP/s of the causal attention (4 * q_heads * head_dim per (query, key) pair kept by
  the mask), fraction of the bf16 GEMM ceiling.

Providers: ``fi`` (FlashInfer's CUDA-core decode wrapper and its prefill wrapper) and ``fi-tc``
(decode on tensor cores), both selected by ``--backend fi``; ``torch`` (gather pages + SDPA) and
``torch-sdpa`` (prefill: SDPA on contiguous K/V, the kernel alone), both selected by ``--backend
torch``; ``triton`` and ``cuda`` through pykernels.attention's PagedDecode / PagedPrefill (issue
5; reported as skipped until that module imports). A new backend is one ``Provider`` line in
``PROVIDERS``.

    python -m bench.attention --backend fi                  # the decode grid, both wrappers
    python -m bench.attention --backend fi,torch --mode prefill --compare
    python -m bench.attention --cpu --out /tmp/r            # tiny CPU smoke (torch only)
"""

from __future__ import annotations

import argparse
import importlib.util

import torch
import torch.nn.functional as F

from bench import cli, paged_kv, shapes
from bench.cli import Case, Family, Provider, main

# FlashInfer's float workspace (split-KV partials), as pykernels.attention.fi sizes it: 128 MB
# overflowed on the tensor-core decode at bs=512. A copy: importing fi.py imports flashinfer, which
# the bench loads through cli.load (the CPU tests hand it a fake).
WORKSPACE_BYTES = 394 << 20
QUICK_DECODE = [(1, 4096), (16, 4096), (64, 4096)]
QUICK_PREFILL = [(8, 2048)]
CPU_DECODE = [(2, 33)]  # 3 pages, the last one holding 1 token
CPU_PREFILL = [(2, 17)]
CPU_HEADS = (4, 2, 32)  # q heads, kv heads, head_dim


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", default="decode", choices=("decode", "prefill", "all"),
                   help="decode (default), causal prefill, or both")
    p.add_argument("--page-size", type=int, default=16, help="tokens per page (default 16)")


def _heads(args: argparse.Namespace) -> tuple[int, int, int]:
    if args.cpu:
        return CPU_HEADS
    m = shapes.get(args.model or "llama-3-8b")
    return m.num_q_heads, m.num_kv_heads, m.head_dim


def decode_case(batch, kv_len, heads, page, dtype, model="") -> Case:
    hq, hkv, d = heads
    kv_bytes = 2 * batch * kv_len * hkv * d * dtype.itemsize  # K and V, the anchors' TB/s basis
    shape = {"batch": batch, "kv_len": kv_len, "num_q_heads": hq, "num_kv_heads": hkv,
             "head_dim": d, "page_size": page}
    return Case("paged_decode", shape, dtype, nbytes=kv_bytes, model=model, graph=True)


def causal_pairs(q_len: int, kv_len: int) -> int:
    """(query, key) pairs a bottom-right aligned causal mask keeps: query i of q_len sees the
    kv_len - q_len cached keys and itself plus the i queries before it."""
    return q_len * (kv_len - q_len) + q_len * (q_len + 1) // 2


def prefill_case(batch, seq_len, heads, page, dtype, model="") -> Case:
    hq, hkv, d = heads
    flops = 4 * batch * hq * d * causal_pairs(seq_len, seq_len)  # QK^T and PV, 2 flops a MAC
    footprint = batch * seq_len * (2 * hq + 2 * hkv) * d * dtype.itemsize  # q, out, K, V
    shape = {"batch": batch, "q_len": seq_len, "kv_len": seq_len, "num_q_heads": hq,
             "num_kv_heads": hkv, "head_dim": d, "page_size": page}
    return Case("paged_prefill", shape, dtype, flops=flops, model=model, footprint=footprint)


def make_cases(args: argparse.Namespace) -> list[Case]:
    heads, model = _heads(args), ("" if args.cpu else args.model or "llama-3-8b")
    cases = []
    if args.mode in ("decode", "all"):
        grid = CPU_DECODE if args.cpu else QUICK_DECODE if args.quick else shapes.DECODE_GRID
        cases += [decode_case(b, n, heads, args.page_size, args.dtype, model) for b, n in grid]
    if args.mode in ("prefill", "all"):
        grid = CPU_PREFILL if args.cpu else QUICK_PREFILL if args.quick else shapes.PREFILL_GRID
        cases += [prefill_case(b, n, heads, args.page_size, args.dtype, model) for b, n in grid]
    return cases


class Inputs:
    """n independent input sets (q, cache, out) over one shared page table."""

    def __init__(self, case: Case, n: int, device: str):
        s = case.shape
        q_len = s.get("q_len", 1)
        self.table = paged_kv.uniform_page_table(s["batch"], s["kv_len"], s["page_size"],
                                                 q_len=q_len, device=device)
        rows, hq, d = s["batch"] * q_len, s["num_q_heads"], s["head_dim"]
        self.q = [torch.randn(rows, hq, d, dtype=case.dtype, device=device) for _ in range(n)]
        self.out = [torch.empty_like(q) for q in self.q]
        self.kv = [paged_kv.kv_cache(self.table.num_pages, s["page_size"], s["num_kv_heads"], d,
                                     case.dtype, device) for _ in range(n)]
        self.heads = (hq, s["num_kv_heads"], d)


# ---- FlashInfer -----------------------------------------------------------------------------


def _fi_decode(case: Case, n: int, device: str, tensor_cores: bool):
    fi = cli.load()
    x = Inputs(case, n, device)
    t = x.table
    workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
    # CUDA-graph mode: the page table lives in buffers the wrapper owns, plan() refills them
    # outside the graph and run() is captured with fixed addresses (ANCHORS.md, 2nd table).
    wrapper = fi.BatchDecodeWithPagedKVCacheWrapper(
        workspace, "NHD", use_cuda_graph=True, use_tensor_cores=tensor_cores,
        paged_kv_indptr_buffer=torch.empty_like(t.kv_indptr),
        paged_kv_indices_buffer=torch.empty_like(t.kv_indices),
        paged_kv_last_page_len_buffer=torch.empty_like(t.kv_last_page_len))
    hq, hkv, d = x.heads
    wrapper.plan(t.kv_indptr, t.kv_indices, t.kv_last_page_len, hq, hkv, d, t.page_size,
                 pos_encoding_mode="NONE", q_data_type=case.dtype, kv_data_type=case.dtype)
    return lambda i: wrapper.run(x.q[i], x.kv[i], out=x.out[i])


def _fi_prefill(case: Case, n: int, device: str):
    fi = cli.load()
    x = Inputs(case, n, device)
    t = x.table
    workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
    wrapper = fi.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD")
    hq, hkv, d = x.heads
    wrapper.plan(t.qo_indptr, t.kv_indptr, t.kv_indices, t.kv_last_page_len, hq, hkv, d,
                 t.page_size, causal=True, q_data_type=case.dtype, kv_data_type=case.dtype)
    return lambda i: wrapper.run(x.q[i], x.kv[i], out=x.out[i])


def build_fi(case: Case, n: int, device: str):
    if case.kernel == "paged_decode":
        return _fi_decode(case, n, device, tensor_cores=False)
    return _fi_prefill(case, n, device)


def build_fi_tc(case: Case, n: int, device: str):
    return _fi_decode(case, n, device, tensor_cores=True)


# ---- torch ----------------------------------------------------------------------------------


def build_torch(case: Case, n: int, device: str):
    x = Inputs(case, n, device)
    ref = paged_kv.torch_decode if case.kernel == "paged_decode" else paged_kv.torch_prefill
    return lambda i: ref(x.q[i], x.kv[i], x.table, x.out[i])


def build_sdpa(case: Case, n: int, device: str):
    """Causal SDPA on contiguous [batch, q_heads, len, d] tensors, K/V already expanded to the
    q heads: the attention kernel alone, no paging, no GQA handling (ANCHORS.md's SDPA column)."""
    s = case.shape
    shape = (s["batch"], s["num_q_heads"], s["q_len"], s["head_dim"])
    qkv = [[torch.randn(shape, dtype=case.dtype, device=device) for _ in range(3)]
           for _ in range(n)]
    return lambda i: F.scaled_dot_product_attention(*qkv[i], is_causal=True)


# ---- ours (issue 5) -------------------------------------------------------------------------


def _ours_available(name: str):
    def available(device: str) -> str | None:
        if importlib.util.find_spec("pykernels.attention") is None:
            return "pykernels.attention does not exist yet (issue 5)"
        mod = cli.module_or_reason("pykernels.attention")
        if isinstance(mod, str):
            return mod
        return mod.backends().get(name) if hasattr(mod, "backends") else None

    return available


def _build_ours(name: str):
    """Our backend through pykernels.attention's plan/run objects, the way FlashInfer is driven:
    decode with fixed buffers (max_batch, max_pages) so run() is graph-captured, plan outside."""

    def build(case: Case, n: int, device: str):
        attn = cli.load("pykernels.attention")
        x = Inputs(case, n, device)
        t, (hq, hkv, d) = x.table, x.heads
        common = {"dtype": case.dtype, "device": device, "backend": name}
        if case.kernel == "paged_decode":
            op = attn.PagedDecode(hq, hkv, d, t.page_size, max_batch=t.batch,
                                  max_pages=t.num_pages, **common)
            op.plan(t.kv_indptr, t.kv_indices, t.kv_last_page_len)
        else:
            op = attn.PagedPrefill(hq, hkv, d, t.page_size, causal=True, **common)
            op.plan(t.qo_indptr, t.kv_indptr, t.kv_indices, t.kv_last_page_len,
                    num_tokens=x.q[0].shape[0])
        return lambda i: op.run(x.q[i], x.kv[i], out=x.out[i])

    return build


FI_OK = cli.importable("flashinfer")
PROVIDERS = (
    Provider("triton", _build_ours("triton"), available=_ours_available("triton")),
    # No CUDA prefill kernel (optional in issue 5): the cuda provider runs decode only.
    Provider("cuda", _build_ours("cuda"), available=_ours_available("cuda"),
             kernels=("paged_decode",)),
    Provider("fi", build_fi, available=FI_OK, hint=cli.FI_HINT, peer=True),
    Provider("fi-tc", build_fi_tc, backend="fi", available=FI_OK, hint=cli.FI_HINT,
             kernels=("paged_decode",), peer=True),
    Provider("torch", build_torch, cpu=True, peer=True),
    Provider("torch-sdpa", build_sdpa, backend="torch", cpu=True, kernels=("paged_prefill",),
             peer=True),
)

FAMILY = Family(
    name="attention",
    description="Paged attention (decode, causal prefill): ours vs FlashInfer vs torch.",
    providers=PROVIDERS,
    cases=make_cases,
    presets=("anchors",),
    add_arguments=add_arguments,
)

if __name__ == "__main__":
    raise SystemExit(main(FAMILY))
