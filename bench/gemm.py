"""``python -m bench.gemm``: the FP8 weight-only GEMM (W8A16) vs bf16 cuBLAS and fp8 W8A8.

    python -m bench.gemm --quick                      # the four ANCHORS shapes, M = 1/16/64/1024
    python -m bench.gemm --shape 6144x4096 --m 1,16,64 --backend cuda,triton,scaled_mm
    python -m bench.gemm --model llama-3-70b --prefetch off --group-size 128
    python -m bench.gemm --cpu --out /tmp/r           # tiny CPU smoke, fp16 (Triton interpreted)

Providers (``--backend``, in this order; ``cuda`` selects both cuda rows, ``triton`` both triton
rows):

- ``cuda`` / ``triton``: ``fp8_marlin_gemm(x, qweight, scales, out=..., backend=...)`` (the
  Marlin-style CUDA kernel and its Triton twin) at the tuned config: the "prefetch on" rows.
  ``cuda-prefetch-off`` / ``triton-prefetch-off``: the same call with ``stages=1`` (no main-loop
  prefetch). ``--prefetch both`` (default) runs both, ``on`` / ``off`` one of them. The tuned
  config may itself be single-stage (the tuner searches prefetch too), and
  TRITON_DISABLE_MACA_OPT_MMA_PREFETCH=1 turns it off everywhere: the note says so. Each build
  checks its output once against the dequantized weight (fp32) before timing.
- ``torch``: ``torch.mm(x, w.T)`` with the bf16 weight (cuBLAS): what the FP8 weight replaces.
- ``scaled_mm``: ``torch._scaled_mm`` W8A8 with an e4m3 weight. The activation is quantized per
  token (amax, scale, cast) inside every timed call, so its time includes that; row-wise scales
  (per token x per channel) where this torch/GPU takes them, else per-tensor ones (the note says
  which). ``scaled_mm-fp8act`` (also selected by ``--backend scaled_mm``): the same GEMM given
  activations already in e4m3, nothing quantized in the timed call: the GEMM alone, as ANCHORS
  measured it.

Shapes (``--shapes``): ``anchors`` = bench.shapes.GEMM_NK (../shared/ANCHORS.md "GEMM at small
M"), ``models`` = the fused linear layers of bench.shapes.GEMM_MODELS (bench.shapes.linear_shapes),
``default`` both; ``--model NAME`` one model's layers, ``--shape NxK`` (repeatable) explicit ones.
M: ``--m`` (default bench.shapes.GEMM_M_FULL = 1, 16, 64, 256, 1024, 4096; ``--quick``:
1, 16, 64, 1024 on the anchors shapes). x ~ N(0, 1), w ~ N(0, 1/K); ``--group-size -1|128``.

Per row (results/ and the harness table): µs (median, p20-p80; CUDA-graph replays under ~100 µs,
input sets rotated until one pass moves 3x the L2, each with its own weight, so a 16 MB weight
never stays in the 50-60 MB L2), TB/s of the provider's traffic (its weight: fp8 + fp32 scales
for ours and scaled_mm, bf16 for torch; plus x read and y written), TFLOP/s (2MNK), and the
fraction of the roofline floor = max(fp8-weight bytes / copy bandwidth, 2MNK / bf16 GEMM
ceiling), bench/ceilings.py's measured values, as bench/moe.py computes its floor (a W8A16
floor: scaled_mm multiplies in fp8, so at large M its fraction can pass 1). The note
carries each row's speed vs torch and vs scaled_mm timed in the same run (1.25x = 25% faster).
Last, a short table per (shape, M): ANCHORS' "fp8-weight floor" (bytes only, measured copy
bandwidth, 4.3 TB/s when unmeasured), every provider's µs, and the best of ours against it.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import math
import sys
from types import SimpleNamespace

import torch

from bench import cli, report, results, shapes
from bench.cli import Case, Family, Provider
from pykernels import envs

KERNEL = "fp8_gemm"
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3 value
PANEL = 128  # K columns per packed panel (docs/quant.md); the group size of --group-size 128
ANCHOR_COPY_TBPS = 4.3  # ../shared/ANCHORS.md's floor bandwidth, used when none was measured
QUICK_M = (1, 16, 64, 1024)
CPU_SHAPES = ((128, 256), (64, 192))  # N x K: one K a multiple of 128, one not
CPU_M = (1, 7)
SEED = 1234
PEERS = ("torch", "scaled_mm", "scaled_mm-fp8act")
PREFETCH = ("both", "on", "off")
SCALED_MM_MODES: dict[str, str] = {}  # activation dtype name -> the scale mode its rows used
_DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32"}


# ---- shapes, bytes and the floor ------------------------------------------------------------


def parse_nk(text: str) -> tuple[int, int]:
    """'4096x14336' -> (N, K) = (4096, 14336): the weight's output and input features."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        n, k = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--shape expects NxK (e.g. 4096x4096), got {text!r}") from None
    if n <= 0 or k <= 0 or n % 64 or k % 64:
        raise argparse.ArgumentTypeError(f"--shape {text!r}: N and K must be positive "
                                         "multiples of 64 (the kernels' granularity)")
    return n, k


