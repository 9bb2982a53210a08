"""The command-line convention every ``bench/<family>.py`` shares, and the loop that runs it.

A family module describes itself with a :class:`Family` (its providers and how to build its
cases from the parsed arguments) and ends with ``raise SystemExit(cli.main(FAMILY))``. The
harness then gives every family the same flags::

    --backend NAME[,NAME...]|all   providers to run; the first is the --compare baseline
    --shapes PRESET / --model NAME shape presets from bench/shapes.py (real model shapes)
    --dtype bf16|fp16|fp32         (bf16 on the GPU, fp32 in a --cpu smoke)
    --out DIR                      results root (default results/); --no-save writes nothing
    --compare                      speed ratio of every provider vs the first
    --quick                        a subset that keeps a family well under a minute of GPU time
    --cpu                          tiny CPU smoke (torch reference, Triton under TRITON_INTERPRET=1)

A provider that cannot run here (``fi`` without flashinfer) is reported as skipped with its
install hint; one that fails on a case is reported in the table and makes the exit status 1.
The availability helpers (``ours``, ``importable``, ``load``) live here too, so a family module
needs nothing but ``bench.cli`` and ``bench.shapes``.
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch

from bench import ceilings as ceilings_mod
from bench import report, results, shapes
from bench.timing import Timing, measure, rotation_count
from pykernels import envs

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CPU_REP_MS = 5.0  # host-timed reps of a --cpu smoke: the Triton interpreter takes ~10 ms a call

Builder = Callable[["Case", int, str], Callable[[int], object]]


@dataclass(frozen=True)
class Case:
    """One shape of one kernel: what a provider builds inputs for and the row's roofline.

    nbytes: bytes read + written by one call (memory floor, TB/s); flops: useful flops of one
    call (compute floor, TFLOP/s); 0 leaves that metric out. graph=True times every provider as
    CUDA-graph replays (decode attention, so both sides are timed the same way); a provider's own
    graph setting wins over it.
    """

    kernel: str
    shape: dict
    dtype: torch.dtype
    nbytes: int = 0
    flops: float = 0.0
    model: str = ""
    footprint: int = 0  # bytes of one input set, for L2 rotation; 0 = nbytes
    graph: bool | None = None  # timing mode for every provider (None: by duration)

    @property
    def label(self) -> str:
        return results.shape_string(self.shape)


def _always(device: str) -> str | None:
    return None


@dataclass(frozen=True)
class Provider:
    """One implementation timed by a family.

    build(case, n_inputs, device) allocates n_inputs independent input sets and returns fn(i)
    running one call on set i (capturable in a CUDA graph unless graph=False). available(device)
    returns None when it can run, else the reason; hint is the install hint shown with it.
    """

    name: str
    build: Builder
    backend: str = ""  # the --backend name selecting it; "" = name. fi selects fi and fi-tc.
    available: Callable[[str], str | None] = _always
    hint: str = ""
    cpu: bool = False  # part of the --cpu smoke
    graph: bool | None = None  # None: graph replay when a call is under ~100 us
    kernels: tuple[str, ...] = ()  # kernels it implements; () = all of the family's
    peer: bool = False  # an outside library we compare against (dashboard: ours vs peers)

    @property
    def cli_name(self) -> str:
        return self.backend or self.name

    def supports(self, kernel: str) -> bool:
        return not self.kernels or kernel in self.kernels


@dataclass(frozen=True)
class Family:
    """What ``python -m bench.<name>`` runs: its providers (in default order) and its cases."""

    name: str
    description: str
    providers: tuple[Provider, ...]
    cases: Callable[[argparse.Namespace], list[Case]]
    presets: tuple[str, ...] = ("default",)
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None


@dataclass
class Outcome:
    """The result of timing one (case, provider): status ok / skipped / failed."""

    case: Case
    provider: Provider
    timing: Timing | None = None
    status: str = "ok"
    note: str = ""
    rows: list[dict] = field(default_factory=list)


# ---- availability: None when a provider can run on the device, else a one-line reason -------

FI_HINT = "pip install flashinfer-python"


def ours(backends: Callable[[], dict[str, str | None]], name: str) -> Callable[[str], str | None]:
    """Availability of our backend ``name`` from a family's ``backends()`` registry.

    The Triton backend runs on CPU tensors only under TRITON_INTERPRET=1, which Triton reads
    when a kernel is defined, so it must be set before the process starts.
    """

    def available(device: str) -> str | None:
        if device == "cpu" and name == "triton" and not envs.TRITON_INTERPRET:
            return "runs on the CPU only under the Triton interpreter (set TRITON_INTERPRET=1)"
        if device == "cpu" and name not in ("torch", "triton"):
            return "needs a CUDA GPU (not part of the --cpu smoke)"
        return backends().get(name, f"no backend {name!r}")

    return available


@functools.cache
def _import(module: str) -> ModuleType | str:
    root = module.split(".")[0]
    if importlib.util.find_spec(root) is None:
        return f"{root} is not installed"
    try:
        return importlib.import_module(module)
    except Exception as err:  # installed but broken (CUDA/torch mismatch): say why
        return f"{module} does not import: {type(err).__name__}: {str(err).splitlines()[0][:120]}"


def module_or_reason(module: str) -> ModuleType | str:
    """The imported module, or the reason it cannot be imported (cached)."""
    return _import(module)


def importable(module: str) -> Callable[[str], str | None]:
    """Availability of a provider that needs ``module`` (and a CUDA device)."""

    def available(device: str) -> str | None:
        mod = _import(module)
        return mod if isinstance(mod, str) else None

    return available


def load(module: str = "flashinfer") -> ModuleType:
    """The imported module (call after its availability check passed); RuntimeError with the
    reason otherwise."""
    mod = _import(module)
    if isinstance(mod, str):
        raise RuntimeError(mod)
    return mod


def token_grid(args: argparse.Namespace, widths: Callable[[str | None], list[tuple[int, str]]],
               large: tuple[int, int], quick_tokens: tuple[int, ...],
               quick_model: str = "llama-3-8b") -> list[tuple[int, int, str]]:
    """(tokens, width, model label) for the usual presets of a row-wise op: `models` crosses each
    model width (`widths(model or None)`) with the token grid, `large` adds the >= 256 MB shape,
    `default` both; --quick keeps one model and a few token counts."""
    grid = []
    if args.shapes in ("default", "models"):
        tokens = quick_tokens if args.quick else shapes.TOKENS
        model = args.model or (quick_model if args.quick else None)
        grid += [(t, w, name) for w, name in widths(model) for t in tokens]
    if args.shapes in ("default", "large"):
        grid.append((*large, "large"))
    return grid


def build_parser(family: Family) -> argparse.ArgumentParser:
    names = ", ".join(dict.fromkeys(p.cli_name for p in family.providers))
    p = argparse.ArgumentParser(prog=f"python -m bench.{family.name}",
                                description=family.description)
    p.add_argument("--backend", default="all",
                   help=f"comma-separated providers, or all (default); choices: {names}")
    p.add_argument("--shapes", default=family.presets[0], choices=family.presets,
                   help="shape preset (default: %(default)s)")
    p.add_argument("--model", default=None,
                   help="restrict model presets to one model of bench/shapes.py")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="data type (default bf16; fp32 with --cpu)")
    p.add_argument("--out", default=None, type=Path,
                   help="results root (default: results/ of the checkout); with --cpu, rows "
                        "are written only when --out is given, under DIR/cpu/")
    p.add_argument("--no-save", action="store_true", help="print the table, write no results")
    p.add_argument("--compare", action="store_true",
                   help="print each provider's speed relative to the first one")
    p.add_argument("--quick", action="store_true", help="a small subset of the shapes")
    p.add_argument("--cpu", action="store_true",
                   help="tiny CPU smoke run (torch reference; Triton with TRITON_INTERPRET=1)")
    p.add_argument("--device", default="cuda", help="CUDA device (default: %(default)s)")
    p.add_argument("--rep-ms", type=float, default=None,
                   help="timing budget per measurement in ms (default 100; 5 reps with --cpu)")
    p.add_argument("--traceback", action="store_true",
                   help="re-raise a provider's exception instead of reporting it")
    if family.add_arguments:
        family.add_arguments(p)
    return p


def select_providers(family: Family, spec: str, device: str
                     ) -> tuple[list[Provider], list[tuple[str, str]]]:
    """Providers named by --backend (in the order given) that can run on device, and
    (name, reason) for those that cannot. Raises ValueError on an unknown name."""
    if spec.strip().lower() == "all":
        wanted = list(family.providers)
    else:
        wanted = []
        for name in (s.strip() for s in spec.split(",") if s.strip()):
            match = [p for p in family.providers if name in (p.cli_name, p.name)]
            if not match:
                choices = ", ".join(dict.fromkeys(p.cli_name for p in family.providers))
                raise ValueError(f"unknown backend {name!r} for bench.{family.name}; "
                                 f"choose from {choices} or all")
            wanted += [p for p in match if p not in wanted]
    chosen, skipped = [], []
    for p in wanted:
        # Installation first: "flashinfer is not installed (pip install ...)" says more than
        # "needs a GPU" on a CPU box.
        reason = p.available(device)
        if not reason and device == "cpu" and not p.cpu:
            reason = "needs a CUDA GPU (not part of the --cpu smoke)"
        if reason:
            skipped.append((p.name, f"{reason} ({p.hint})" if p.hint else reason))
        else:
            chosen.append(p)
    return chosen, skipped


def _timing_kwargs(args: argparse.Namespace, device: str) -> dict:
    rep_ms = args.rep_ms or (CPU_REP_MS if device == "cpu" else 100.0)
    return {"rep_ms": rep_ms, "warmup_ms": 0.0 if device == "cpu" else 25.0, "device": device}


def run_one(case: Case, provider: Provider, device: str, timing_kwargs: dict,
            reraise: bool = False) -> Outcome:
    """Build the provider's inputs for case and time them; failures become an Outcome."""
    fn, out = None, None
    try:
        n = rotation_count(case.footprint or case.nbytes) if device != "cpu" else 1
        fn = provider.build(case, n, device)
        graph = provider.graph if provider.graph is not None else case.graph
        out = Outcome(case, provider, measure(fn, n_inputs=n, graph=graph, **timing_kwargs))
    except torch.cuda.OutOfMemoryError:
        if reraise:
            raise
        out = Outcome(case, provider, status="skipped", note="out of GPU memory")
    except Exception as err:
        if reraise:
            raise
        first = (str(err).strip().splitlines() or [""])[0][:160]
        out = Outcome(case, provider, status="failed", note=f"{type(err).__name__}: {first}")
    finally:
        del fn  # the inputs: gone before the next case allocates its own
        big = max(case.nbytes, case.footprint) > (64 << 20)
        if device != "cpu" and (big or out is None or out.timing is None):
            gc.collect()
            torch.cuda.empty_cache()
    return out


