"""`python -m autotune.ship FILE [FILE...]`: promote tuned files into shipped configs.

Each file's entries go into ``autotune/configs/<family>/<GPU>.json`` under the tunable's name
(family, tunable and GPU come from the file's metadata), merged bucket by bucket with what is
already shipped (--replace drops the old block). Incomplete entries (cut by --budget) are skipped;
the per-candidate timings are dropped (the shipped file keeps the winner, the default, the runner-up
and the tuning environment). Files tuned on the CPU are refused unless --allow-cpu (tests).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from autotune import env, shipped, store

KEEP = ("shape", "config", "time_us", "default_config", "default_us", "speedup_vs_default",
        "runner_up", "margin", "timing_method", "tuned_at", "prefetch_forced_off")


def slim(entry: dict) -> dict:
    return {k: entry[k] for k in KEEP if k in entry}


def ship(path: Path, dest_root: Path | None = None, gpu: str | None = None,
         replace: bool = False, allow_cpu: bool = False) -> tuple[Path, int]:
    """Merge one tuned file into its shipped file; returns (shipped file, entries shipped)."""
    status, data = store.read(path)
    if status != "ok":
        raise ValueError(f"{path}: not a cache or runs/ file ({status})")
    meta = data["_metadata"]
    name, family = meta.get("name"), meta.get("family")
    gpu = gpu or meta.get("gpu")
    if not name or not family:
        raise ValueError(f"{path}: metadata lacks the tunable name or family")
    if (gpu in (None, "cpu") or meta.get("compute_capability") is None) and not allow_cpu:
        raise ValueError(f"{path} was tuned on the CPU: shipped configs are GPU measurements")
    entries = {k: slim(e) for k, e in data["entries"].items() if e.get("complete", True)}
    folder = (dest_root or shipped.CONFIGS_DIR) / family
    target = folder / f"{env.gpu_slug(gpu)}.json"
    doc = json.loads(target.read_text()) if target.exists() else {}
    old = {} if replace else doc.get(name, {}).get("entries", {})
    head = {k: v for k, v in meta.items() if k not in ("mode", "created", "updated")}
    head.update(gpu=gpu, shipped_from=Path(path).name,
                shipped_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    doc[name] = {"_metadata": head, "entries": {**old, **entries}}
    doc[name]["entries"] = dict(sorted(doc[name]["entries"].items(), key=store._sort_key))
    store.atomic_write(target, dict(sorted(doc.items())))
    return target, len(entries)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m autotune.ship", description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="+", type=Path, help="cache or runs/ files")
    p.add_argument("--dest", type=Path, help="configs root (default: autotune/configs in the "
                   "package)")
    p.add_argument("--gpu", help="ship under this GPU name instead of the file's")
    p.add_argument("--replace", action="store_true", help="replace the shipped block instead of "
                   "merging into it")
    p.add_argument("--allow-cpu", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for path in args.files:
        try:
            target, n = ship(path, args.dest, args.gpu, args.replace, args.allow_cpu)
        except (OSError, ValueError) as err:
            print(f"autotune.ship: {err}", file=sys.stderr)
            return 2
        print(f"{path} -> {target} ({n} entries)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
