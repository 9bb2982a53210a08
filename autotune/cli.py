"""The machinery every `python -m autotune.<family>` shares (top floor: imports kernels, bench).

A family driver declares its ops (Tunable, Space, make_case, model presets) in a `Family` and calls
`main(FAMILY)`. Shapes come from `--model` presets (bench/shapes.py), explicit `--shape k=v,...`,
`--dtype` and `--batch-sizes` (the bucketed dimension: default bench.shapes.TOKENS, powers of two;
explicit sizes become the buckets, as the serving layer's CUDA-graph batch sizes do). Progress is a
tqdm bar, the summary a rich table of the best config against the default per bucket, then the total
tuning time and the files written. Without a GPU the CLI says so and exits 0 (nothing tuned) unless
`--cpu` asks for an interpreter smoke run (TRITON_INTERPRET=1, tiny shapes).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from autotune import tunable as tunable_mod
from autotune.space import Space
from autotune.tunable import Tunable
from autotune.tuner import Case, Planned, Report, default_timer, plan, tune
from pykernels import envs


@dataclass
class Op:
    """One tunable of a family: how to search it, build its inputs, and read model presets."""

    tunable: Tunable
    space: Space
    make_case: Callable[[dict, str], Case]  # (normalized shape, device) -> Case
    model_shapes: Callable[[object], list[dict]]  # bench.shapes.ModelShape -> [exact fields]


@dataclass
class Family:
    name: str
    ops: dict[str, Op]
    description: str = ""
    default_models: Sequence[str] = field(default_factory=tuple)  # empty: every preset


def _csv_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _shape_arg(text: str) -> dict:
    out = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        if not sep or not name.strip():
            raise argparse.ArgumentTypeError(f"--shape expects k=v[,k=v...], got {text!r}")
        value = value.strip()
        out[name.strip()] = int(value) if value.lstrip("-").isdigit() else value
    return out


def parser(family: Family) -> argparse.ArgumentParser:
    keys = sorted({k for op in family.ops.values() for k in op.tunable.key if k != "dtype"})
    p = argparse.ArgumentParser(prog=f"python -m autotune.{family.name}",
                                description=family.description or f"Tune the {family.name} "
                                "kernels and store the configs in the autotune cache.")
    p.add_argument("--op", action="append", choices=sorted(family.ops),
                   help="tune only this op (repeatable; default: all)")
    p.add_argument("--model", action="append", help="model preset from bench/shapes.py "
                   "(repeatable; default: " + (", ".join(family.default_models) or "all") + ")")
    p.add_argument("--shape", action="append", type=_shape_arg,
                   help=f"explicit shape, e.g. {','.join(f'{k}=4096' for k in keys)} (repeatable)")
    p.add_argument("--batch-sizes", type=_csv_ints, help="token/batch counts to tune, e.g. "
                   "1,2,4,8,16,32 (the serving layer's CUDA-graph sizes); default "
                   "bench.shapes.TOKENS")
    p.add_argument("--dtype", default="bfloat16", help="comma-separated dtypes (bfloat16, "
                   "float16, float32); default bfloat16")
    add_run_args(p, "needs TRITON_INTERPRET=1; tiny shapes only")
    return p


def add_run_args(p: argparse.ArgumentParser, cpu_hint: str) -> None:
    """The options every tuning driver shares: budget, force, dry run, CPU smoke, report."""
    p.add_argument("--budget", type=float, metavar="SECONDS",
                   help="stop starting new buckets after this many seconds")
    p.add_argument("--force", action="store_true", help="re-tune buckets already in the cache")
    p.add_argument("--dry-run", action="store_true", help="list what would be tuned and exit")
    p.add_argument("--cpu", action="store_true",
                   help=f"smoke run on the CPU through the Triton interpreter ({cpu_hint})")
    p.add_argument("--report", type=Path, help="also write the results as JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _dtypes(text: str) -> list[str]:
    names = [d.strip().removeprefix("torch.") for d in text.split(",") if d.strip()]
    for name in names:
        if not isinstance(getattr(torch, name, None), torch.dtype):
            raise SystemExit(f"--dtype: unknown dtype {name!r}")
    return names


def shapes_for(op: Op, family: Family, args) -> list[dict]:
    """Every shape to tune for `op`: (models + explicit shapes) x dtypes x batch sizes."""
    from bench import shapes as bench_shapes

    exact: list[dict] = []
    for text in args.shape or []:
        exact.append(dict(text))
    models = args.model or ([] if args.shape else list(family.default_models)
                            or list(bench_shapes.MODELS))
    for name in models:
        exact.extend(op.model_shapes(bench_shapes.get(name)))
    sizes = args.batch_sizes or list(bench_shapes.TOKENS)
    out, bucket = [], op.tunable.bucket
    for fields in exact:
        for dtype in _dtypes(args.dtype):
            base = {"dtype": dtype, **fields}
            missing = [k for k in op.tunable.key if k not in base]
            if missing:
                raise SystemExit(f"--shape for {op.tunable.name} needs {', '.join(missing)}")
            out.extend([{**base, bucket: m} for m in sizes] if bucket else [base])
    return out


def _print_plan(name: str, plans: list[Planned]) -> None:
    for p in plans:
        what = "cached" if p.cached is not None else f"tune {len(p.candidates)} candidates"
        print(f"{name:<22} {p.key:<44} {what}")


def _progress(total: int, disable: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="cfg", desc="autotune", disable=disable, file=sys.stderr)


def main(family: Family, argv: Sequence[str] | None = None) -> int:
    args = parser(family).parse_args(argv)
    if args.batch_sizes:
        tunable_mod.set_batch_sizes(args.batch_sizes)
    ops = {n: family.ops[n] for n in (args.op or family.ops)}
    jobs = {n: shapes_for(op, family, args) for n, op in ops.items()}
    if args.dry_run:
        mode = "cache" if envs.SGLANG_FLASHINFER_AUTOTUNE_CACHE else "runs/ (cache untouched)"
        print(f"autotune.{family.name}: dry run, results would go to the {mode}")
        for n, op in ops.items():
            _print_plan(n, plan(op.tunable, op.space, jobs[n], args.force))
        return 0
    if args.cpu and not envs.TRITON_INTERPRET:
        print("--cpu needs the Triton interpreter: run it as TRITON_INTERPRET=1 python -m "
              f"autotune.{family.name} --cpu ...", file=sys.stderr)
        return 2
    if not args.cpu and not torch.cuda.is_available():
        print(f"autotune.{family.name}: no CUDA GPU here, nothing tuned (configs are GPU "
              f"measurements). For a smoke run: TRITON_INTERPRET=1 python -m "
              f"autotune.{family.name} --cpu --shape ... --batch-sizes 1,4")
        return 0
    return _run(family, ops, jobs, args)


def _run(family: Family, ops: dict, jobs: dict, args) -> int:
    device = "cpu" if args.cpu else "cuda"
    timer = default_timer("cpu", warmup_ms=0, rep_ms=3) if args.cpu else default_timer("cuda")
    start = time.monotonic()
    deadline = start + args.budget if args.budget else None
    total = sum(len(p.candidates) for n, op in ops.items()
                for p in plan(op.tunable, op.space, jobs[n], args.force))
    reports = []
    with _progress(total, args.no_progress) as bar:
        for n, op in ops.items():
            make_case = functools.partial(_make_case, op, device)
            reports.append(tune(op.tunable, op.space, jobs[n], make_case, timer=timer,
                                deadline=deadline, force=args.force, progress=bar))
    wall = time.monotonic() - start
    summary(reports, wall)
    if args.report:
        write_report(args.report, family.name, device, reports, wall)
    return 1 if any(r.status == "failed" for rep in reports for r in rep.results) else 0


def _make_case(op: Op, device: str, shape: dict) -> Case:
    return op.make_case(shape, device)


def _fmt(value, digits=2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _config_text(config: dict | None) -> str:
    return "-" if not config else " ".join(f"{k}={v}" for k, v in config.items())


def summary(reports: list[Report], wall_s: float) -> None:
    """The rich table of best vs default per bucket, then the totals and files written."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="autotune: best vs default per bucket")
    for col in ("op", "bucket", "status", "best config", "best µs", "default µs", "speedup",
                "margin", "discarded"):
        right = "µs" in col or col in ("speedup", "margin", "discarded")
        table.add_column(col, justify="right" if right else "left", no_wrap=col != "status")
    for rep in reports:
        for r in rep.results:
            e = r.entry or {}
            margin = e.get("margin")
            table.add_row(rep.name, r.key, r.status if not r.reason else f"{r.status}: "
                          f"{r.reason[:60]}", _config_text(e.get("config")),
                          _fmt(e.get("time_us")), _fmt(e.get("default_us")),
                          _fmt(e.get("speedup_vs_default")) + ("x" if e else ""),
                          "-" if margin is None else f"{100 * margin:.1f}%",
                          str(e.get("discarded_count", "-")))
    console = Console(width=max(Console().width, 150))  # pipes get 80 columns otherwise
    console.print(table)
    tuning = sum(rep.seconds for rep in reports)
    console.print(f"total tuning time {tuning:.2f} s (wall {wall_s:.2f} s)")
    for rep in reports:
        if rep.path:
            console.print(f"{rep.name}: {'runs/ file' if rep.mode == 'run' else 'cache'} "
                          f"{rep.path}")