def _pairs(cases: list[Case], providers: list[Provider]) -> list[tuple[Case, Provider]]:
    return [(c, p) for c in cases for p in providers if p.supports(c.kernel)]


def _progress(pairs, label: str):
    try:
        from tqdm import tqdm
    except ImportError:  # bench extra not installed: run without a bar
        return pairs
    return tqdm(pairs, desc=label, unit="case", leave=False, disable=None if len(pairs) > 4
                else True)


def run_cases(cases, providers, device, args, run, ceil) -> list[Outcome]:
    """Time every (case, provider) pair and attach the results rows of the successful ones."""
    kwargs = _timing_kwargs(args, device)
    outcomes = []
    for case, prov in _progress(_pairs(cases, providers), f"bench.{run.family}"):
        out = run_one(case, prov, device, kwargs, reraise=args.traceback)
        if out.timing is not None:
            out.rows = results.make_rows(
                run, kernel=case.kernel, provider=prov.name, shape=case.shape, dtype=case.dtype,
                timing=out.timing, nbytes=case.nbytes, flops=case.flops, ceilings=ceil,
                model=case.model)
        outcomes.append(out)
    return outcomes


def _out_root(args: argparse.Namespace, device: str) -> Path | None:
    """Where rows go: nowhere for --no-save, and nowhere for a --cpu smoke unless --out is
    given (so CPU numbers never land in the committed GPU series)."""
    if args.no_save or (device == "cpu" and args.out is None):
        return None
    return args.out if args.out is not None else results.default_root()


