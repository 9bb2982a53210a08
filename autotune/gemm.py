"""`python -m autotune.gemm`: tune the FP8 weight-only GEMM (W8A16): the CUDA kernel's and the
Triton twin's launch configs, then the backend that `auto` picks.

    SGLANG_FLASHINFER_AUTOTUNE_CACHE=0 python -m autotune.gemm   # ANCHORS shapes x M grid, all ops
    python -m autotune.gemm --model llama-3-8b --m 1,2,4,8,16,32,64
    python -m autotune.gemm --shape 6144x4096 --op triton --group-size 128 --dry-run

Ops (``--op cuda|triton|backend|all``, repeatable), always tuned in this order, so that the
backend choice times each backend at the config just tuned for it:

- ``fp8_gemm_cuda`` (tunables.GEMM_CUDA): block_n 64/128 (128 where N allows) x block_m
  (tokens per CTA: the two CUDA_BLOCK_M values nearest m; a block_m under m means more M tiles,
  each streaming the weight again) x splits (0 = the launcher's own choice, tried at 1 and 4
  stages; 1; 2, 4, 8, 16 where tiles x splits fill a quarter to one wave of CTA slots, 4 a SM,
  and each split keeps >= max(2, num_stages) K panels) x num_stages (1 = prefetch off, tied by
  the space's GEMM-like prefetch dimension; 3-5 while the weight streams, m <= 64; 2-4 above)
  x wgmma off/on (warpgroup MMAs, sm_90; the launcher turns it off on other GPUs).
- ``fp8_gemm_triton`` (GEMM_TRITON): BLOCK_N 64/128 x BLOCK_M (swap-AB: the tokens; the next
  power of two >= max(m, 16) up to m = 64, then p/2 and p up to 256) x (BLOCK_K, num_stages)
  pairs (decode, m <= 64: 128-wide K tiles at 3-5 stages, streaming the weight; larger m: 64 x
  3-4 and 128 x 2-3; prefetch off at 128 resp. 64) x SPLIT_K 1/2/4/8 (m <= 64 only, <= 2 waves
  of programs, >= max(4, num_stages) K tiles a split) x num_warps (4 at decode; above, 4 up to
  16K fp32 accumulators a program, 8 from 8K) x TMA on/off above m = 64 (tiles by tensor
  memory access or by pointers; decode sizes keep pointers, whose launch costs less host time);
  tiles over 200 KB of shared memory are dropped.
- ``fp8_gemm_backend`` (GEMM_BACKEND): {"backend": cuda | triton} through fp8_marlin_gemm, each
  at its tuned config; the default {"backend": "auto"} (the fixed order, CUDA first) competes.

Every candidate is checked once against pykernels.quant.ref (fp32 dequantize-then-matmul) on
input set 0, output poisoned with NaN first, then timed (bench.timing: CUDA-graph replays under
~100 us) over input sets that each hold their own packed weight, so that one pass moves 3x the
L2. Key: n, k, dtype, group_size; bucket m (powers of two). Shapes: bench.shapes.GEMM_NK (the
four ANCHORS shapes) by default, ``--model`` (bench.shapes.linear_shapes), ``--shape NxK``; M:
``--m`` (default 1, 16, 64, 256, 1024, 4096).

Cost of a cold tune of the default grid (24 buckets per op; ``--dry-run`` prints the same
counts for any grid): 890 CUDA candidates, which compile nothing (every tile and stage count
is built into pykernels._C), 1125 Triton candidates over ~144 distinct compiles (SPLIT_K is a grid
dimension, but M == 1 and the K tiles a split covers specialize the kernel), and 72 backend
candidates. At an assumed ~0.1 s to check and time a candidate, ~1.5 s a Triton compile and
~0.3 s of inputs and reference per bucket (assumptions, not yet measured on the H200): ~5 min.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import math
import sys
from collections.abc import Sequence

import torch

from autotune import cli
from autotune.cli import Family, Op, check_close, dtype_of, input_sets
from autotune.space import Space
from autotune.tuner import Case, plan
from bench import shapes as bench_shapes
from bench.gemm import parse_nk
from pykernels import envs
from pykernels.quant import tunables

PANEL = 128  # K columns per packed panel (docs/quant.md)
M_GRID = tuple(bench_shapes.GEMM_M_FULL)
SMS_DEFAULT = 132  # the H200's SMs: the space's wave counts without a GPU (dry runs, tests)
CUDA_SPLITS = (0, 1, 2, 4, 8, 16)
CUDA_STAGES = (1, 2, 3, 4, 5)
# Pipeline depths searched: 3-5 panels in flight while the weight streams (m <= DECODE_M), 2-4
# where the MMAs take longer per panel; 1 (prefetch off) everywhere.
CUDA_DECODE_STAGES, CUDA_LARGE_STAGES = (1, 3, 4, 5), (1, 2, 3, 4)
CUDA_SLOTS_PER_SM = 4  # CTAs of the CUDA kernel an SM holds (csrc/quant/fp8_gemm.cu's comment)
DECODE_M = 64  # up to this many rows a GEMM streams its weight (the ANCHORS table's small M)
TRITON_SPLITS = (1, 2, 4, 8)
# (BLOCK_K, num_stages) searched with prefetch on: deep 128-wide K tiles while the weight
# streams (3-5 x 16 KB in flight a program), 64/128 x 2-4 where the tile's math matters.
# Prefetch off (1 stage) at DECODE_K resp. LARGE_K (and only that under
# TRITON_DISABLE_MACA_OPT_MMA_PREFETCH=1).
DECODE_PIPES = {(128, 3), (128, 4), (128, 5)}
LARGE_PIPES = {(64, 3), (64, 4), (128, 2), (128, 3), (128, 4)}
DECODE_K, LARGE_K = 128, 64
SMEM_LIMIT = 200 * 1024  # of 227 KB per block on H100/H200; the rest for Triton's epilogue
OPS = {"cuda": "fp8_gemm_cuda", "triton": "fp8_gemm_triton", "backend": "fp8_gemm_backend"}
NAN = float("nan")


@functools.cache
def sms() -> int:
    if envs.TRITON_INTERPRET or not torch.cuda.is_available():
        return SMS_DEFAULT
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def _pow2(m: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(m, 1))))


# ---- the CUDA kernel's space -------------------------------------------------------------------


def cuda_block_ms(m: int) -> tuple[int, ...]:
    """The two CUDA_BLOCK_M values nearest m (log scale, ties to the larger): 8/16 at m=1,
    16/32 at m=16, 32/64 from m=64 on."""
    dist = lambda b: (abs(math.log2(b) - math.log2(max(m, 1))), -b)  # noqa: E731
    return tuple(sorted(sorted(tunables.CUDA_BLOCK_M, key=dist)[:2]))


def cuda_valid(cfg: dict, shape: dict) -> bool:
    m, n, k = shape["m"], shape["n"], shape["k"]
    bn, bm, splits, stages = cfg["block_n"], cfg["block_m"], cfg["splits"], cfg["num_stages"]
    if bm not in cuda_block_ms(m) or n % bn:  # 128 on an odd N would run the 64 kernel again
        return False
    if stages not in (CUDA_DECODE_STAGES if m <= DECODE_M else CUDA_LARGE_STAGES):
        return False
    if splits == 0 and stages not in (1, 4):  # auto: with prefetch off and the default depth
        return False
    panels = -(-k // PANEL)
    if splits > panels:
        return False
    if splits > 1:
        tiles = (n // bn) * -(-m // bm)
        slots = CUDA_SLOTS_PER_SM * sms()
        # An explicit split fills between a quarter and one wave of CTA slots (fewer leaves
        # most SMs idle, more queues a second wave; 0 lets the launcher aim at one wave), and
        # keeps K panels to pipeline (the kernel itself keeps >= 2 a split).
        if not slots < 4 * tiles * splits <= 4 * slots or panels // splits < max(2, stages):
            return False
    return True


# ---- the Triton twin's space -------------------------------------------------------------------


def triton_block_ms(m: int) -> tuple[int, ...]:
    """BLOCK_M (the tokens, the MMA's narrow side, >= 16): p = the next power of two >= m
    while the weight streams (m <= 64: one M tile reads it once), then p/2 and p up to 256
    (more M tiles reread the weight, from L2 mostly)."""
    p = min(max(_pow2(m), 16), 256)
    return (p,) if p <= DECODE_M else (p // 2, p)


def _pipe_ok(bk: int, stages: int, decode: bool) -> bool:
    if stages == 1:
        return bk == (DECODE_K if decode else LARGE_K) or envs.TRITON_DISABLE_MACA_OPT_MMA_PREFETCH
    return (bk, stages) in (DECODE_PIPES if decode else LARGE_PIPES)


def _warps_ok(warps: int, acc: int, decode: bool) -> bool:
    """4 warps up to 16K fp32 accumulators a program (128 registers a thread: the 64 x 256 tile
    an H200 ran fastest at m = 1024), 8 from 8K; decode tiles (<= 128 x 64) always run 4."""
    if decode:
        return warps == 4
    return acc <= 16384 if warps == 4 else acc >= 8192


def triton_split_ok(split: int, programs: int, k_tiles: int, stages: int, m: int) -> bool:
    """SPLIT_K > 1 only at decode sizes, while programs x splits stay within ~2 waves and each
    split keeps max(4, num_stages) K tiles (the launcher's own auto split keeps 4)."""
    if split == 1:
        return True
    return (m <= DECODE_M and programs * split <= 2 * sms()
            and k_tiles // split >= max(4, stages))


def triton_valid(cfg: dict, shape: dict) -> bool:
    m, n, k = shape["m"], shape["n"], shape["k"]
    bn, bm, bk = cfg["BLOCK_N"], cfg["BLOCK_M"], cfg["BLOCK_K"]
    warps, stages = cfg["num_warps"], cfg["num_stages"]
    decode = m <= DECODE_M
    if bm not in triton_block_ms(m) or bn > n or not _warps_ok(warps, bn * bm, decode):
        return False
    if not _pipe_ok(bk, stages, decode):
        return False
    if cfg.get("TMA") and decode:
        # A TMA launch costs ~20 us more host time (two tensor descriptors; 55 vs 35 us a call
        # on the H200 host): more than a decode GEMM's whole run when not graph-captured.
        return False
    elt = dtype_of(shape).itemsize
    if max(stages, 1) * (bn * bk + bm * bk * elt) > SMEM_LIMIT:  # fp8 weight + x tiles
        return False
    programs = -(-n // bn) * -(-m // bm)
    return triton_split_ok(cfg["SPLIT_K"], programs, -(-k // bk), stages, m)


def triton_compile_key(cfg: dict, shape: dict) -> tuple:
    """What a Triton launch of cfg specializes on (an estimate of distinct compiles): the
    constexprs, num_warps/stages, M == 1, and the K tiles a split covers (== 1, % 16 == 0), the
    split's fp32 partials (another output type)."""
    k_tiles = -(-shape["k"] // cfg["BLOCK_K"])
    split = max(1, min(cfg["SPLIT_K"] or 1, k_tiles))
    per = -(-k_tiles // split)
    return (cfg["BLOCK_N"], cfg["BLOCK_M"], cfg["BLOCK_K"], cfg["num_warps"],
            cfg["num_stages"], cfg.get("TMA", False), shape["dtype"], shape["group_size"],
            shape["k"] % cfg["BLOCK_K"] == 0, shape["m"] == 1, split > 1,
            per == 1 or per % 16 == 0)


# ---- the backend choice ------------------------------------------------------------------------


def backend_reasons() -> dict[str, str | None]:
    """{backend: None or why it cannot run} from pykernels.quant.gemm."""
    mod = importlib.import_module("pykernels.quant.gemm")
    registry = getattr(mod, "backends", None)
    return registry() if callable(registry) else mod._FAMILY.available()


@functools.cache
def usable_backends(cpu: bool = False) -> tuple[str, ...]:
    """Backends the choice can time here: triton alone on the CPU (the interpreter)."""
    if cpu:
        return ("triton",) if envs.TRITON_INTERPRET else ()
    why = backend_reasons()
    return tuple(b for b in tunables.BACKEND_CHOICES if why.get(b) is None)


def fixed_backend(cpu: bool = False) -> str:
    """What {"backend": "auto"} runs without a tuned choice: the first usable of CUDA, Triton."""
    usable = usable_backends(cpu)
    if not usable:
        raise RuntimeError("neither the cuda nor the triton backend of fp8_marlin_gemm can run "
                           "here")
    return usable[0]


def spaces(kind: str = "full") -> dict[str, Space]:
    """Search spaces per op: "full" (the tune), "dry" (the same, every backend counted whether
    it runs here or not) or "cpu" (a tiny interpreter space)."""
    cpu = kind == "cpu"
    backend = Space({"backend": tunables.BACKEND_CHOICES},
                    valid=lambda cfg, shape: kind == "dry" or cfg["backend"] in
                    usable_backends(cpu))
    if cpu:  # the interpreter ignores warps and stages; fp16/fp32 only (bf16 dots break there)
        return {"fp8_gemm_cuda": Space({"block_n": (64,), "block_m": (8,), "splits": (1,),
                                        "num_stages": (1,)}),
                "fp8_gemm_triton": Space({"BLOCK_N": (64,), "BLOCK_M": (16,),
                                          "BLOCK_K": (64, 128), "SPLIT_K": (1, 2),
                                          "num_warps": (4,), "num_stages": (1,)}),
                "fp8_gemm_backend": backend}
    return {
        "fp8_gemm_cuda": Space({"block_n": tunables.CUDA_BLOCK_N,
                                "block_m": tunables.CUDA_BLOCK_M, "splits": CUDA_SPLITS,
                                "num_stages": CUDA_STAGES, "wgmma": (False, True)},
                               valid=cuda_valid),
        "fp8_gemm_triton": Space({"BLOCK_N": (64, 128), "BLOCK_M": (16, 32, 64, 128, 256),
                                  "BLOCK_K": (64, 128), "SPLIT_K": TRITON_SPLITS,
                                  "num_warps": (4, 8), "num_stages": (1, 2, 3, 4, 5),
                                  "TMA": (True, False)},
                                 valid=triton_valid),
        "fp8_gemm_backend": backend,
    }


# ---- inputs and cases ----------------------------------------------------------------------------

_WEIGHTS: dict = {}  # one weight shape's packed sets, grown as buckets ask for more


def packed_weights(n: int, k: int, group_size: int, count: int, device: str) -> list:
    """`count` distinct packed weights [N, K] ~ N(0, 1/K), kept for the next bucket of the same
    shape (every m of a shape reuses them)."""
    from pykernels.quant.pack import fp8_weight_pack

    key = (n, k, group_size, str(device))
    if _WEIGHTS.get("key") != key:
        _WEIGHTS.clear()  # the previous shape's weights go first
        _WEIGHTS.update(key=key, sets=[])
    sets = _WEIGHTS["sets"]
    while len(sets) < count:
        gen = torch.Generator(device).manual_seed(1000 + len(sets))
        w = torch.randn(n, k, device=device, generator=gen).mul_(k ** -0.5)
        sets.append(fp8_weight_pack(w, group_size))
    return sets[:count]


class Inputs:
    """n input sets (packed weight, x, out) of one bucket and the reference output of set 0."""

    def __init__(self, shape: dict, device: str):
        from pykernels.quant import ref

        m, n, k, group = shape["m"], shape["n"], shape["k"], shape["group_size"]
        dtype = dtype_of(shape)
        nbytes = n * k + (m * k + m * n) * dtype.itemsize
        self.n = input_sets(nbytes, device)
        self.w = packed_weights(n, k, group, self.n, device)
        self.x = [torch.randn(m, k, device=device, dtype=dtype) for _ in range(self.n)]
        self.out = [torch.empty(m, n, device=device, dtype=dtype) for _ in range(self.n)]
        self.expected = torch.empty(m, n, device=device, dtype=dtype)
        ref.gemm(self.x[0], self.w[0].qweight, self.w[0].scales, self.expected)

    def check(self, run, what: str) -> None:
        self.out[0].fill_(NAN)
        run(0)
        check_close(self.out[0], self.expected, what)


def kernel_module(backend: str):
    """pykernels.quant.cuda or .triton: `gemm(x2d, qweight, scales, out, *, config=...)`."""
    return importlib.import_module(f"pykernels.quant.{backend}")


def kernel_case(backend: str):
    """make_case(shape, device) of a config op: the backend module's gemm with `config`."""

    def make(shape: dict, device: str) -> Case:
        mod = kernel_module(backend)
        x = Inputs(shape, device)

        def run(config, i):
            w = x.w[i]
            mod.gemm(x.x[i], w.qweight, w.scales, x.out[i], config=config)

        def check(config):
            x.check(lambda i: run(config, i), f"fp8_gemm_{backend} output")

        return Case(run, check, x.n)

    return make


def backend_case(shape: dict, device: str) -> Case:
    """A backend choice runs the public op, so each backend's launcher looks up its config as
    in serving (the one just tuned, installed in this process)."""
    from pykernels.quant.gemm import fp8_marlin_gemm

    x = Inputs(shape, device)
    cpu = device == "cpu"

    def run(config, i):
        name = config["backend"]
        w = x.w[i]
        fp8_marlin_gemm(x.x[i], w.qweight, w.scales, out=x.out[i],
                        backend=fixed_backend(cpu) if name == "auto" else name)

    def check(config):
        x.check(lambda i: run(config, i), f"fp8_marlin_gemm({config['backend']}) output")

    return Case(run, check, x.n)


def _model_shapes(model) -> list[dict]:
    return [{"n": n, "k": k} for _, n, k in bench_shapes.linear_shapes(model.name)]


TUNABLES = {"fp8_gemm_cuda": tunables.GEMM_CUDA, "fp8_gemm_triton": tunables.GEMM_TRITON,
            "fp8_gemm_backend": tunables.GEMM_BACKEND}
MAKERS = {"fp8_gemm_cuda": kernel_case("cuda"), "fp8_gemm_triton": kernel_case("triton"),
          "fp8_gemm_backend": backend_case}


def build_family(kind: str = "full") -> Family:
    sp = spaces(kind)
    return Family(
        name="gemm",
        description="Tune the FP8 weight-only GEMM: the CUDA and Triton launch configs, then "
                    "the backend auto picks. Shapes: the ANCHORS GEMMs, --model presets or "
                    "--shape NxK; --m the activation rows.",
        ops={name: Op(t, sp[name], MAKERS[name], _model_shapes) for name, t in TUNABLES.items()},
    )


FAMILY = build_family()


# ---- the command ---------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m autotune.gemm", description=FAMILY.description)
    p.add_argument("--op", action="append", choices=(*OPS, "all"),
                   help="cuda, triton, backend or all (default; repeatable); tuned in that order")
    p.add_argument("--shape", action="append", type=parse_nk, metavar="NxK",
                   help="weight shape N x K (repeatable; default: the four ANCHORS shapes)")
    p.add_argument("--model", action="append",
                   help="a model's linear layers (bench.shapes.linear_shapes; repeatable)")
    p.add_argument("--m", type=cli._csv_ints, default=None, metavar="M[,M...]",
                   help="activation rows to tune (default 1,16,64,256,1024,4096)")
    p.add_argument("--dtype", default="bfloat16", help="activation dtypes: bfloat16, float16")
    p.add_argument("--group-size", type=int, default=-1, choices=(-1, 128),
                   help="scales per output channel (-1) or per 128-wide K group")
    cli.add_run_args(p, "TRITON_INTERPRET=1; tiny shapes, --dtype float16")
    return p


def weight_shapes(args) -> list[tuple[int, int]]:
    """(N, K) to tune: --shape and --model layers, else the ANCHORS shapes; deduplicated."""
    out = list(args.shape or [])
    for name in args.model or []:
        out += [(n, k) for _, n, k in bench_shapes.linear_shapes(name)]
    return list(dict.fromkeys(out or bench_shapes.GEMM_NK))


def jobs(args) -> list[dict]:
    """Raw shapes (key fields and m) of every op."""
    dtypes = cli._dtypes(args.dtype)
    bad = [d for d in dtypes if d not in ("bfloat16", "float16")]
    if bad:
        raise SystemExit(f"--dtype: the FP8 GEMM takes bfloat16 or float16 activations, "
                         f"got {bad}")
    return [{"n": n, "k": k, "dtype": d, "group_size": args.group_size, "m": m}
            for n, k in weight_shapes(args) for d in dtypes for m in (args.m or M_GRID)]


def selected_ops(args) -> list[str]:
    """The ops asked for, in tuning order; one whose backend cannot run here is skipped with the
    reason (except in a dry run, which lists everything)."""
    wanted = set(args.op or ["all"])
    names = [OPS[o] for o in OPS if o in wanted or "all" in wanted]
    if args.dry_run:
        return names
    usable = usable_backends(args.cpu)
    out = []
    for name in names:
        backend = name.rsplit("_", 1)[1]
        if backend in tunables.BACKEND_CHOICES and backend not in usable:
            why = "needs a GPU" if args.cpu else backend_reasons().get(backend)
            print(f"autotune.gemm: {name} skipped: {why}")
            continue
        out.append(name)
    return out


def estimate(plans: dict[str, list]) -> dict:
    """Candidates to time per op and the distinct Triton compiles, for the dry run."""
    todo = {name: [p for p in ps if p.cached is None] for name, ps in plans.items()}
    keys = {triton_compile_key(c, p.shape) for p in todo.get("fp8_gemm_triton", [])
            for c in p.candidates}
    return {"candidates": {n: sum(len(p.candidates) for p in ps) for n, ps in todo.items()},
            "buckets": sum(len(ps) for ps in todo.values()), "triton_compiles": len(keys)}


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.cpu and not envs.TRITON_INTERPRET:
        print("--cpu needs the Triton interpreter: TRITON_INTERPRET=1 python -m autotune.gemm "
              "--cpu ...", file=sys.stderr)
        return 2
    family = build_family("cpu" if args.cpu else "dry" if args.dry_run else "full")
    shapes_ = jobs(args)
    names = selected_ops(args)
    plans = {n: plan(family.ops[n].tunable, family.ops[n].space, shapes_, args.force)
             for n in names}
    if args.dry_run:
        for name, ps in plans.items():
            cli._print_plan(name, ps)
        est = estimate(plans)
        per_op = ", ".join(f"{n} {c}" for n, c in est["candidates"].items())
        print(f"autotune.gemm: {sum(est['candidates'].values())} candidates to check and time "
              f"in {est['buckets']} buckets ({per_op}); ~{est['triton_compiles']} distinct "
              f"Triton compiles")
        return 0
    if not args.cpu and not torch.cuda.is_available():
        print("autotune.gemm: no CUDA GPU here, nothing tuned (configs are GPU measurements). "
              "For a smoke run: TRITON_INTERPRET=1 python -m autotune.gemm --cpu --shape 128x256 "
              "--m 1,4 --dtype float16")
        return 0
    # cuda, triton, then the backend choice (it times each backend at its just-tuned config)
    return cli._run(family, {n: family.ops[n] for n in names}, {n: shapes_ for n in names}, args)


if __name__ == "__main__":
    raise SystemExit(main())