def parse_m(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--m expects comma-separated positive integers, "
                                         f"got {text!r}")
    return values


def gemm_nbytes(m: int, n: int, k: int, group_size: int = -1, fp8: bool = True,
                act_bytes: int = 2) -> int:
    """Bytes a perfect kernel moves: the weight (fp8 + fp32 scales per channel or per
    128-group, or bf16), x read and y written (act_bytes each)."""
    if fp8:
        weight = n * k + 4 * n * (-(-k // PANEL) if group_size == PANEL else 1)
    else:
        weight = 2 * n * k
    return weight + act_bytes * (m * k + m * n)


def gemm_flops(m: int, n: int, k: int) -> float:
    return 2.0 * m * n * k


def gemm_case(m: int, n: int, k: int, group_size: int, dtype: torch.dtype,
              label: str = "") -> Case:
    nbytes = gemm_nbytes(m, n, k, group_size, act_bytes=dtype.itemsize)
    shape = {"m": m, "n": n, "k": k, "group_size": group_size}
    return Case(KERNEL, shape, dtype, nbytes=nbytes, flops=gemm_flops(m, n, k), model=label,
                footprint=nbytes)


def traffic_bytes(case: Case, provider: str) -> int:
    """The bytes behind a provider's TB/s: torch reads the bf16 weight, the rest fp8."""
    if provider != "torch":
        return case.nbytes
    s = case.shape
    return gemm_nbytes(s["m"], s["n"], s["k"], fp8=False, act_bytes=case.dtype.itemsize)


def weight_floor_us(case: Case, copy_tbps: float | None) -> float:
    """ANCHORS' "fp8-weight floor": the case's bytes (fp8 weight + scales, x, y) at the copy
    bandwidth (measured; 4.3 TB/s when it was not)."""
    return case.nbytes / ((copy_tbps or ANCHOR_COPY_TBPS) * 1e12) * 1e6


def nk_grid(args: argparse.Namespace) -> list[tuple[int, int, str]]:
    """(N, K, label) of every weight shape asked for, duplicates merged into one label."""
    if args.cpu:
        named = [(n, k, "cpu") for n, k in (args.shape or CPU_SHAPES)]
    elif args.shape:
        named = [(n, k, "") for n, k in args.shape]
    elif args.model:
        m = shapes.get(args.model)
        named = [(n, k, f"{m.name}:{layer}") for layer, n, k in shapes.linear_shapes(m.name)]
    else:
        named = []
        if args.quick or args.shapes in ("default", "anchors"):
            named += [(n, k, "anchors") for n, k in shapes.GEMM_NK]
        if not args.quick and args.shapes in ("default", "models"):
            named += [(n, k, f"{name}:{layer}") for name in shapes.GEMM_MODELS
                      for layer, n, k in shapes.linear_shapes(name)]
    merged: dict[tuple[int, int], list[str]] = {}
    for n, k, label in named:
        labels = merged.setdefault((n, k), [])
        if label and label not in labels:
            labels.append(label)
    return [(n, k, "+".join(labels)) for (n, k), labels in merged.items()]


def make_cases(args: argparse.Namespace) -> list[Case]:
    if args.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"bench.gemm: activations must be bf16 or fp16, got "
                         f"{results.dtype_name(args.dtype)}")
    ms = args.m or (CPU_M if args.cpu else QUICK_M if args.quick else shapes.GEMM_M_FULL)
    return [gemm_case(m, n, k, args.group_size, args.dtype, label)
            for n, k, label in nk_grid(args) for m in ms]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", action="append", type=parse_nk, metavar="NxK",
                   help="explicit weight shape N x K (repeatable); overrides the presets")
    p.add_argument("--m", type=parse_m, default=None, metavar="M[,M...]",
                   help="activation rows (default 1,16,64,256,1024,4096; --quick 1,16,64,1024)")
    p.add_argument("--group-size", type=int, default=-1, choices=(-1, 128),
                   help="scales per output channel (-1, default) or per 128-wide K group")
    p.add_argument("--prefetch", default="both", choices=PREFETCH,
                   help="cuda/triton rows at the tuned stages (on), with stages=1 (off), or "
                        "both (default)")


