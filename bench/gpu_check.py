"""`python -m bench.gpu_check`: the one command that proves the package on a CUDA machine.

Builds pykernels._C ahead of time (`--aot`, as `pip install --no-build-isolation -e .` does) or
JIT-loads it, runs `pytest -m gpu`, runs the quick benchmarks and the autotune acceptance, and
prints a short summary last. Every step's full log goes to --out; results (CSV/JSON) go to
--out/results so they can be copied back into results/.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (name, python -m module, arguments); {out} is replaced by the output folder.
BENCHES = [
    ("bench.activation", "bench.activation", ["--quick", "--out", "{out}/results"]),
    ("bench.norm", "bench.norm", ["--quick", "--out", "{out}/results"]),
    ("bench.attention", "bench.attention", ["--backend", "all", "--quick", "--mode", "all",
                                            "--out", "{out}/results"]),
    ("bench.gemm", "bench.gemm", ["--quick", "--out", "{out}/results"]),
    ("bench.moe", "bench.moe", ["--quick", "--out", "{out}/results"]),
    ("microbench", "pytest", ["-m", "gpu", "-q", "-p", "no:cacheprovider",
                              "tests/bench/test_microbench.py", "--benchmark-only",
                              "--benchmark-json={out}/microbench.json"]),
    ("dashboard ingest", "bench.dashboard", ["--results", "{out}/results",
                                             "--ingest", "{out}/microbench.json"]),
    ("dashboard check", "bench.dashboard", ["--results", "{out}/results", "--check"]),
]


def _run(name: str, cmd: list[str], out: Path, timeout: int) -> dict:
    log = out / (re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") + ".log")
    start = time.perf_counter()
    print(f"== {name}: {shlex.join(cmd)}", flush=True)
    with open(log, "w") as fh:
        try:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                                  timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    seconds = time.perf_counter() - start
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    tail = lines[-1] if lines else ""
    print(f"   -> rc={rc} in {seconds:.0f} s; {tail[:160]}", flush=True)
    return {"step": name, "rc": rc, "seconds": seconds, "tail": tail, "log": str(log)}


def _build_step(aot: bool, out: Path) -> dict:
    if aot:
        cmd = [sys.executable, "-m", "pip", "install", "-v", "--no-build-isolation", "--no-deps",
               "-e", "."]
        return _run("build (aot)", cmd, out, timeout=900)
    code = "from pykernels import _ops; print('loaded:', _ops.load())"
    return _run("build (jit)", [sys.executable, "-c", code], out, timeout=900)


def _device_line() -> str:
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device"
    props = torch.cuda.get_device_properties(0)
    return (f"{props.name}, sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
            f"torch {torch.__version__}, CUDA {torch.version.cuda}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__)
    parser.add_argument("--out", default="gpu_check_out", help="folder for logs and results")
    parser.add_argument("--aot", action="store_true", help="build pykernels._C ahead of time")
    parser.add_argument("--pytest-args", default="", help="extra pytest arguments")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--step", action="append", default=[], metavar="NAME=COMMAND",
                        help="extra shell command to run and summarize (repeatable)")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    (out / "results").mkdir(parents=True, exist_ok=True)
    device = _device_line()
    print("device:", device, flush=True)
    steps = [_build_step(args.aot, out)]
    if not args.skip_tests:
        # Micro-benchmarks run once each here (--benchmark-disable); the bench step times them.
        # pytest-xdist when present: 8 workers share the GPU, and a worker that crashes is
        # reported as that test's failure instead of ending the session.
        xdist = ["-n", "8"] if importlib.util.find_spec("xdist") else []
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rf", "-p", "no:cacheprovider",
               "--benchmark-disable", f"--junitxml={out}/pytest-gpu.xml", *xdist,
               *shlex.split(args.pytest_args)]
        steps.append(_run("pytest -m gpu", cmd, out, timeout=1800))
    if not args.skip_bench:
        for name, module, bench_args in BENCHES:
            if importlib.util.find_spec(module) is None:
                steps.append({"step": name, "rc": "missing", "seconds": 0.0, "tail": ""})
                continue
            cmd = [sys.executable, "-m", module, *[a.format(out=out) for a in bench_args]]
            steps.append(_run(name, cmd, out, timeout=900))
    for spec in args.step:
        name, _, command = spec.partition("=")
        steps.append(_run(name, ["bash", "-c", command.format(out=out)], out, timeout=1800))
    print(f"\nsummary ({device})")
    for s in steps:
        print(f"  {s['step']:<22} rc={s['rc']!s:<8} {s['seconds']:6.0f} s  {s['tail'][:110]}")
    return 0 if all(s["rc"] == 0 for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
