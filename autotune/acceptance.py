"""`python -m autotune.acceptance --family norm --out DIR`: the autotuner's GPU acceptance run.

In a fresh cache folder DIR/<family>/cache, through the same commands users type:

1. cold tune (`python -m autotune.<family> ...`), 2. warm rerun: its tuning time as a fraction of
the cold one (target <= 2%), 3. a SGLANG_FLASHINFER_AUTOTUNE_CACHE=0 run: it must write runs/ files
and leave every cache file byte-identical (sha256 before/after), 4. a second =0 run and
`autotune.diff` of the two runs/ files per tunable (tune stability), 5. tuned vs default speedup per
bucket from the cold tune, 6. `autotune.show` output. Prints a short summary and writes
DIR/acceptance.json. A small grid (one model, four batch sizes) keeps it to a few GPU minutes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from autotune.diff import compare


def _sha(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.glob("*.json"))} if folder.is_dir() else {}


def _runs(folder: Path) -> set[str]:
    return {p.name for p in folder.glob("*.json")} if folder.is_dir() else set()


class Step:
    """Runs the family CLI (and friends) with this acceptance run's cache folder."""

    def __init__(self, family: str, out: Path, cli_args: list[str], timeout: float):
        self.family, self.out, self.cli_args, self.timeout = family, out, cli_args, timeout
        self.cache = out / "cache"
        self.log = out / "log.txt"

    def run(self, label: str, module: str, args: list[str], **env) -> tuple[int, float, str]:
        child = {**os.environ, "PYKERNELS_CACHE_DIR": str(self.cache), **env}
        cmd = [sys.executable, "-m", module, *args]
        start = time.monotonic()
        done = subprocess.run(cmd, env=child, capture_output=True, text=True,
                              timeout=self.timeout)
        wall = time.monotonic() - start
        with self.log.open("a") as f:
            f.write(f"\n===== {label}: {' '.join(cmd)} {env} rc={done.returncode} "
                    f"wall={wall:.1f}s\n{done.stdout}\n{done.stderr}\n")
        return done.returncode, wall, done.stdout

    def tune(self, label: str, **env) -> dict:
        report = self.out / f"{label}.json"
        rc, wall, _ = self.run(label, f"autotune.{self.family}",
                               [*self.cli_args, "--report", str(report), "--no-progress"], **env)
        body = json.loads(report.read_text()) if report.exists() else {}
        return {"rc": rc, "wall_s": round(wall, 2),
                "tuning_s": round(body.get("tuning_seconds", float("nan")), 3), "report": body}


def _speedups(cold: dict) -> list[dict]:
    rows = []
    for rep in cold.get("reports", []):
        for r in rep["results"]:
            e = r.get("entry") or {}
            if e.get("speedup_vs_default"):
                rows.append({"tunable": rep["name"], "bucket": r["key"], "config": e["config"],
                             "best_us": e["time_us"], "default_us": e["default_us"],
                             "speedup": e["speedup_vs_default"]})
    return rows


def _pair_runs(new1: set[str], new2: set[str], runs: Path) -> list[tuple[Path, Path]]:
    by_name = {}
    for tag, names in (("a", new1), ("b", new2)):
        for n in names:
            by_name.setdefault(n.split(".")[0], {})[tag] = runs / n
    return [(v["a"], v["b"]) for v in by_name.values() if "a" in v and "b" in v]