# ---- inputs --------------------------------------------------------------------------------


def _api() -> SimpleNamespace:
    """The quant ops, imported on first use (so this module imports before they exist)."""
    pack = importlib.import_module("pykernels.quant.pack")
    return SimpleNamespace(gemm=importlib.import_module("pykernels.quant.gemm").fp8_marlin_gemm,
                           pack=pack.fp8_weight_pack, unpack=pack.fp8_weight_unpack)


def _weight(case: Case, i: int, device: str) -> torch.Tensor:
    """Set i's bf16/fp16 weight [N, K] ~ N(0, 1/K) (own seed per set: distinct bytes)."""
    n, k = case.shape["n"], case.shape["k"]
    gen = torch.Generator(device).manual_seed(SEED + i)
    w = torch.randn(n, k, device=device, dtype=case.dtype, generator=gen)
    return w.mul_(k ** -0.5)


def _activations(case: Case, count: int, device: str) -> tuple[list, list]:
    m, n, k = case.shape["m"], case.shape["n"], case.shape["k"]
    xs = [torch.randn(m, k, device=device, dtype=case.dtype) for _ in range(count)]
    return xs, [torch.empty(m, n, device=device, dtype=case.dtype) for _ in range(count)]


def check_output(got: torch.Tensor, x: torch.Tensor, packed, api) -> None:
    """One-time guard before timing: ours equals x @ dequant(w).T computed in fp32."""
    want = x.float() @ api.unpack(packed, torch.float32).T
    tol = 2e-2 if x.dtype == torch.bfloat16 else 5e-3
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol,
                               msg=lambda m: f"fp8_marlin_gemm differs from the dequantized "
                                             f"reference: {m}")


def _build_ours(backend: str, stages: int | None):
    def build(case: Case, count: int, device: str):
        api = _api()
        packed = [api.pack(_weight(case, i, device), case.shape["group_size"])
                  for i in range(count)]
        xs, outs = _activations(case, count, device)

        def fn(i):
            return api.gemm(xs[i], packed[i].qweight, packed[i].scales, out=outs[i],
                            backend=backend, stages=stages)

        check_output(fn(0), xs[0], packed[0], api)
        return fn

    return build


def build_torch(case: Case, count: int, device: str):
    ws = [_weight(case, i, device) for i in range(count)]
    xs, outs = _activations(case, count, device)
    return lambda i: torch.mm(xs[i], ws[i].t(), out=outs[i])


# ---- torch._scaled_mm (W8A8) ----------------------------------------------------------------


@functools.cache
def scaled_mm_mode(device: str, dtype: torch.dtype) -> str:
    """"rowwise" when _scaled_mm takes [M, 1] x [1, N] fp32 scales with this output dtype on
    this device, else "tensor" (per-tensor scales); raises when neither runs."""
    a = torch.ones(16, 32, device=device).to(FP8)
    b = torch.ones(16, 32, device=device).to(FP8).t()
    try:
        torch._scaled_mm(a, b, scale_a=torch.ones(16, 1, device=device),
                         scale_b=torch.ones(1, 16, device=device), out_dtype=dtype)
        torch.cuda.synchronize(device)
    except (RuntimeError, ValueError, NotImplementedError):  # no row-wise scales here
        one = torch.ones((), device=device)
        torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=dtype)
        return "tensor"
    return "rowwise"


