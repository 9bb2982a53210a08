"""`python -m autotune.show [name]`: cache, runs/ and shipped entries with their metadata.

For each file: where it is, the environment it was tuned in (GPU, compute capability, torch,
triton, CUDA, package, kernel-source hash) and whether that is this process's environment; then
one row per bucket with the config (prefetch included for GEMM-like kernels), its time, the
default's time and the speedup.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from autotune import env, shipped, store
from autotune.families import load_all
from autotune.tunable import registry


def _current_meta(name: str) -> dict | None:
    tunable = registry().get(name)
    return tunable.metadata() if tunable is not None else None


def _env_line(meta: dict) -> str:
    fields = ("gpu", "compute_capability", "torch", "triton", "cuda", "package_version",
              "source_hash")
    return "  ".join(f"{k}={meta.get(k)}" for k in fields)


def _status(meta: dict, name: str) -> str:
    current = _current_meta(name)
    if current is None:
        return "kernel not importable here"
    diff = env.mismatches(meta, current)
    return "this environment" if not diff else "other environment: " + env.describe(diff)


def _rows(entries: dict) -> list[list[str]]:
    rows = []
    for key, e in entries.items():
        config = e.get("config") or {}
        speed = e.get("speedup_vs_default")
        rows.append([key, " ".join(f"{k}={v}" for k, v in config.items()),
                     f"{e.get('time_us', 0):.2f}" if e.get("time_us") else "-",
                     f"{e['default_us']:.2f}" if e.get("default_us") else "-",
                     f"{speed:.2f}x" if speed else "-",
                     "" if e.get("complete", True) else "incomplete"])
    return rows


def _print_block(console, title: str, meta: dict, entries: dict, status: str | None) -> None:
    from rich.table import Table

    console.print(f"[bold]{title}[/bold]")
    console.print(f"  {_env_line(meta)}")
    if status:
        console.print(f"  {status}; updated {meta.get('updated', '?')}")
    table = Table(show_edge=False, pad_edge=False)
    for col in ("bucket", "config", "µs", "default µs", "speedup", ""):
        table.add_column(col, justify="right" if "µs" in col or col == "speedup" else "left")
    for row in _rows(entries):
        table.add_row(*row)
    console.print(table)
    console.print()


def _files(folder: Path, name: str | None) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.json")
                  if not p.name.startswith(".") and (name is None or p.name.startswith(name + ".")))


def collect(name: str | None = None, runs: bool = False) -> list[dict]:
    """Every block to show: {"kind", "path", "name", "metadata", "entries", "status"}."""
    out = []
    folders = [("cache", store.root())] + ([("runs", store.runs_root())] if runs else [])
    for kind, folder in folders:
        for path in _files(folder, name):
            status, data = store.read(path)
            if status != "ok":
                if path.name.startswith("flashinfer"):
                    out.append({"kind": kind, "path": str(path), "name": "flashinfer",
                                "metadata": {}, "entries": {}, "status": "FlashInfer's format"})
                    continue
                out.append({"kind": kind, "path": str(path), "name": path.stem, "metadata": {},
                            "entries": {}, "status": "empty or corrupt"})
                continue
            meta = data["_metadata"]
            tname = meta.get("name", path.stem)
            out.append({"kind": kind, "path": str(path), "name": tname, "metadata": meta,
                        "entries": data["entries"], "status": _status(meta, tname)})
    for family_dir in sorted(p for p in shipped.CONFIGS_DIR.glob("*") if p.is_dir()):
        for gpu, _cc, blocks in shipped.load_family(family_dir.name):
            for tname, block in blocks.items():
                if name in (None, tname) and isinstance(block, dict):
                    out.append({"kind": "shipped", "path": str(shipped.file_for(
                        family_dir.name, gpu)), "name": tname,
                        "metadata": block.get("_metadata", {}),
                        "entries": block.get("entries", {}), "status": None})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m autotune.show", description=__doc__.split("\n")[0])
    p.add_argument("name", nargs="?", help="one tunable (e.g. rms_norm); default: all")
    p.add_argument("--runs", action="store_true", help="include runs/ files")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = p.parse_args(argv)
    load_all()
    blocks = collect(args.name, args.runs)
    if args.json:
        json.dump(blocks, sys.stdout, indent=1)
        print()
        return 0
    from rich.console import Console

    console = Console(width=max(Console().width, 140))
    console.print(f"autotune cache: {store.root()}")
    if not blocks:
        console.print("no cache, runs/ or shipped entries" + (f" for {args.name}" if args.name
                                                              else ""))
    for b in blocks:
        title = f"{b['kind']}: {b['name']}  {b['path']}"
        _print_block(console, title, b["metadata"], b["entries"], b["status"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
