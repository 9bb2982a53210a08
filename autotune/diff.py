"""`python -m autotune.diff A.json B.json`: compare two tunes bucket by bucket (stability).

A and B are cache files, runs/ files or shipped files (several tunables). For each bucket present in
both: the same winner or not, the winners' times (delta = B/A - 1), and the cross cost: how much
slower A's winner is than B's in B's own measurements (and the other way round), read from the
timings each entry keeps. Two tunes agree on a bucket when the winner is the same or the cross cost
is within --tol (default 3%) both ways. Summary: share of buckets with the same winner, share that
agree, median and max |delta|.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from autotune.space import canonical


def load_blocks(path: Path) -> dict[str, dict]:
    """{tunable name: entries} of a cache/runs file or a shipped file."""
    data = json.loads(Path(path).read_text())
    if isinstance(data.get("entries"), dict):
        name = data.get("_metadata", {}).get("name", Path(path).stem.split(".")[0])
        return {name: data["entries"]}
    return {k: v["entries"] for k, v in data.items()
            if isinstance(v, dict) and isinstance(v.get("entries"), dict)}


def _time_of(entry: dict, config: dict) -> float | None:
    want = canonical(config)
    for cfg, us in entry.get("timings", []):
        if canonical(cfg) == want:
            return us
    return None


def _cross(entry_b: dict, winner_a: dict) -> float | None:
    """How much slower A's winner is than B's best, measured in B (None: not measured in B)."""
    t = _time_of(entry_b, winner_a)
    return None if t is None or not entry_b.get("time_us") else t / entry_b["time_us"] - 1


def compare_entries(a: dict, b: dict, tol: float) -> dict:
    same = canonical(a["config"]) == canonical(b["config"])
    ab, ba = _cross(b, a["config"]), _cross(a, b["config"])
    crosses = [c for c in (ab, ba) if c is not None]
    agree = same or (len(crosses) == 2 and max(crosses) <= tol)
    delta = b["time_us"] / a["time_us"] - 1 if a.get("time_us") and b.get("time_us") else None
    return {"same_winner": same, "agree": agree, "delta": delta, "cross_a_in_b": ab,
            "cross_b_in_a": ba, "winner_a": a["config"], "winner_b": b["config"],
            "time_a_us": a.get("time_us"), "time_b_us": b.get("time_us")}


def compare(path_a: Path, path_b: Path, tol: float = 0.03) -> dict:
    blocks_a, blocks_b = load_blocks(path_a), load_blocks(path_b)
    rows, only_a, only_b = [], [], []
    for name in sorted(set(blocks_a) | set(blocks_b)):
        ea, eb = blocks_a.get(name, {}), blocks_b.get(name, {})
        only_a += [f"{name} {k}" for k in ea if k not in eb]
        only_b += [f"{name} {k}" for k in eb if k not in ea]
        for key in (k for k in ea if k in eb):
            rows.append({"name": name, "key": key, **compare_entries(ea[key], eb[key], tol)})
    deltas = [abs(r["delta"]) for r in rows if r["delta"] is not None]
    n = len(rows)
    return {
        "a": str(path_a), "b": str(path_b), "tol": tol, "buckets": n,
        "same_winner_share": sum(r["same_winner"] for r in rows) / n if n else None,
        "agree_share": sum(r["agree"] for r in rows) / n if n else None,
        "median_abs_delta": statistics.median(deltas) if deltas else None,
        "max_abs_delta": max(deltas) if deltas else None,
        "rows": rows, "only_in_a": only_a, "only_in_b": only_b,
    }


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:+.1f}%"


def _cfg(c: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in c.items())


def print_report(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 150))
    table = Table(title=f"autotune.diff  A={result['a']}  B={result['b']}")
    for col in ("tunable", "bucket", "same", "winner A", "winner B", "A µs", "B µs", "delta",
                "A's winner in B", "B's winner in A"):
        table.add_column(col, justify="right" if "µs" in col or col == "delta" else "left")
    for r in result["rows"]:
        table.add_row(r["name"], r["key"], "yes" if r["same_winner"] else
                      ("~" if r["agree"] else "no"), _cfg(r["winner_a"]), _cfg(r["winner_b"]),
                      f"{r['time_a_us']:.2f}", f"{r['time_b_us']:.2f}", _pct(r["delta"]),
                      _pct(r["cross_a_in_b"]), _pct(r["cross_b_in_a"]))
    console.print(table)
    n = result["buckets"]
    if not n:
        console.print("no bucket in common")
    else:
        console.print(
            f"{n} buckets: same winner {100 * result['same_winner_share']:.0f}%, agree (same or "
            f"within {100 * result['tol']:.0f}% both ways) {100 * result['agree_share']:.0f}%, "
            f"|delta| median {100 * result['median_abs_delta']:.1f}% "
            f"max {100 * result['max_abs_delta']:.1f}%")
    for side in ("only_in_a", "only_in_b"):
        if result[side]:
            console.print(f"{side.replace('_', ' ')}: {len(result[side])} buckets")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m autotune.diff", description=__doc__.split("\n")[0])
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--tol", type=float, default=0.03, help="agreement tolerance (default 0.03)")
    p.add_argument("--json", type=Path, help="also write the comparison as JSON here")
    args = p.parse_args(argv)
    for path in (args.a, args.b):
        if not path.is_file():
            print(f"autotune.diff: no such file {path}", file=sys.stderr)
            return 2
    result = compare(args.a, args.b, args.tol)
    print_report(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
