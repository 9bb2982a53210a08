"""``python -m bench.dashboard``: PNG trends and a static HTML page from ``results/``, and the CI
perf-regression check.

    python -m bench.dashboard                      # render results/dashboard/index.html + PNGs
    python -m bench.dashboard --check              # newest run of each series vs the previous
    python -m bench.dashboard --check --baseline first --threshold 0.05
    python -m bench.dashboard --ingest bench.json  # add a pytest-benchmark JSON, then render

It reads only the results folder (``<root>/<device>/results.csv``); devices are kept apart
everywhere (one section, one set of figures and separate series per device). CPU smoke rows
(``cpu/``) are left out unless --include-cpu.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import sys
from datetime import datetime, timezone
from pathlib import Path

from bench import env_info, regress, results
from bench.ceilings import Ceilings
from bench.timing import Timing

TIME = "time"


def _latest(rows):
    """Per (shape, dtype, provider) the row of its newest run."""
    rows = rows.sort_values(["timestamp", "run_id"], kind="stable")
    return rows.groupby(["shape_label", "dtype", "provider"], sort=False).tail(1)


def _cell(row) -> str:
    text = f"{row['value']:.4g} {row['unit']}"
    if row["fraction"] == row["fraction"]:  # not NaN
        text += f" ({100 * row['fraction']:.0f}%)"
    return text


def _table(latest) -> str:
    providers = sorted(latest["provider"].unique())
    head = "".join(f"<th>{html.escape(p)}</th>" for p in providers)
    body = []
    for (shape, dtype), rows in latest.groupby(["shape_label", "dtype"], sort=False):
        by = {r["provider"]: _cell(r) for _, r in rows.iterrows()}
        cells = "".join(f"<td>{html.escape(by.get(p, ''))}</td>" for p in providers)
        body.append(f"<tr><td>{html.escape(shape)}</td><td>{dtype}</td>{cells}</tr>")
    return (f"<table><tr><th>shape</th><th>dtype</th>{head}</tr>{''.join(body)}</table>"
            "<p class=note>median time of each provider's newest run (% of the roofline "
            "ceiling: floor / time)</p>")


def _device_header(rows) -> str:
    last = rows.sort_values(["timestamp", "run_id"]).iloc[-1]
    env = " · ".join(f"{k} {last[k]}" for k in ("driver", "cuda", "torch", "triton",
                                                  "flashinfer", "pykernels")
                     if str(last[k]) not in ("", "nan"))
    ceil = []
    for name, unit in (("copy", "TB/s"), ("bf16_gemm", "TFLOP/s"), ("fp8_gemm", "TFLOP/s")):
        vals = rows[(rows["ceiling"] == name)].sort_values("timestamp")["ceiling_value"].dropna()
        if len(vals):
            ceil.append(f"{name} {vals.iloc[-1]:.4g} {unit}")
    return (f"<h2 id='{last['device_slug']}'>{html.escape(str(last['device']))}</h2>"
            f"<p>newest run {html.escape(str(last['run_id']))} at git "
            f"{str(last['git_sha'])[:10]} · {html.escape(env)}<br>measured ceilings: "
            f"{html.escape(', '.join(ceil) or 'none')}</p>")


def _runs_list(rows) -> str:
    runs = rows.sort_values(["timestamp", "run_id"]).drop_duplicates("run_id")
    items = "".join(f"<li>{html.escape(str(r['run_id']))} (git {str(r['git_sha'])[:10]})</li>"
                    for _, r in runs.iterrows())
    return f"<details><summary>runs (x axis of the trend)</summary><ol>{items}</ol></details>"


def _kernel_section(rows, folder: Path, out: Path, slug: str, source: str, kernel: str) -> str:
    from bench import plots

    stem = f"{kernel}" if source == "bench" else f"{kernel}.{source}"
    title = f"{slug} · {kernel}" + ("" if source == "bench" else f" ({source})")
    latest = _latest(rows)
    pngs = [plots.latest_figure(latest, folder / f"{stem}_latest.png", f"{title}: newest run")]
    pngs += plots.trend_figures(rows, folder, stem, title)
    imgs = "".join(f"<img src='{p.relative_to(out).as_posix()}' alt='{html.escape(p.stem)}'>"
                   for p in pngs)
    return (f"<h3>{html.escape(kernel)} <small>{html.escape(source)}</small></h3>{imgs}"
            f"{_table(latest)}{_runs_list(rows)}")


STYLE = ("body{font-family:sans-serif;margin:1.5em;max-width:1400px}img{max-width:100%;"
         "display:block;margin:.5em 0}table{border-collapse:collapse;font-size:12px}"
         "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
         "td:first-child{text-align:left}.note{color:#666;font-size:12px}")


def render(df, out: Path | str) -> Path:
    """Write ``out/index.html`` and ``out/png/<device>/*.png`` from results rows (time metric);
    stale PNGs from an earlier render are removed first. Returns the HTML path."""
    out = Path(out)
    for old in out.glob("png/*/*.png"):
        old.unlink()
    sections, nav = [], []
    for slug, dev in df.groupby("device_slug", sort=True):
        folder = out / "png" / str(slug)
        folder.mkdir(parents=True, exist_ok=True)
        nav.append(f"<a href='#{slug}'>{html.escape(str(dev['device'].iloc[0]))}</a>")
        parts = [_device_header(dev)]
        times = dev[dev["metric"] == TIME]
        for (source, kernel), rows in times.groupby(["source", "kernel"], sort=True):
            parts.append(_kernel_section(rows, folder, out, str(slug), source, kernel))
        sections.append("".join(parts))
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    n_runs = df["run_id"].nunique()
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>pykernels benchmarks"
            f"</title><style>{STYLE}</style></head><body><h1>pykernels benchmarks</h1>"
            f"<p>{n_runs} runs, rendered {now} by <code>python -m bench.dashboard</code> "
            f"from results/. Devices: {' · '.join(nav) or 'none'}</p>"
            f"{''.join(sections) or '<p>no results yet</p>'}</body></html>\n")
    out.mkdir(parents=True, exist_ok=True)
    index = out / "index.html"
    index.write_text(page)
    return index


