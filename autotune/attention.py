"""`python -m autotune.attention`: tune paged attention, the kernels' launch configs and the
backend that `auto` picks per shape.

    python -m autotune.attention                   # ANCHORS grid: decode and prefill, every op
    python -m autotune.attention --mode decode --batch-sizes 1,2,4,8,16,32,64 --kv-lens 1024,4096
    python -m autotune.attention --mode prefill --prefill 8x2048 --prefill 4x1024x4096
    python -m autotune.attention --shape num_q_heads=64,num_kv_heads=8,head_dim=128 --dry-run

Ops, tuned in this order, so that a backend choice times every backend with the config just
tuned for it (the plan/run objects look their configs up as in serving):

- paged_decode_triton: num_splits x BLOCK_N x num_warps x num_stages (Tunable in triton_decode.py)
- paged_decode_cuda: num_splits x num_stages of the CUDA kernel (pykernels/attention/tunables.py)
- paged_decode_backend: {"backend": triton | cuda | fi}, what `auto` decodes with
- paged_prefill_triton: BLOCK_M x BLOCK_N x num_warps x num_stages (triton_prefill.py)
- paged_prefill_backend: {"backend": triton | fi}

The search spaces and their pruning live in autotune/attention_space.py.

Shapes: heads from --model presets (default llama-3-8b: 32 q / 8 kv heads, d=128) or --shape,
page 16, --dtype bfloat16, the cache in q's dtype (--kv-dtype float8_e4m3fn for an fp8 cache).
Decode: the ANCHORS grid (bench.shapes.DECODE_GRID), or --batch-sizes x --kv-lens (either one
defaults to the grid's values). Prefill: causal, bench.shapes.PREFILL_GRID plus PREFIX_GRID
(cached prefixes), or --prefill BATCHxQ_LEN[xKV_LEN] (repeatable). A request layout's keys are its
bucket (decode batch or prefill token count) and its kv length rounded up to a power of two, as
the plans look configs up; layouts that share a bucket are timed together (their times add up),
e.g. 8x2048 and 16x1024x2048 (16384 tokens over ~2048 keys each).

Every candidate is checked against pykernels.attention.ref, then timed through PagedDecode /
PagedPrefill (decode with fixed buffers, CUDA-graph replay as bench.attention does). Backends
that cannot run here are skipped with a note. An entry {"backend": "auto"} means the fixed order
(measured as the backend it gives) was the fastest. --quick searches a few configs per op (a GPU
smoke run of the pipeline); --cpu a tiny space through the Triton interpreter.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from autotune import cli
from autotune import tunable as tunable_mod
from autotune.attention_space import spaces, usable_backends
from autotune.cli import Family, Op, dtype_of, input_sets
from autotune.space import canonical
from autotune.tuner import Case, default_timer, plan, tune
from pykernels import envs
from pykernels.attention import _common, _dispatch, ref, triton_decode, triton_prefill, tunables

# Cached-prefix prefill (batch, new tokens, kv length), next to the causal PREFILL_GRID.
PREFIX_GRID = [(1, 2048, 8192), (4, 1024, 4096), (16, 512, 2048)]
DEFAULT_MODEL = "llama-3-8b"
NAN = float("nan")


# ---- request layouts and their inputs -----------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """`batch` requests of `q_len` new tokens (1: decode) over `kv_len` keys each."""

    batch: int
    q_len: int
    kv_len: int

    def __str__(self) -> str:
        return f"{self.batch}x{self.q_len}x{self.kv_len}"


# (tunable name, entry key) -> the layouts of that bucket (filled when the jobs are built: the
# tuner hands a case only the normalized shape).
_LAYOUTS: dict[tuple[str, str], list[Layout]] = {}


def kv_key(kv_len: int, page_size: int) -> int:
    """The kv_len key field of a uniform layout, as the plans compute it from the page count."""
    return tunables.pow2(-(-kv_len // page_size) * page_size)


def layouts_of(name: str, shape: dict) -> list[Layout]:
    """The registered layouts of a bucket, else one made from the shape itself."""
    t = tunable_mod.get(name)
    found = _LAYOUTS.get((name, t.key_of(t.shape_of(**shape))))
    if found:
        return found
    if "batch" in shape:
        return [Layout(shape["batch"], 1, shape["kv_len"])]
    tokens = shape["tokens"]
    kv = max(shape.get("kv_len", tokens), 1)
    batch = max(1, tokens // kv)
    return [Layout(batch, max(1, tokens // batch), max(kv, tokens // batch))]


class Inputs:
    """n input sets (q, cache, out) of one layout over one page table (bench/paged_kv.py), and
    the reference output of set 0 (pykernels.attention.ref, fp32, rounded to q's dtype)."""

    def __init__(self, shape: dict, lay: Layout, device: str):
        from bench import paged_kv

        dtype, kv_dtype = dtype_of(shape), getattr(torch, shape["kv_dtype"])
        hq, hkv, d, page = (shape[k] for k in ("num_q_heads", "num_kv_heads", "head_dim",
                                               "page_size"))
        self.layout, self.rows = lay, lay.batch * lay.q_len
        t = self.table = paged_kv.uniform_page_table(lay.batch, lay.kv_len, page,
                                                     q_len=lay.q_len, device=device)
        nbytes = (2 * t.num_pages * page * hkv * d * kv_dtype.itemsize
                  + 2 * self.rows * hq * d * dtype.itemsize)
        self.n = input_sets(nbytes, device)
        self.q = [torch.randn(self.rows, hq, d, dtype=dtype, device=device)
                  for _ in range(self.n)]
        self.out = [torch.empty_like(q) for q in self.q]
        self.kv = [torch.randn(t.num_pages, 2, page, hkv, d, dtype=dtype,
                               device=device).to(kv_dtype) for _ in range(self.n)]
        tab = (t.kv_indptr, t.kv_indices, t.kv_last_page_len)
        if lay.q_len == 1 and "batch" in shape:
            want = ref.decode_ref(self.q[0], self.kv[0], *tab)
        else:
            want = ref.prefill_ref(self.q[0], self.kv[0], t.qo_indptr, *tab, causal=True)
        self.expected = want.to(dtype)


def _heads(shape: dict) -> tuple:
    return (shape["num_q_heads"], shape["num_kv_heads"], shape["head_dim"], shape["page_size"])


def _op_kwargs(shape: dict, device: str, backend: str, config: dict | None) -> dict:
    return {"dtype": dtype_of(shape), "kv_dtype": getattr(torch, shape["kv_dtype"]),
            "device": device, "backend": backend, "config": config}


def decode_op(shape: dict, x: Inputs, backend: str, config: dict | None):
    """A planned PagedDecode with fixed buffers (graph-capturable run, as bench.attention)."""
    from pykernels.attention import PagedDecode

    t = x.table
    op = PagedDecode(*_heads(shape), max_batch=t.batch, max_pages=t.num_pages,
                     **_op_kwargs(shape, str(t.kv_indptr.device), backend, config))
    op.plan(t.kv_indptr, t.kv_indices, t.kv_last_page_len)
    want = (config or {}).get("num_splits")
    if want and op.num_splits != want:
        raise ValueError(f"the plan clamped num_splits {want} to {op.num_splits} (split-KV "
                         f"workspace of a max_batch={t.batch} plan)")
    return op


def prefill_op(shape: dict, x: Inputs, backend: str, config: dict | None):
    from pykernels.attention import PagedPrefill

    t = x.table
    op = PagedPrefill(*_heads(shape), causal=True,
                      **_op_kwargs(shape, str(t.kv_indptr.device), backend, config))
    op.plan(t.qo_indptr, t.kv_indptr, t.kv_indices, t.kv_last_page_len, num_tokens=x.rows)
    return op


def check_attention(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Raise AssertionError unless `actual` matches the reference. The absolute tolerance (the
    dtype's, autotune.cli.TOLERANCE) is scaled by each query row's largest reference value: an
    output averaged over 32k keys is ~0.02, under the plain bf16 atol of 0.02, so a config that
    wrote zeros there would pass a fixed tolerance."""
    atol, rtol = cli.TOLERANCE.get(expected.dtype, (1e-2, 1e-2))
    a, e = actual.float(), expected.float()
    row_max = e.abs().amax(dim=tuple(range(1, e.dim())), keepdim=True)
    allowed = atol * row_max + rtol * e.abs()
    err = (a - e).abs()
    bad = ~(err <= allowed)  # NaN fails too
    if bool(bad.any()):
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(
            f"{what} differs from the reference: {int(bad.sum())} of {bad.numel()} values, "
            f"first at flat index {i}: {a.flatten()[i].item():.5g} vs "
            f"{e.flatten()[i].item():.5g} (allowed error {allowed.flatten()[i].item():.3g})")


def make_case(name: str, build_op, shape: dict, device: str) -> Case:
    """The Case of one bucket: every layout of the bucket run in turn with the candidate's
    plan/run objects (kept for the candidate being checked and timed, then dropped)."""
    inputs = [Inputs(shape, lay, device) for lay in layouts_of(name, shape)]
    held: dict = {}

    def ops_for(config):
        key = canonical(config)
        if key not in held:
            held.clear()  # free the previous candidate's plans and workspaces first
            held[key] = [build_op(shape, x, config) for x in inputs]
        return held[key]

    def run(config, i):
        for x, op in zip(inputs, ops_for(config)):
            j = i % x.n
            op.run(x.q[j], x.kv[j], out=x.out[j])

    def check(config):
        for x, op in zip(inputs, ops_for(config)):
            x.out[0].fill_(NAN)
            op.run(x.q[0], x.kv[0], out=x.out[0])
            check_attention(x.out[0], x.expected, f"output of layout {x.layout}")

    return Case(run, check, max(x.n for x in inputs))


def _choice_builder(kind: str, device: str):
    """Build the plan/run object of a backend-choice candidate; "auto" runs the fixed order's
    backend (what auto gives without a tuned choice)."""
    family = _dispatch.DECODE if kind == "decode" else _dispatch.PREFILL
    build = decode_op if kind == "decode" else prefill_op

    def build_op(shape, x, config):
        name = config["backend"]
        if name == "auto":
            name = _dispatch.fixed_backend(family, torch.device(device))
        return build(shape, x, name, None)

    return build_op


def case_maker(name: str):
    """make_case(shape, device) of an op."""
    def make(shape: dict, device: str) -> Case:
        if name.endswith("_backend"):
            kind = "decode" if "decode" in name else "prefill"
            return make_case(name, _choice_builder(kind, device), shape, device)
        build = decode_op if "decode" in name else prefill_op
        backend = name.split("_")[-1]  # triton or cuda

        def build_op(shape, x, config):
            return build(shape, x, backend, config)

        return make_case(name, build_op, shape, device)

    return make


def _model_heads(model) -> list[dict]:
    return [{"num_q_heads": model.num_q_heads, "num_kv_heads": model.num_kv_heads,
             "head_dim": model.head_dim}]


TUNABLES = {
    "paged_decode_triton": triton_decode.DECODE,
    "paged_decode_cuda": tunables.DECODE_CUDA,
    "paged_decode_backend": tunables.DECODE_BACKEND,
    "paged_prefill_triton": triton_prefill.PREFILL,
    "paged_prefill_backend": tunables.PREFILL_BACKEND,
}
DECODE_OPS = ("paged_decode_triton", "paged_decode_cuda", "paged_decode_backend")
PREFILL_OPS = ("paged_prefill_triton", "paged_prefill_backend")


def build_family(kind: str = "full") -> Family:
    sp = spaces(kind)
    return Family(
        name="attention",
        description="Tune paged attention: the Triton and CUDA launch configs, and the backend "
                    "that auto picks per shape (docs/attention.md, Config knobs).",
        ops={n: Op(t, sp[n], case_maker(n), _model_heads) for n, t in TUNABLES.items()},
        default_models=(DEFAULT_MODEL,),
    )


FAMILY = build_family()


# ---- jobs: shapes per op ------------------------------------------------------------------------


def _prefill_arg(text: str) -> Layout:
    try:
        parts = [int(v) for v in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (2, 3) or min(parts) < 1 or (len(parts) == 3 and parts[2] < parts[1]):
        raise argparse.ArgumentTypeError(
            f"--prefill expects BATCHxQ_LEN or BATCHxQ_LENxKV_LEN (KV_LEN >= Q_LEN), got {text!r}")
    return Layout(parts[0], parts[1], parts[-1])


def decode_layouts(args) -> list[Layout]:
    from bench import shapes

    if not args.batch_sizes and not args.kv_lens:
        return [Layout(b, 1, n) for b, n in shapes.DECODE_GRID]
    batches = args.batch_sizes or sorted({b for b, _ in shapes.DECODE_GRID})
    kv_lens = args.kv_lens or sorted({n for _, n in shapes.DECODE_GRID})
    return [Layout(b, 1, n) for b in batches for n in kv_lens]


def prefill_layouts(args) -> list[Layout]:
    from bench import shapes

    if args.prefill:
        return list(args.prefill)
    return ([Layout(b, n, n) for b, n in shapes.PREFILL_GRID]
            + [Layout(b, q, n) for b, q, n in PREFIX_GRID])


def heads(args) -> list[dict]:
    """Heads, head_dim, page size and cache dtype of every shape asked for."""
    from bench import shapes

    out = [dict(s) for s in args.shape or []]
    for name in args.model or ([] if args.shape else [DEFAULT_MODEL]):
        out.extend(_model_heads(shapes.get(name)))
    for h in out:
        missing = [k for k in ("num_q_heads", "num_kv_heads", "head_dim") if k not in h]
        if missing:
            raise SystemExit(f"--shape needs {', '.join(missing)}, got {h}")
        if h["head_dim"] not in _common.HEAD_DIMS or h["num_q_heads"] % h["num_kv_heads"]:
            raise SystemExit(f"--shape: head_dim must be one of {_common.HEAD_DIMS} and "
                             f"num_q_heads a multiple of num_kv_heads, got {h}")
        h.setdefault("page_size", args.page_size)
    return out


def _raw_shape(name: str, base: dict, lay: Layout) -> dict:
    kv = kv_key(lay.kv_len, base["page_size"])
    if name in DECODE_OPS:
        return {**base, "kv_len": kv, "batch": lay.batch}
    tokens = {"tokens": lay.batch * lay.q_len}
    return {**base, "kv_len": kv, **tokens} if name == "paged_prefill_triton" else \
        {**base, "causal": True, "kv_len": kv, **tokens}


def jobs(names: Sequence[str], args) -> dict[str, list[dict]]:
    """Raw shapes per op, each bucket's layouts registered in _LAYOUTS (call it under the batch
    sizes the tune runs with: they decide the buckets)."""
    out = {}
    for name in names:
        lays = decode_layouts(args) if name in DECODE_OPS else prefill_layouts(args)
        t, shapes_ = TUNABLES[name], []
        for h in heads(args):
            for dtype in cli._dtypes(args.dtype):
                kv_dtype = dtype if args.kv_dtype == "same" else args.kv_dtype
                base = {**h, "dtype": dtype, "kv_dtype": h.get("kv_dtype", kv_dtype)}
                for lay in lays:
                    raw = _raw_shape(name, base, lay)
                    bucket = _LAYOUTS.setdefault((name, t.key_of(t.shape_of(**raw))), [])
                    if lay not in bucket:
                        bucket.append(lay)
                    shapes_.append(raw)
        out[name] = shapes_
    return out


@contextlib.contextmanager
def batch_sizes(sizes):
    """Bucket by `sizes` (decode: the serving layer's CUDA-graph batch sizes) inside."""
    tunable_mod.set_batch_sizes(sizes)
    try:
        yield
    finally:
        tunable_mod.set_batch_sizes(None)


def phases(names: Sequence[str], args) -> list[tuple]:
    """(batch sizes, op names): decode ops under --batch-sizes, prefill ones under powers of two
    (a token count is no batch size)."""
    dec = [n for n in names if n in DECODE_OPS]
    pre = [n for n in names if n in PREFILL_OPS]
    return [p for p in ((args.batch_sizes, dec), (None, pre)) if p[1]]


# ---- the command --------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m autotune.attention",
                                description=FAMILY.description)
    p.add_argument("--mode", default="all", choices=("decode", "prefill", "all"))
    p.add_argument("--op", action="append", choices=list(TUNABLES),
                   help="only this op (repeatable; default: every op of --mode)")
    p.add_argument("--model", action="append", help=f"model preset for the heads (repeatable; "
                   f"default {DEFAULT_MODEL})")
    p.add_argument("--shape", action="append", type=cli._shape_arg, help="heads instead of a "
                   "model: num_q_heads=32,num_kv_heads=8,head_dim=128[,page_size=16]")
    p.add_argument("--batch-sizes", type=cli._csv_ints, help="decode batch sizes (the buckets; "
                   "give the CUDA-graph sizes)")
    p.add_argument("--kv-lens", type=cli._csv_ints, help="decode kv lengths")
    p.add_argument("--prefill", action="append", type=_prefill_arg, metavar="BxQ[xKV]",
                   help="prefill layout, causal, KV >= Q (repeatable)")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16", help="q dtypes (bfloat16, float16)")
    p.add_argument("--kv-dtype", default="same",
                   choices=("same", "bfloat16", "float16", "float8_e4m3fn"),
                   help="cache dtype (default: q's)")
    p.add_argument("--quick", action="store_true", help="a few configs per op (GPU smoke run)")
    cli.add_run_args(p, "TRITON_INTERPRET=1; tiny shapes only")
    return p


def selected_ops(args) -> list[str]:
    names = args.op or [*(DECODE_OPS if args.mode != "prefill" else ()),
                        *(PREFILL_OPS if args.mode != "decode" else ())]
    out = []
    for name in names:
        if name == "paged_decode_cuda" and "cuda" not in usable_backends("decode", args.cpu):
            why = _dispatch.DECODE.available().get("cuda") or "needs a GPU"
            print(f"autotune.attention: {name} skipped: {why}")
            continue
        out.append(name)
    for kind in ("decode", "prefill"):
        if any(n == f"paged_{kind}_backend" for n in out):
            choices = tunables.DECODE_CHOICES if kind == "decode" else tunables.PREFILL_CHOICES
            missing = [c for c in choices if c not in usable_backends(kind, args.cpu)]
            if missing:
                print(f"autotune.attention: paged_{kind}_backend: {', '.join(missing)} cannot "
                      f"run here (not installed or no GPU): not timed")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.cpu and not envs.TRITON_INTERPRET:
        print("--cpu needs the Triton interpreter: TRITON_INTERPRET=1 python -m "
              "autotune.attention --cpu ...", file=sys.stderr)
        return 2
    bad = [d for d in cli._dtypes(args.dtype) if d not in ("bfloat16", "float16")]
    if bad:
        raise SystemExit(f"--dtype: attention runs bfloat16 or float16 queries, got {bad}")
    family = build_family("cpu" if args.cpu else "quick" if args.quick else "full")
    names = selected_ops(args)
    _LAYOUTS.clear()
    if args.dry_run:
        return _dry_run(family, names, args)
    if not args.cpu and not torch.cuda.is_available():
        print("autotune.attention: no CUDA GPU here, nothing tuned (configs are GPU "
              "measurements). For a smoke run: TRITON_INTERPRET=1 python -m autotune.attention "
              "--cpu --shape num_q_heads=4,num_kv_heads=2,head_dim=64 --batch-sizes 2 "
              "--kv-lens 40 --prefill 2x8x40 --dtype float16")
        return 0
    return _run(family, names, args)


def _dry_run(family: Family, names: list[str], args) -> int:
    total = buckets = 0
    for sizes, group in phases(names, args):
        with batch_sizes(sizes):
            for name, shapes_ in jobs(group, args).items():
                op = family.ops[name]
                plans = plan(op.tunable, op.space, shapes_, args.force)
                cli._print_plan(name, plans)
                todo = [p for p in plans if p.cached is None]
                buckets += len(todo)
                total += sum(len(p.candidates) for p in todo)
    print(f"autotune.attention: {total} candidates to check and time in {buckets} buckets")
    return 0


def _run(family: Family, names: list[str], args) -> int:
    device = "cpu" if args.cpu else "cuda"
    start = time.monotonic()
    deadline = start + args.budget if args.budget else None
    work = []
    for sizes, group in phases(names, args):
        with batch_sizes(sizes):
            for name, shapes_ in jobs(group, args).items():
                n = sum(len(p.candidates) for p in plan(family.ops[name].tunable,
                                                        family.ops[name].space, shapes_,
                                                        args.force))
                work.append((sizes, name, shapes_, n))
    reports = []
    with cli._progress(sum(w[3] for w in work), args.no_progress) as bar:
        for sizes, name, shapes_, _ in work:
            op = family.ops[name]
            with batch_sizes(sizes):
                reports.append(tune(op.tunable, op.space, shapes_,
                                    functools.partial(_case, op, device),
                                    timer=timer(name in DECODE_OPS, args.cpu),
                                    deadline=deadline, force=args.force, progress=bar))
    wall = time.monotonic() - start
    cli.summary(reports, wall)
    if args.report:
        cli.write_report(args.report, family.name, device, reports, wall)
    return 1 if any(r.status == "failed" for rep in reports for r in rep.results) else 0


def timer(decode: bool, cpu: bool):
    """The tuner's timer, timing as bench.attention does: decode always as CUDA-graph replays
    (both sides of the FlashInfer comparison are), prefill by duration (graphs under ~100 us)."""
    if cpu:
        return default_timer("cpu", warmup_ms=0, rep_ms=3)
    if not decode:
        return default_timer("cuda")
    from bench.timing import measure

    return lambda fn, n: measure(fn, n_inputs=n, warmup_ms=5.0, rep_ms=30.0, graph=True)


def _case(op: Op, device: str, shape: dict) -> Case:
    return op.make_case(shape, device)


if __name__ == "__main__":
    raise SystemExit(main())