def quantize_fp8(t: torch.Tensor, rowwise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 tensor, fp32 scale) with t ~= q * scale: one scale per row ([rows, 1]) or one for
    the tensor (0-dim); amax / 448, so nothing saturates."""
    amax = t.abs().amax(dim=-1, keepdim=True) if rowwise else t.abs().amax()
    scale = amax.float().clamp(min=1e-12) / FP8_MAX
    return (t / scale).to(FP8), scale


def scaled_mm_available(device: str) -> str | None:
    if device == "cpu":
        return "needs a CUDA GPU with FP8 tensor cores (compute capability >= 8.9)"
    if not hasattr(torch, "_scaled_mm"):
        return f"torch {torch.__version__} has no torch._scaled_mm"
    cap = torch.cuda.get_device_capability(torch.device(device))
    if cap < (8, 9):
        return f"needs compute capability >= 8.9 (FP8 tensor cores), got {cap[0]}.{cap[1]}"
    return None


def _build_scaled_mm(quant_timed: bool):
    def build(case: Case, count: int, device: str):
        mode = scaled_mm_mode(device, case.dtype)
        SCALED_MM_MODES[results.dtype_name(case.dtype)] = mode
        rowwise = mode == "rowwise"
        weights = []
        for i in range(count):
            q, s = quantize_fp8(_weight(case, i, device), rowwise)
            weights.append((q.t(), s.t().contiguous() if rowwise else s))  # b col-major, [1, N]
        xs, _ = _activations(case, count, device)
        given = None if quant_timed else [quantize_fp8(x, rowwise) for x in xs]

        def fn(i):
            # a W8A8 layer quantizes x every call; scaled_mm-fp8act times the GEMM alone
            xq, sx = quantize_fp8(xs[i], rowwise) if given is None else given[i]
            wq, sw = weights[i]
            return torch._scaled_mm(xq, wq, scale_a=sx, scale_b=sw, out_dtype=case.dtype)

        return fn

    return build


# ---- providers -----------------------------------------------------------------------------


def backend_reasons(module) -> dict[str, str | None]:
    """{backend: None or why not} from pykernels.quant.gemm (its backends() or its registry)."""
    registry = getattr(module, "backends", None)
    if callable(registry):
        return registry()
    family = getattr(module, "_FAMILY", None)
    return family.available() if family is not None else {}


def _ours_available(backend: str):
    def available(device: str) -> str | None:
        if device == "cpu" and backend == "triton" and not envs.TRITON_INTERPRET:
            return "runs on the CPU only under the Triton interpreter (set TRITON_INTERPRET=1)"
        if device == "cpu" and backend == "cuda":
            return "needs a CUDA GPU (not part of the --cpu smoke)"
        mod = cli.module_or_reason("pykernels.quant.gemm")
        if isinstance(mod, str):
            return mod
        return backend_reasons(mod).get(backend)

    return available


def _ours(backend: str, off: bool) -> Provider:
    return Provider(f"{backend}-prefetch-off" if off else backend,
                    _build_ours(backend, 1 if off else None), backend=backend,
                    available=_ours_available(backend), cpu=backend == "triton")


def providers(prefetch: str = "both") -> tuple[Provider, ...]:
    """Ours (at tuned stages and/or stages=1, per --prefetch), then the peers."""
    if prefetch not in PREFETCH:
        raise ValueError(f"--prefetch must be one of {', '.join(PREFETCH)}, got {prefetch!r}")
    offs = {"both": (False, True), "on": (False,), "off": (True,)}[prefetch]
    ours = tuple(_ours(b, off) for b in ("cuda", "triton") for off in offs)
    return (*ours,
            Provider("torch", build_torch, cpu=True, peer=True),
            Provider("scaled_mm", _build_scaled_mm(True), available=scaled_mm_available,
                     peer=True),
            Provider("scaled_mm-fp8act", _build_scaled_mm(False), backend="scaled_mm",
                     available=scaled_mm_available, peer=True))


def family(prefetch: str = "both") -> Family:
    return Family(
        name="gemm",
        description="FP8 weight-only GEMM (W8A16): ours (cuda, triton; prefetch on/off) vs "
                    "bf16 cuBLAS (torch) and fp8 W8A8 torch._scaled_mm (activation quant "
                    "timed, and given in fp8).",
        providers=providers(prefetch),
        cases=make_cases,
        presets=("default", "anchors", "models"),
        add_arguments=add_arguments,
    )


FAMILY = family()


# ---- rows, notes and the short table ---------------------------------------------------------


def provider_rows(run: results.RunInfo, outcome, ceil) -> list[dict]:
    """The outcome's results rows: time and compute against the case (the fp8-weight roofline),
    bandwidth over the provider's own bytes (torch: the bf16 weight)."""
    case, name = outcome.case, outcome.provider.name
    common = dict(kernel=case.kernel, provider=name, shape=case.shape, dtype=case.dtype,
                  timing=outcome.timing, flops=case.flops, ceilings=ceil, model=case.model)
    rows = results.make_rows(run, nbytes=case.nbytes, **common)
    own = traffic_bytes(case, name)
    if own == case.nbytes:
        return rows
    bw = [r for r in results.make_rows(run, nbytes=own, **common) if r["metric"] == "bandwidth"]
    return [bw[0] if r["metric"] == "bandwidth" else r for r in rows]


