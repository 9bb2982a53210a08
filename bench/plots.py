"""Matplotlib figures of the dashboard (Agg backend: no display needed, CI renders them too).

Per device and kernel two PNGs:
- latest: the newest run of every provider across the shapes, as % of the roofline ceiling
  (ours solid, peers and references dashed) - the ours-vs-peers picture;
- trend: one small panel per shape, time (us, median with the p20-p80 band) over the runs.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after selecting the backend)
from matplotlib import ticker  # noqa: E402

OURS = {"cuda", "triton"}  # everything else is a peer library or a reference
PANELS_PER_PAGE = 24  # trend panels per PNG; more shapes spill into _p2, _p3 ...
_SAVE = {"dpi": 90, "metadata": {"Software": None}}  # no version string: stable bytes


def _style(provider: str, colors: dict[str, str]) -> dict:
    return {"linestyle": "-" if provider in OURS else "--", "marker": "o", "markersize": 4,
            "color": colors.get(provider)}


def provider_colors(providers) -> dict[str, str]:
    """A fixed color per provider within a figure, so panels missing one do not reshuffle."""
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {p: cycle[i % len(cycle)] for i, p in enumerate(sorted(set(providers)))}


def shape_labels(shapes: list[str]) -> tuple[str, dict[str, str]]:
    """(the key=value parts every shape shares, per shape the rest): panels and ticks show what
    varies, the title what does not. A lone shape is all common: its label is "-"."""
    parts = [s.split() for s in shapes]
    common = [p for p in parts[0] if all(p in ps for ps in parts[1:])] if parts else []
    labels = {s: " ".join(p for p in ps if p not in common) or "-" for s, ps in zip(shapes, parts)}
    return " ".join(common), labels


def _title(title: str, common: str, width: int = 80) -> str:
    return "\n".join([title, *textwrap.wrap(common, width)])


def _log_y(ax) -> None:
    """Log y with plain labels at 1-2-5 steps (a slow reference would otherwise flatten the
    lines that matter, and default log labels read 4x10^1)."""
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())


def latest_figure(latest, path: Path, title: str) -> Path:
    """latest: time rows of the newest run per provider (columns shape, provider, value,
    fraction). Plots % of ceiling when known, else time in us (log scale)."""
    shapes = list(dict.fromkeys(latest["shape_label"]))
    common, labels = shape_labels(shapes)
    use_fraction = latest["fraction"].notna().any()
    colors = provider_colors(latest["provider"])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(shapes) + 3), 4.2))
    for provider, rows in latest.groupby("provider", sort=True):
        # One point per shape: a shape measured twice in a run (two presets) is its median.
        rows = rows.groupby("shape_label")[["fraction", "value"]].median().reindex(shapes)
        y = rows["fraction"] * 100 if use_fraction else rows["value"]
        ax.plot(range(len(shapes)), y.astype(float), label=provider, **_style(provider, colors))
    ax.set_xticks(range(len(shapes)))
    ax.set_xticklabels([labels[s] for s in shapes], rotation=60, ha="right", fontsize=7)
    if use_fraction:
        ax.set_ylabel("% of ceiling (roofline floor / time)")
        ax.axhline(100, color="grey", linewidth=0.8)
    else:
        ax.set_ylabel("time (us)")
        _log_y(ax)
    ax.set_title(_title(title, common), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, **_SAVE)
    plt.close(fig)
    return path


def _panel(ax, rows, runs: list[str], label: str, colors: dict[str, str]) -> None:
    for provider, r in rows.groupby("provider", sort=True):
        r = r.groupby("run_id")[["value", "p20", "p80"]].median().reindex(runs)
        x = range(len(runs))
        ax.plot(x, r["value"].astype(float), label=provider, **_style(provider, colors))
        ax.fill_between(x, r["p20"].astype(float), r["p80"].astype(float), alpha=0.15,
                        color=colors.get(provider))
    values = rows["value"].astype(float)
    if len(values) and values.min() > 0 and values.max() / values.min() > 2.5:
        _log_y(ax)
    ax.set_title(label, fontsize=7)
    ax.tick_params(which="both", labelsize=6)
    ax.set_xticks(range(len(runs)))
    ax.set_xticklabels([str(i + 1) for i in range(len(runs))])
    ax.grid(alpha=0.3)


def _legend(axes) -> tuple[list, list[str]]:
    """Handles and names of every provider drawn in any panel (a panel may miss some)."""
    seen: dict = {}
    for ax in axes:
        for handle, name in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(name, handle)
    names = sorted(seen)
    return [seen[n] for n in names], names


def trend_figures(rows, folder: Path, stem: str, title: str) -> list[Path]:
    """rows: time rows of one device and kernel (all runs). One panel per (shape, dtype); x is
    the run number in time order (the HTML lists the runs), y the median us with p20-p80."""
    runs = list(dict.fromkeys(rows.sort_values(["timestamp", "run_id"])["run_id"]))
    keys = list(dict.fromkeys(zip(rows["shape_label"], rows["dtype"])))
    common, labels = shape_labels([s for s, _ in keys])
    colors = provider_colors(rows["provider"])
    paths = []
    for page in range(math.ceil(len(keys) / PANELS_PER_PAGE)):
        chunk = keys[page * PANELS_PER_PAGE:(page + 1) * PANELS_PER_PAGE]
        cols = min(4, len(chunk))
        nrows = math.ceil(len(chunk) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 2.5 * nrows + 0.6),
                                 squeeze=False)
        for ax, (shape, dtype) in zip(axes.flat, chunk):
            sel = rows[(rows["shape_label"] == shape) & (rows["dtype"] == dtype)]
            _panel(ax, sel, runs, f"{labels[shape]} {dtype}", colors)
        for ax in list(axes.flat)[len(chunk):]:
            ax.set_visible(False)
        handles, names = _legend(axes.flat[:len(chunk)])
        fig.legend(handles, names, loc="upper right", fontsize=7)
        fig.suptitle(_title(f"{title}: time (us) per run", common), fontsize=9, x=0.01,
                     ha="left")
        fig.tight_layout(rect=(0, 0, 0.92, 0.95 if common else 0.97))
        path = folder / (f"{stem}_trend.png" if page == 0 else f"{stem}_trend_p{page + 1}.png")
        fig.savefig(path, **_SAVE)
        plt.close(fig)
        paths.append(path)
    return paths
