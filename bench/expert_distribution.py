"""``python -m bench.expert_distribution``: load imbalance of recorded MoE routing.

Reads a dump of pykernels.moe.distribution (a ``.json`` or ``.pt`` file, or a folder: its newest
dump, or with ``--all`` every dump in it summed, e.g. one per rank) and prints, per layer, the
tokens routed, max/mean (the busiest expert's load over a perfectly even one: 1.0 is balanced,
and a grouped GEMM waits for the busiest expert), the coefficient of variation (std/mean over
the experts), the idle experts and the busiest ones. ``--plot out.png`` draws the layers x
experts heatmap of load / mean.

    SGLANG_EXPERT_DISTRIBUTION_RECORD_DIR=/tmp/ed python -m serving ...   # records, dumps at exit
    python -m bench.expert_distribution /tmp/ed --plot /tmp/ed/heatmap.png
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from pykernels.moe import distribution

TOP = 3  # busiest experts listed per layer


def find_dumps(path: Path, every: bool) -> list[Path]:
    """The dump(s) path names: itself, or a folder's newest dump, or all of them."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is neither a dump file nor a folder")
    found = _by_age(path.glob(f"{distribution.PREFIX}*.json"))
    if not found:
        found = _by_age(path.glob(f"{distribution.PREFIX}*.pt"))
    if not found:
        raise FileNotFoundError(f"no {distribution.PREFIX}*.json or .pt dump in {path}")
    return found if every else found[-1:]


def _by_age(paths) -> list[Path]:
    # Modification time first: "_10" sorts before "_2" by name alone.
    return sorted(paths, key=lambda x: (x.stat().st_mtime_ns, x.name))


def merge(dumps: list[dict]) -> dict:
    """Dumps summed layer by layer (steps too); a layer's expert count must agree."""
    layers: dict[str, list[int]] = {}
    steps = 0
    for d in dumps:
        steps += int(d["meta"].get("steps", 0))
        for key, counts in d["layers"].items():
            have = layers.setdefault(key, [0] * len(counts))
            if len(have) != len(counts):
                raise ValueError(f"layer {key} has {len(have)} experts in one dump and "
                                 f"{len(counts)} in another")
            layers[key] = [a + b for a, b in zip(have, counts)]
    meta = {**dumps[0]["meta"], "steps": steps, "dumps": len(dumps)}
    for field in ("dropped", "out_of_range"):  # per-layer counts of the meta: summed too
        meta[field] = {k: sum(int(d["meta"].get(field, {}).get(k, 0)) for d in dumps)
                       for k in layers}
    return {"meta": meta, "layers": dict(sorted(layers.items(), key=lambda kv: int(kv[0])))}


def layer_stats(counts: list[int], top: int = TOP) -> dict:
    """tokens, max/mean, cv (population std / mean), idle experts and the `top` busiest as
    (expert, count, share of the layer's tokens); ratios are None for a layer with no tokens."""
    n, total = len(counts), sum(counts)
    mean = total / n if n else 0.0
    busiest = sorted(range(n), key=lambda e: (-counts[e], e))[:top]
    stats = {"experts": n, "tokens": total, "idle": sum(c == 0 for c in counts),
             "top": [(e, counts[e], counts[e] / total if total else 0.0) for e in busiest],
             "max_over_mean": None, "cv": None}
    if total:
        std = math.sqrt(sum((c - mean) ** 2 for c in counts) / n)
        stats.update(max_over_mean=max(counts) / mean, cv=std / mean)
    return stats


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def table(dump: dict, top: int = TOP) -> str:
    """The per-layer imbalance table as text (a summary line last)."""
    meta = dump["meta"]
    head = ["layer", "experts", "tokens", "max/mean", "cv", "idle", "dropped", f"top {top}"]
    rows, worst = [], []
    for key, counts in dump["layers"].items():
        s = layer_stats(counts, top)
        tops = " ".join(f"{e}:{c}({100 * share:.1f}%)" for e, c, share in s["top"])
        dropped = meta.get("dropped", {}).get(key, "")
        rows.append([key, str(s["experts"]), str(s["tokens"]), _ratio(s["max_over_mean"]),
                     _ratio(s["cv"]), str(s["idle"]), str(dropped), tops])
        if s["max_over_mean"] is not None:
            worst.append((s["max_over_mean"], key))
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = [f"expert distribution: {meta.get('device', '?')}, {meta.get('steps', '?')} steps, "
             f"{len(rows)} layers, dumped {meta.get('time', '?')}"]
    lines += ["  ".join(c.rjust(w) if i not in (0, 7) else c.ljust(w)
                        for i, (c, w) in enumerate(zip(r, widths))).rstrip()
              for r in [head, *rows]]
    if worst:
        mean_ratio = sum(w for w, _ in worst) / len(worst)
        peak, key = max(worst)
        lines.append(f"mean max/mean over layers {mean_ratio:.2f}; worst layer {key} "
                     f"at {peak:.2f}")
    bad = {k: v for k, v in meta.get("out_of_range", {}).items() if v}
    if bad:
        lines.append(f"WARNING: ids >= num_experts were routed (caller bug): {bad}")
    return "\n".join(lines)


def plot(dump: dict, out: Path) -> Path:
    """Heatmap of load / mean (1.0 = even), layers down, experts across, written to ``out``."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    keys = list(dump["layers"])
    widest = max((len(dump["layers"][k]) for k in keys), default=1)
    grid = []
    for k in keys:
        counts = dump["layers"][k]
        mean = sum(counts) / len(counts) if counts and sum(counts) else 1.0
        grid.append([c / mean for c in counts] + [math.nan] * (widest - len(counts)))
    fig, ax = plt.subplots(figsize=(min(4 + widest / 16, 24), min(2 + len(keys) / 4, 20)))
    img = ax.imshow(grid or [[math.nan]], aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(keys)), keys if len(keys) <= 64 else None)
    ax.set_title(f"tokens per expert / layer mean ({dump['meta'].get('steps', '?')} steps)")
    fig.colorbar(img, ax=ax, label="load / mean (1 = even)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.expert_distribution",
                                description="Per-layer load imbalance of an expert "
                                            "distribution dump (pykernels.moe.distribution).")
    p.add_argument("path", type=Path, help="a dump (.json/.pt) or a folder of dumps")
    p.add_argument("--all", action="store_true", help="sum every dump of the folder")
    p.add_argument("--top", type=int, default=TOP, help="busiest experts listed per layer")
    p.add_argument("--plot", type=Path, default=None, help="write a heatmap PNG here")
    args = p.parse_args(argv)
    try:
        paths = find_dumps(args.path, args.all)
        dump = merge([distribution.load(x) for x in paths])
    except (FileNotFoundError, ValueError) as err:
        p.error(str(err))
    print(f"read {', '.join(str(x) for x in paths)}")
    print(table(dump, args.top))
    if args.plot is not None:
        print(f"wrote {plot(dump, args.plot)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