def _by_case(outcomes) -> dict[int, list]:
    groups: dict[int, list] = {}
    for o in outcomes:
        groups.setdefault(id(o.case), []).append(o)
    return groups


def _prefetch_note(name: str) -> str:
    if envs.TRITON_DISABLE_MACA_OPT_MMA_PREFETCH:
        return "prefetch off (TRITON_DISABLE_MACA_OPT_MMA_PREFETCH=1)"
    return "prefetch off (stages=1)" if name.endswith("-prefetch-off") else "prefetch on"


def row_notes(outcomes) -> dict[int, str]:
    """{id(outcome): note}: the prefetch label of ours, scaled_mm's scale mode, and the speed
    vs torch and vs scaled_mm of the same case."""
    notes = {}
    for group in _by_case(outcomes).values():
        ref = {o.provider.name: o.timing.median_us for o in group
               if o.timing is not None and o.provider.name in PEERS}
        for o in group:
            if o.timing is None:
                continue
            name, parts = o.provider.name, []
            if name.startswith("scaled_mm"):
                mode = SCALED_MM_MODES.get(results.dtype_name(o.case.dtype), "rowwise")
                timed = "act quant timed" if name == "scaled_mm" else "fp8 act given"
                parts.append(f"W8A8 {'row-wise' if mode == 'rowwise' else 'per-tensor'} "
                             f"scales, {timed}")
            elif name != "torch":
                parts.append(_prefetch_note(name))
            parts += [f"{us / o.timing.median_us:.2f}x vs {peer}" for peer, us in ref.items()
                      if peer != name]
            notes[id(o)] = ", ".join(parts)
    return notes


def finish(outcomes, run: results.RunInfo, ceil) -> None:
    """Per-provider bandwidth rows and the notes, in place."""
    notes = row_notes(outcomes)
    for o in outcomes:
        if o.timing is None:
            continue
        o.rows = provider_rows(run, o, ceil)
        o.note = "; ".join(x for x in (o.note, notes.get(id(o), "")) if x)


def summary_rows(outcomes, copy_tbps: float | None) -> tuple[list[str], list[list[str]]]:
    """(headers, cells) of the short table: one line per case."""
    names = list(dict.fromkeys(o.provider.name for o in outcomes if o.timing is not None))
    headers = ["N x K", "M", "fp8-w floor us", *(f"{n} us" for n in names), "best ours",
               *(f"vs {peer}" for peer in PEERS), "% floor"]
    lines = []
    for group in _by_case(outcomes).values():
        case = group[0].case
        us = {o.provider.name: o.timing.median_us for o in group if o.timing is not None}
        floor = weight_floor_us(case, copy_tbps)
        ours = {n: t for n, t in us.items() if n not in PEERS}
        best = min(ours, key=ours.get) if ours else None
        cells = [f"{case.shape['n']}x{case.shape['k']}", str(case.shape["m"]), f"{floor:.1f}",
                 *(f"{us[n]:.1f}" if n in us else "" for n in names), best or ""]
        for peer in PEERS:
            cells.append(f"{us[peer] / ours[best]:.2f}x" if best and peer in us else "")
        cells.append(f"{100 * floor / ours[best]:.0f}%" if best else "")
        lines.append(cells)
    return headers, lines


