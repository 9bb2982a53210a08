"""Paged attention on the GPU in one call (issue 5): build, smoke against the reference, then
decode and prefill timings of triton/cuda vs FlashInfer (both decode wrappers), and small sweeps
of the knobs the autotuner will own (split count, Triton block sizes).

    python -m bench.attention_gpu            # everything (~3-5 min on an H200)
    python -m bench.attention_gpu --quick    # 3 decode rows, 1 prefill row, no sweeps

Shapes as ../shared/ANCHORS.md: bf16, 32 q / 8 kv heads, head_dim 128, page 16, NHD, random page
order. Decode is timed as CUDA-graph replays with fixed buffers (plan outside the graph, run
inside), rotating input sets so L2 does not flatter; TB/s = K+V bytes / time. Prefill: causal,
q_len = kv_len, TFLOP/s = 4 * q_heads * head_dim * causal pairs. Results also go to
<--out>/attention_gpu.json when --out is given.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback

import torch

from bench.attention import WORKSPACE_BYTES
from bench.timing import measure, rotation_count
from pykernels import attention
from pykernels.attention import PagedDecode, PagedPrefill, ref

HQ, HKV, D, PS, DT = 32, 8, 128, 16, torch.bfloat16
DECODE_GRID = [(1, 4096), (1, 32768), (4, 4096), (16, 4096), (64, 4096), (256, 4096),
               (64, 16384), (32, 32768), (512, 1024)]
PREFILL_GRID = [(1, 8192), (8, 2048), (32, 512)]
TARGET = {(1, 4096): 1.5, (1, 32768): 1.25, (16, 4096): 1.1}  # ours / faster FI, issue 5
COPY_TBPS = 4.27  # ANCHORS.md device-to-device copy ceiling (read + write)
RESULTS: list[dict] = []


def section(fn):
    def run(*a, **kw):
        print(f"\n== {fn.__name__} ==", flush=True)
        t0 = time.time()
        try:
            fn(*a, **kw)
        except Exception:
            traceback.print_exc()
            print(f"!! {fn.__name__} FAILED", flush=True)
        print(f"-- {fn.__name__}: {time.time() - t0:.0f} s", flush=True)
    return run


def page_table(batch, kv_len, q_len=1, seed=0):
    pages = -(-kv_len // PS)
    gen = torch.Generator().manual_seed(seed)
    i32 = {"dtype": torch.int32, "device": "cuda"}
    return {"kv_indptr": torch.arange(batch + 1, **i32) * pages,
            "kv_indices": torch.randperm(batch * pages, generator=gen).to(**i32),
            "kv_last_page_len": torch.full((batch,), kv_len - (pages - 1) * PS, **i32),
            "qo_indptr": torch.arange(batch + 1, **i32) * q_len, "num_pages": batch * pages}


class Inputs:
    """n input sets (q, cache, out) over one page table; n from the L2 rotation rule."""

    def __init__(self, batch, kv_len, q_len=1, n=None):
        self.t = page_table(batch, kv_len, q_len)
        self.kv_bytes = 2 * batch * kv_len * HKV * D * 2
        cache_bytes = self.t["num_pages"] * 2 * PS * HKV * D * 2
        self.n = n or rotation_count(cache_bytes)
        shape = (self.t["num_pages"], 2, PS, HKV, D)
        self.kv = [torch.randn(shape, dtype=DT, device="cuda") for _ in range(self.n)]
        self.q = [torch.randn(batch * q_len, HQ, D, dtype=DT, device="cuda") for _ in range(self.n)]
        self.out = [torch.empty_like(q) for q in self.q]
        self.table = (self.t["kv_indptr"], self.t["kv_indices"], self.t["kv_last_page_len"])


def ours_decode(x, backend, batch, config=None):
    dec = PagedDecode(HQ, HKV, D, PS, max_batch=batch, max_pages=x.t["num_pages"],
                      backend=backend, config=config)
    dec.plan(*x.table)
    return (lambda i: dec.run(x.q[i], x.kv[i], out=x.out[i])), dec.num_splits


def fi_decode(x, batch, tensor_cores):
    import flashinfer

    ws = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device="cuda")
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        ws, "NHD", use_cuda_graph=True, use_tensor_cores=tensor_cores,
        paged_kv_indptr_buffer=torch.empty_like(x.table[0]),
        paged_kv_indices_buffer=torch.empty_like(x.table[1]),
        paged_kv_last_page_len_buffer=torch.empty_like(x.table[2]))
    w.plan(*x.table, HQ, HKV, D, PS, pos_encoding_mode="NONE", q_data_type=DT, kv_data_type=DT)
    return lambda i: w.run(x.q[i], x.kv[i], out=x.out[i])


def timed(fn, n, graph=True):
    return measure(fn, n_inputs=n, graph=graph).median_us


def record(kind, shape, provider, us, metric, unit, **extra):
    RESULTS.append({"kind": kind, **shape, "provider": provider, "us": round(us, 2),
                    unit: round(metric, 3), **extra})


@section
def build():
    from pykernels import _ops

    t0 = time.time()
    ok, where = _ops.available()
    print(f"CUDA ops: {ok} ({where}) in {time.time() - t0:.0f} s")
    print("backends:", attention.backends())
    import triton

    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}, "
          f"triton {triton.__version__}")


@section
def smoke():
    lens, q_lens = [1, 17, 4097, 0, 300], [1, 5, 100, 0, 300]
    pages = [-(-n // PS) for n in lens]
    perm = torch.randperm(sum(pages) + 2)
    blocks = torch.zeros(len(lens), max(pages), dtype=torch.long)
    at = 0
    for r, n in enumerate(pages):
        blocks[r, :n] = perm[at:at + n]
        at += n
    table = [t.cuda() for t in attention.page_table(blocks, torch.tensor(lens), PS)]
    cache = torch.randn(sum(pages) + 2, 2, PS, HKV, D, dtype=DT, device="cuda")
    q = torch.randn(len(lens), HQ, D, dtype=DT, device="cuda")
    want = ref.decode_ref(q, cache, *table)
    for backend in ["triton", "cuda", "fi", "torch"]:
        _smoke_one("decode", backend, want,
                   lambda b=backend: attention.paged_decode(q, cache, *table, backend=b))
    qo = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32).cuda()
    qp = torch.randn(sum(q_lens), HQ, D, dtype=DT, device="cuda")
    want = ref.prefill_ref(qp, cache, qo, *table)
    for backend in ["triton", "fi"]:
        _smoke_one("prefill", backend, want,
                   lambda b=backend: attention.paged_prefill(qp, cache, qo, *table, backend=b))


def _smoke_one(kind, backend, want, fn):
    try:
        got = fn().float()
        err = (got - want).abs().max().item()
        status = "OK" if err < 2e-2 and not got.isnan().any() else "FAIL"
        print(f"{kind:<8} {backend:<7} max|err| {err:.2e}  {status}", flush=True)
    except Exception as e:
        print(f"{kind:<8} {backend:<7} ERROR {type(e).__name__}: {str(e)[:300]}", flush=True)


@section
def decode(grid):
    print(f"{'bs':>4} {'kv':>6} {'provider':<8} {'us':>8} {'TB/s':>6} {'%copy':>6} {'vs FI':>6}"
          "  splits")
    for batch, kv_len in grid:
        x = Inputs(batch, kv_len)
        rows = {}
        for name, make in [("fi", lambda x=x, b=batch: (fi_decode(x, b, False), 1)),
                           ("fi-tc", lambda x=x, b=batch: (fi_decode(x, b, True), 1)),
                           ("triton", lambda x=x, b=batch: ours_decode(x, "triton", b)),
                           ("cuda", lambda x=x, b=batch: ours_decode(x, "cuda", b)),
                           ("cuda-s2", lambda x=x, b=batch: ours_decode(
                               x, "cuda", b, {"num_stages": 2}))]:
            try:
                fn, splits = make()
                rows[name] = (timed(fn, x.n), splits)
            except Exception as e:
                print(f"{batch:>4} {kv_len:>6} {name:<8} ERROR {type(e).__name__}: {str(e)[:200]}")
        fi_best = min((rows[k][0] for k in ("fi", "fi-tc") if k in rows), default=float("nan"))
        for name, (us, splits) in rows.items():
            tb = x.kv_bytes / us / 1e6
            print(f"{batch:>4} {kv_len:>6} {name:<8} {us:8.1f} {tb:6.2f} {tb / COPY_TBPS:6.0%} "
                  f"{fi_best / us:6.2f}  {splits}", flush=True)
            record("decode", {"batch": batch, "kv_len": kv_len}, name, us, tb, "tbps",
                   splits=splits, vs_fi=round(fi_best / us, 3))
        ours = min((rows[k][0] for k in ("triton", "cuda", "cuda-s2") if k in rows),
                   default=float("nan"))
        need = TARGET.get((batch, kv_len), 1.0)
        verdict = "PASS" if fi_best / ours >= need else "MISS"
        print(f"{'':>11} best ours {fi_best / ours:.2f}x faster FI (target {need}x): {verdict}")
        del x
        torch.cuda.empty_cache()


@section
def split_sweep(grid):
    """Split count per backend on the small-batch rows (what autotune.attention will tune)."""
    for batch, kv_len in grid:
        x = Inputs(batch, kv_len)
        for backend in ["cuda", "triton"]:
            res = []
            for splits in [1, 2, 4, 8, 16, 24, 32, 48, 64]:
                try:
                    fn, used = ours_decode(x, backend, batch, {"num_splits": splits})
                    res.append((timed(fn, x.n), used))
                except Exception as e:
                    print(backend, splits, "ERROR", str(e)[:200])
            line = " ".join(f"{s}:{us:.1f}" for us, s in res)
            best = min(res)
            print(f"bs={batch} kv={kv_len} {backend:<6} best {best[0]:.1f} us @ {best[1]} | {line}",
                  flush=True)
            record("decode_splits", {"batch": batch, "kv_len": kv_len}, backend, best[0],
                   best[1], "best_splits", sweep=res)
        del x
        torch.cuda.empty_cache()


@section
def triton_decode_sweep(rows):
    for batch, kv_len in rows:
        x = Inputs(batch, kv_len)
        res = []
        for bn in (32, 64, 128):
            for warps in (4, 8):
                for stages in (2, 3, 4):
                    cfg = {"BLOCK_N": bn, "num_warps": warps, "num_stages": stages}
                    try:
                        fn, splits = ours_decode(x, "triton", batch, cfg)
                        res.append((timed(fn, x.n), cfg, splits))
                    except Exception as e:
                        print(cfg, "ERROR", str(e)[:150])
        res.sort(key=lambda r: r[0])
        for us, cfg, splits in res[:5]:
            print(f"bs={batch} kv={kv_len} {us:8.1f} us {x.kv_bytes / us / 1e6:5.2f} TB/s "
                  f"splits={splits} {cfg}", flush=True)
        if res:
            record("triton_decode_sweep", {"batch": batch, "kv_len": kv_len}, "triton", res[0][0],
                   x.kv_bytes / res[0][0] / 1e6, "tbps", config=res[0][1])
        del x
        torch.cuda.empty_cache()


def causal_flops(batch, n):
    return 4 * batch * HQ * D * (n * (n + 1) // 2)


def ours_prefill(x, batch, n, config=None):
    pre = PagedPrefill(HQ, HKV, D, PS, backend="triton", config=config)
    pre.plan(x.t["qo_indptr"], *x.table, num_tokens=batch * n)
    return lambda i: pre.run(x.q[i], x.kv[i], out=x.out[i])


def fi_prefill(x, batch, n):
    import flashinfer

    ws = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device="cuda")
    w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD")
    w.plan(x.t["qo_indptr"], *x.table, HQ, HKV, D, PS, causal=True, q_data_type=DT,
           kv_data_type=DT)
    return lambda i: w.run(x.q[i], x.kv[i], out=x.out[i])


@section
def prefill(grid, sweep):
    print(f"{'batch x n':>10} {'provider':<8} {'us':>9} {'TFLOP/s':>8} {'vs FI':>6}")
    for batch, n in grid:
        x = Inputs(batch, n, q_len=n, n=2)
        flops = causal_flops(batch, n)
        rows = {}
        for name, make in [("fi", lambda x=x, b=batch, n=n: fi_prefill(x, b, n)),
                           ("triton", lambda x=x, b=batch, n=n: ours_prefill(x, b, n))]:
            try:
                rows[name] = timed(make(), x.n, graph=None)
            except Exception as e:
                print(f"{batch}x{n} {name} ERROR {type(e).__name__}: {str(e)[:200]}")
        fi = rows.get("fi", float("nan"))
        for name, us in rows.items():
            tf = flops / us / 1e6
            print(f"{batch:>4}x{n:<5} {name:<8} {us:9.1f} {tf:8.1f} {fi / us:6.2f}", flush=True)
            record("prefill", {"batch": batch, "q_len": n}, name, us, tf, "tflops",
                   vs_fi=round(fi / us, 3))
        if sweep:
            _prefill_sweep(x, batch, n, flops)
        del x
        torch.cuda.empty_cache()


def _prefill_sweep(x, batch, n, flops):
    res = []
    for bm, bn, warps, stages in [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3),
                                  (64, 64, 4, 3), (128, 64, 8, 4), (128, 32, 8, 3),
                                  (64, 128, 4, 2), (256, 64, 8, 3)]:
        cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}
        try:
            res.append((timed(ours_prefill(x, batch, n, cfg), x.n, graph=None), cfg))
        except Exception as e:
            print(cfg, "ERROR", str(e)[:150])
    res.sort(key=lambda r: r[0])
    for us, cfg in res[:4]:
        tflops = flops / us / 1e6
        print(f"   sweep {batch}x{n} {us:9.1f} us {tflops:7.1f} TFLOP/s {cfg}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--out", default=None, help="folder for attention_gpu.json")
    args = ap.parse_args()
    sweep = not (args.quick or args.no_sweep)
    build()
    smoke()
    decode([(1, 4096), (16, 4096), (64, 4096)] if args.quick else DECODE_GRID)
    prefill([(8, 2048)] if args.quick else PREFILL_GRID, sweep)
    if sweep:
        split_sweep([(1, 4096), (1, 32768), (4, 4096), (16, 4096)])
        triton_decode_sweep([(1, 4096), (64, 4096)])
    if args.out:
        with open(os.path.join(args.out, "attention_gpu.json"), "w") as f:
            json.dump(RESULTS, f, indent=1)


if __name__ == "__main__":
    main()