def write_report(path: Path, family: str, device: str, reports: list[Report],
                 wall_s: float) -> None:
    body = {"family": family, "device": device,
            "gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "tuning_seconds": sum(r.seconds for r in reports), "wall_seconds": wall_s,
            "reports": [r.as_dict() for r in reports]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body, indent=1) + "\n")


# ---- helpers for family drivers ------------------------------------------------------------------

# Reference-check tolerances per dtype: a config changes the reduction order, never the math.
TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-3, 2e-3),
             torch.bfloat16: (2e-2, 2e-2)}


def check_close(actual: torch.Tensor, expected: torch.Tensor, what: str = "output") -> None:
    """Raise AssertionError (the reason a candidate is discarded) unless actual ~ expected."""
    atol, rtol = TOLERANCE.get(expected.dtype, (1e-2, 1e-2))
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, equal_nan=False,
                               msg=lambda m: f"{what} differs from the reference: {m}")


def input_sets(bytes_per_call: int, device: str) -> int:
    """How many input sets to rotate through while timing (bench.timing.rotation_count), at most
    1 GiB of inputs in all; 1 on the CPU."""
    if device != "cuda":
        return 1
    from bench.timing import rotation_count

    return max(1, min(rotation_count(bytes_per_call), (1 << 30) // max(bytes_per_call, 1)))


def dtype_of(shape: dict) -> torch.dtype:
    return getattr(torch, str(shape["dtype"]))