def summary_caption(outcomes) -> str:
    """The closing line: counts, and the geometric mean over shapes of the best of ours vs each
    peer (a log's last line, which bench.gpu_check shows)."""
    counts = {k: sum(o.status == k for o in outcomes) for k in ("ok", "failed", "skipped")}
    parts = [f"{counts['ok']} measured, {counts['failed']} failed, {counts['skipped']} skipped"]
    for peer in PEERS:
        ratios = []
        for group in _by_case(outcomes).values():
            us = {o.provider.name: o.timing.median_us for o in group if o.timing is not None}
            ours = [t for n, t in us.items() if n not in PEERS]
            if ours and peer in us:
                ratios.append(us[peer] / min(ours))
        if ratios:
            mean = math.exp(sum(map(math.log, ratios)) / len(ratios))
            parts.append(f"best of ours vs {peer}: {mean:.2f}x (geo-mean of {len(ratios)})")
    return "; ".join(parts)


def print_summary(outcomes, ceil) -> None:
    headers, lines = summary_rows(outcomes, ceil.copy_tbps)
    if not lines:
        return
    bw = f"{ceil.copy_tbps:.2f} TB/s measured" if ceil.copy_tbps else \
        f"{ANCHOR_COPY_TBPS} TB/s (not measured)"
    title = f"bench.gemm summary: µs per provider; floor = fp8-weight bytes at {bw}"
    caption = summary_caption(outcomes)
    try:
        from rich.table import Table
    except ImportError:
        print(title)
        for cells in [headers, *lines]:
            print("  ".join(cells))
        print(caption)
        return
    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    for h in headers:
        table.add_column(h, justify="left" if h in ("N x K", "best ours") else "right")
    for cells in lines:
        table.add_row(*cells)
    report.console().print(table)


# ---- the command ---------------------------------------------------------------------------


def normalize_argv(argv: list[str]) -> list[str]:
    """torch dtype names for --dtype (bfloat16 -> bf16), and fp16 for a --cpu smoke (the
    harness would pick fp32, which the op does not take; bf16 dots are broken in the Triton
    interpreter)."""
    out = []
    for i, arg in enumerate(argv):
        if i > 0 and argv[i - 1] == "--dtype":
            arg = _DTYPE_ALIASES.get(arg, arg)
        elif arg.startswith("--dtype="):
            arg = "--dtype=" + _DTYPE_ALIASES.get(arg.partition("=")[2], arg.partition("=")[2])
        out.append(arg)
    if "--cpu" in out and not any(a == "--dtype" or a.startswith("--dtype=") for a in out):
        out += ["--dtype", "fp16"]
    return out


def _prefetch_arg(argv: list[str]) -> str:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--prefetch", default="both")
    value = pre.parse_known_args(argv)[0].prefetch
    return value if value in PREFETCH else "both"  # the real parser reports a bad value


def main(argv: list[str] | None = None) -> int:
    """cli.main with this family's providers for --prefetch, per-provider bandwidth rows and
    notes (cli.run_cases wrapped for the call, as bench.moe does), then the short table."""
    argv = normalize_argv(list(sys.argv[1:] if argv is None else argv))
    fam = family(_prefetch_arg(argv))
    real = cli.run_cases
    done = []

    def run_cases(cases, providers_, device, args, run, ceil):
        outcomes = real(cases, providers_, device, args, run, ceil)
        finish(outcomes, run, ceil)
        done.append((outcomes, ceil))
        return outcomes

    cli.run_cases = run_cases
    try:
        status = cli.main(fam, argv)
    finally:
        cli.run_cases = real
    if done:
        print_summary(*done[-1])
    return status


if __name__ == "__main__":
    raise SystemExit(main())