# ---- --ingest: pytest-benchmark JSON -> results rows --------------------------------------------
# tests/bench/test_microbench.py stores what a row needs in each benchmark's extra_info: kernel,
# provider, shape (dict), dtype, nbytes, calls_per_round (calls timed per round: the stats are
# divided by it), env (bench.env_info.collect) and ceilings. Benchmarks from elsewhere fall back to
# their group/name and params. pytest-benchmark keeps quartiles, not p20/p80, so the rows' p20/p80
# hold q1/q3 (a slightly narrower band). Their source is "pytest-benchmark": host-timed rounds, a
# series of their own, never mixed with the bench CLI's graph replays.

SOURCE = "pytest-benchmark"


def _env(data: dict, info: dict, device: str | None) -> dict:
    env = dict(info.get("env") or {})
    commit = data.get("commit_info") or {}
    name = device or env.get("device") or ""
    if not name:
        raise ValueError("the benchmark JSON does not say which GPU ran it (extra_info['env']); "
                         "pass --device NAME")
    env.setdefault("git_sha", commit.get("id") or "unknown")
    env.setdefault("git_dirty", bool(commit.get("dirty", False)))
    env["device"] = name
    env["device_slug"] = env_info.device_slug(name)
    return {k: env.get(k, "") for k in results.ENV}


def _run(data: dict, env: dict, path: Path) -> results.RunInfo:
    when = data.get("datetime") or datetime.now(timezone.utc).isoformat()
    stamp = datetime.fromisoformat(when.replace("Z", "+00:00"))
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=timezone.utc)
    stamp = stamp.astimezone(timezone.utc)
    # Deterministic id: ingesting the same file twice is detected, not duplicated.
    run_id = f"{stamp:%Y%m%dT%H%M%SZ}-pytest-{str(env['git_sha'])[:7]}"
    return results.RunInfo(run_id, stamp.strftime("%Y-%m-%dT%H:%M:%SZ"), "pytest",
                           f"ingest {path.name}", env)