def accept_family(family: str, out: Path, cli_args: list[str], timeout: float) -> dict:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    step = Step(family, out, cli_args, timeout)
    cold = step.tune("cold")
    warm = step.tune("warm")
    cache_dir, runs_dir = step.cache / "autotune", step.cache / "autotune" / "runs"
    before, runs0 = _sha(cache_dir), _runs(runs_dir)
    run1 = step.tune("runs1", SGLANG_FLASHINFER_AUTOTUNE_CACHE="0")
    after, runs1 = _sha(cache_dir), _runs(runs_dir)
    run2 = step.tune("runs2", SGLANG_FLASHINFER_AUTOTUNE_CACHE="0")
    runs2 = _runs(runs_dir)
    diffs = []
    for a, b in _pair_runs(runs1 - runs0, runs2 - runs1, runs_dir):
        step.run(f"diff {a.name}", "autotune.diff", [str(a), str(b)])
        d = compare(a, b)
        diffs.append({k: d[k] for k in ("a", "b", "buckets", "same_winner_share", "agree_share",
                                        "median_abs_delta", "max_abs_delta")})
    rc, _, show = step.run("show", "autotune.show", [])
    (out / "show.txt").write_text(show)
    speed = _speedups(cold["report"])
    ratio = warm["tuning_s"] / cold["tuning_s"] if cold["tuning_s"] else float("nan")
    return {
        "family": family, "gpu": cold["report"].get("gpu"), "cli_args": cli_args,
        "cold": {k: cold[k] for k in ("rc", "wall_s", "tuning_s")},
        "warm": {k: warm[k] for k in ("rc", "wall_s", "tuning_s")},
        "warm_over_cold": ratio, "warm_ok": ratio <= 0.02,
        "runs_mode": {"rc": run1["rc"], "runs_files": sorted(runs1 - runs0),
                      "cache_files": sorted(before), "cache_byte_identical": before == after,
                      "ok": before == after and bool(runs1 - runs0)},
        "second_runs": {"rc": run2["rc"], "runs_files": sorted(runs2 - runs1)},
        "diff": diffs,
        "speedups": speed,
        "geomean_speedup": math.exp(sum(math.log(r["speedup"]) for r in speed) / len(speed))
        if speed else None,
        "show_rc": rc,
    }


def _summary(res: dict) -> str:
    lines = [f"== autotune acceptance: {res['family']} on {res['gpu']}",
             f"cold tune {res['cold']['tuning_s']:.2f} s (wall {res['cold']['wall_s']:.1f} s), "
             f"warm rerun {res['warm']['tuning_s']:.3f} s = {100 * res['warm_over_cold']:.2f}% "
             f"of cold ({'OK' if res['warm_ok'] else 'FAIL'}: <= 2%)",
             f"SGLANG_FLASHINFER_AUTOTUNE_CACHE=0: runs/ files {res['runs_mode']['runs_files']}, "
             f"cache byte-identical {res['runs_mode']['cache_byte_identical']} "
             f"({'OK' if res['runs_mode']['ok'] else 'FAIL'})"]
    for d in res["diff"]:
        lines.append(f"diff {Path(d['a']).name} vs {Path(d['b']).name}: {d['buckets']} buckets, "
                     f"same winner {100 * (d['same_winner_share'] or 0):.0f}%, agree "
                     f"{100 * (d['agree_share'] or 0):.0f}%, median |delta| "
                     f"{100 * (d['median_abs_delta'] or 0):.1f}%")
    for r in res["speedups"]:
        lines.append(f"  {r['tunable']:<20} {r['bucket']:<40} {r['best_us']:9.2f} us vs default "
                     f"{r['default_us']:9.2f} us  {r['speedup']:.2f}x")
    if res["geomean_speedup"]:
        lines.append(f"tuned vs default geomean {res['geomean_speedup']:.3f}x")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m autotune.acceptance",
                                description=__doc__.split("\n")[0])
    p.add_argument("--family", default="norm", help="comma-separated families (default norm)")
    p.add_argument("--out", type=Path, required=True, help="output folder (recreated)")
    p.add_argument("--model", default="llama-3-8b")
    p.add_argument("--batch-sizes", default="1,16,256,4096")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--budget", type=float, default=120.0, help="per tune, seconds")
    p.add_argument("--cpu", action="store_true", help="interpreter smoke run (tests only)")
    p.add_argument("--shape", help="explicit shape instead of --model (CPU smoke runs)")
    args = p.parse_args(argv)
    cli = ["--batch-sizes", args.batch_sizes, "--dtype", args.dtype, "--budget", str(args.budget)]
    cli += ["--shape", args.shape] if args.shape else ["--model", args.model]
    cli += ["--cpu"] if args.cpu else []
    results = []
    for family in [f.strip() for f in args.family.split(",") if f.strip()]:
        res = accept_family(family, args.out / family, cli, timeout=args.budget * 3 + 300)
        results.append(res)
        print(_summary(res), flush=True)
    (args.out / "acceptance.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"figures: {args.out / 'acceptance.json'}; logs: {args.out}/<family>/log.txt")
    ok = all(r["warm_ok"] and r["runs_mode"]["ok"] and r["cold"]["rc"] == 0 for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
