"""Printing a bench run: skip notes, then the rich table (always the last thing printed)."""

from __future__ import annotations

import functools
import math

from bench.ceilings import Ceilings


class _PlainConsole:
    """Stand-in when rich is not installed (the bench extra): prints text, drops markup."""

    def print(self, *objects, **kwargs) -> None:
        print(*objects)


@functools.lru_cache(maxsize=1)
def console():
    """A rich Console; 160 columns when stdout is not a terminal so tables are not squeezed."""
    try:
        from rich.console import Console
    except ImportError:
        return _PlainConsole()
    con = Console()
    return con if con.is_terminal else Console(width=160)


def print_skipped(skipped: list[tuple[str, str]]) -> None:
    for name, reason in skipped:
        console().print(f"skipped {name}: {reason}", markup=False, highlight=False)


def _fmt(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return ""
    return f"{x:,.{digits}f}"


def _metric(rows: list[dict], metric: str, key: str = "value"):
    for r in rows:
        if r["metric"] == metric and r[key] != "":
            return r[key]
    return None


def ceilings_line(env: dict, ceil: Ceilings) -> str:
    parts = []
    if ceil.copy_tbps:
        parts.append(f"copy {ceil.copy_tbps:.2f} TB/s")
    if ceil.bf16_tflops:
        parts.append(f"bf16 GEMM {ceil.bf16_tflops:.0f} TFLOP/s")
    if ceil.fp8_tflops:
        parts.append(f"fp8 GEMM {ceil.fp8_tflops:.0f} TFLOP/s")
    measured = ", ".join(parts) or "no ceilings measured"
    return f"{env.get('device', '?')} ({measured})"


def _baselines(outcomes) -> dict:
    """Per case, the time of the first provider (in run order) that has one."""
    base: dict = {}
    for o in outcomes:
        if o.timing is not None:
            base.setdefault(id(o.case), (o.provider.name, o.timing.median_us))
    return base


def common_fields(cases) -> dict:
    """Shape fields equal in every case (heads, page size ...): the table's title shows them
    once and its rows show only what varies. Empty for fewer than two cases."""
    cases = list({id(c): c for c in cases}.values())
    if len(cases) < 2:
        return {}
    first = cases[0].shape
    return {k: v for k, v in first.items() if all(c.shape.get(k) == v for c in cases[1:])}


def table_rows(outcomes, compare: bool) -> list[list[str]]:
    """The table as text cells: one line per (case, provider)."""
    base = _baselines(outcomes)
    common = common_fields(o.case for o in outcomes)
    lines = []
    for o in outcomes:
        label = " ".join(f"{k}={v}" for k, v in o.case.shape.items() if k not in common)
        cells = [o.case.kernel, label, o.provider.name]
        if o.timing is None:
            lines.append(cells + ["", "", "", "", "", ""] + ([""] if compare else [])
                         + [f"{o.status}: {o.note}"])
            continue
        t = o.timing
        frac = _metric(o.rows, "time", "fraction")
        cells += [_fmt(t.median_us), f"{_fmt(t.p20_us)}-{_fmt(t.p80_us)}",
                  _fmt(_metric(o.rows, "bandwidth"), 3), _fmt(_metric(o.rows, "compute"), 1),
                  "" if frac is None else f"{100 * frac:.1f}%", t.method]
        if compare:
            ref = base.get(id(o.case))
            cells.append(f"{ref[1] / t.median_us:.2f}x" if ref else "")
        lines.append(cells + [o.note])
    return lines


def print_table(family: str, outcomes, env: dict, ceil: Ceilings,
                skipped: list[tuple[str, str]], compare: bool = False) -> None:
    """The run's table: µs (median, p20-p80), TB/s, TFLOP/s, % of the roofline, and with
    compare the speed of each provider relative to the first one timed on the case."""
    first = next((o.provider.name for o in outcomes if o.timing is not None), "first")
    headers = ["kernel", "shape", "provider", "us", "p20-p80 us", "TB/s", "TFLOP/s",
               "% ceiling", "timing"] + ([f"vs {first}"] if compare else []) + ["note"]
    common = common_fields(o.case for o in outcomes)
    title = f"bench.{family} on {ceilings_line(env, ceil)}"
    if common:
        title += "; every shape: " + " ".join(f"{k}={v}" for k, v in common.items())
    counts = {k: sum(o.status == k for o in outcomes) for k in ("ok", "failed", "skipped")}
    # Last words of the output (a log's tail line): what ran, what failed, what was skipped.
    caption = "; ".join([*(f"skipped {n}: {r}" for n, r in skipped),
                         f"{counts['ok']} measured, {counts['failed']} failed, "
                         f"{counts['skipped'] + len(skipped)} skipped"])
    lines = table_rows(outcomes, compare)
    if not lines:
        console().print(f"{title}: nothing was measured ({caption})", markup=False)
        return
    try:
        from rich.table import Table
        from rich.text import Text
    except ImportError:
        _print_plain(title, headers, lines, caption)
        return
    table = Table(title=title, caption=caption, title_justify="left", caption_justify="left")
    for h in headers:
        numeric = h not in ("kernel", "shape", "provider", "timing", "note")
        table.add_column(h, justify="right" if numeric else "left", overflow="fold")
    previous = None
    for line in lines:
        if previous is not None and line[:2] != previous:
            table.add_section()
        table.add_row(*(Text(c) for c in line))  # Text: no markup parsing of notes
        previous = line[:2]
    console().print(table)


def _print_plain(title, headers, lines, caption) -> None:
    widths = [max(len(h), *(len(r[i]) for r in lines)) for i, h in enumerate(headers)]
    print(title)
    for r in [headers, *lines]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    if caption:
        print(caption)