def _fallback_shape(bench: dict) -> dict:
    params = bench.get("params") or {}
    shape = {k: v for k, v in params.items() if isinstance(v, (int, str)) and k != "backend"}
    return shape or {"name": re.sub(r"\s+", "_", bench.get("name", "?"))}


def bench_rows(run: results.RunInfo, bench: dict) -> list[dict]:
    """Results rows of one pytest-benchmark entry."""
    info, stats = bench.get("extra_info") or {}, bench["stats"]
    calls = max(1, int(info.get("calls_per_round", 1)))
    us = [float(stats[k]) * 1e6 / calls for k in ("median", "q1", "q3")]
    timing = Timing(us[0], us[1], us[2], int(stats.get("rounds", 0)), SOURCE)
    ceilings = Ceilings(**{k: v for k, v in (info.get("ceilings") or {}).items()
                           if k in ("copy_tbps", "bf16_tflops", "fp8_tflops")})
    params = bench.get("params") or {}
    return results.make_rows(
        run, kernel=info.get("kernel") or bench.get("group") or bench.get("name", "?"),
        provider=info.get("provider") or str(params.get("backend", "default")),
        shape=info.get("shape") or _fallback_shape(bench), dtype=info.get("dtype", "bf16"),
        timing=timing, nbytes=float(info.get("nbytes", 0)), flops=float(info.get("flops", 0)),
        ceilings=ceilings, model=info.get("model", ""), source=SOURCE)


def ingest_file(path: Path | str, root: Path | str, device: str | None = None
           ) -> tuple[Path | None, int]:
    """Append the rows of a pytest-benchmark JSON under ``root``; returns (csv path, rows).

    Returns (None, 0) when the file holds no benchmarks or was ingested before.
    """
    path = Path(path)
    data = json.loads(path.read_text())
    benches = data.get("benchmarks") or []
    if not benches:
        return None, 0
    env = _env(data, benches[0].get("extra_info") or {}, device)
    run = _run(data, env, path)
    if (Path(root) / run.device_slug / "runs" / f"{run.run_id}.json").exists():
        return None, 0
    rows = [r for b in benches for r in bench_rows(run, b)]
    csv_path, _ = results.write_run(root, run, rows, None, {"ingested_from": str(path)})
    return csv_path, len(rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.dashboard", description=__doc__.split(
        "\n")[0].strip("`"), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=None,
                   help="results root to read (default: results/ of the checkout)")
    p.add_argument("--out", type=Path, default=None,
                   help="where to render (default: <results>/dashboard)")
    p.add_argument("--check", action="store_true",
                   help="regression check only: exit 1 naming each regressed series")
    p.add_argument("--baseline", default="previous",
                   help="previous (default), first, or a git sha prefix / run id")
    p.add_argument("--threshold", type=float, default=regress.DEFAULT_THRESHOLD,
                   help="allowed fractional slowdown before the noise widening (default 0.07)")
    p.add_argument("--ingest", type=Path, action="append", default=[], metavar="FILE",
                   help="pytest-benchmark JSON to add to the results first (repeatable)")
    p.add_argument("--device", default=None,
                   help="GPU name for --ingest when the JSON does not record one")
    p.add_argument("--include-cpu", action="store_true", help="also read results/cpu/")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    root = args.results if args.results is not None else results.default_root()
    for path in args.ingest:
        try:
            csv_path, n = ingest_file(path, root, args.device)
        except (ValueError, KeyError, OSError) as err:
            print(f"cannot ingest {path}: {err}", file=sys.stderr)
            return 2
        print(f"ingested {n} rows from {path} into {csv_path}" if n
              else f"{path}: no benchmarks, or ingested before; nothing added")
    df = results.read_results(root, include_cpu=args.include_cpu)
    if args.check:
        try:
            accepted = regress.read_accepted(root)
        except ValueError as err:
            print(f"cannot check: {err}", file=sys.stderr)
            return 2
        report = regress.check(df, baseline=args.baseline, threshold=args.threshold,
                               accepted=accepted)
        print(report.summary())
        return 0 if report.passed else 1
    if df.empty:
        print(f"no results under {root}: nothing to render")
        return 0
    index = render(df, args.out if args.out is not None else Path(root) / "dashboard")
    print(f"dashboard: {index}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