def _no_gpu_message(family: Family) -> str:
    return (f"bench.{family.name}: no CUDA GPU here (torch {torch.__version__}, "
            "torch.cuda.is_available() is False); nothing measured. Add --cpu for a tiny CPU "
            "smoke run (torch reference; Triton under TRITON_INTERPRET=1).")


def main(family: Family, argv: list[str] | None = None) -> int:
    """Run ``python -m bench.<family>``; returns the exit status (0 ok, 1 a provider failed)."""
    parser = build_parser(family)
    args = parser.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        report.console().print(_no_gpu_message(family))
        return 0
    device = "cpu" if args.cpu else args.device
    if device != "cpu":
        # Events and graphs use the current device's streams. An index, not "cuda": torch 2.11
        # rejects a device without one.
        torch.cuda.set_device(torch.device(device).index or 0)
    args.dtype = DTYPES[args.dtype or ("fp32" if args.cpu else "bf16")]
    try:
        providers, skipped = select_providers(family, args.backend, device)
        cases = family.cases(args)
    except ValueError as err:
        parser.error(str(err))
    report.print_skipped(skipped)
    rest = sys.argv[1:] if argv is None else argv
    run = results.new_run(family.name, device, argv=["python", "-m", f"bench.{family.name}", *rest])
    ceil = ceilings_mod.get(device) if providers and cases else ceilings_mod.Ceilings()
    outcomes = run_cases(cases, providers, device, args, run, ceil)
    rows = [r for o in outcomes for r in o.rows]
    root = _out_root(args, device)
    if root is not None and rows:
        csv_path, _ = results.write_run(root, run, rows, ceil, {"skipped": dict(skipped)})
        report.console().print(f"wrote {len(rows)} rows to {csv_path} (run {run.run_id})")
    report.print_table(family.name, outcomes, run.env, ceil, skipped, compare=args.compare)
    return 1 if any(o.status == "failed" for o in outcomes) else 0
