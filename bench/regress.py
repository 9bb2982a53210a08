"""The perf-regression check behind ``python -m bench.dashboard --check``.

A series is one ``SERIES_KEY`` of bench/results.py (device, source, kernel, provider, shape, dtype,
metric), so an H100 series is never compared with an H200 one. For each series the newest run is
compared with its baseline run (the previous one by default, the first one, or the run at a git
sha / run id). Only primary metrics are checked: ``time`` (lower is better) and ``throughput``
(higher is better); TB/s and TFLOP/s are derived from the time and would only repeat it.

A series regresses when all of these hold:

- its median got worse by more than the threshold: 7% by default, widened to the series' own
  p20-p80 spread (relative to its median) in either run when that is larger, so a noisy series
  needs a larger move before it fails CI;
- the two runs' p20-p80 bands do not overlap (the new run's fast end is slower than the baseline's
  slow end), so one run whose samples split between two speeds is not a regression by itself;
- for times, it moved by at least MIN_ABS_US: on two H200 machines of the same session the same
  SASS of rms_norm (1 row) took 2.33 and 2.62 us, while every kernel above ~5 us repeated within
  2% (results/nvidia-h200, 2026-11-21).

Runs timed differently (CUDA-graph replay vs per-call events: the harness picks by a duration
estimate, so a kernel near 100 us can flip) are not compared; they are counted and reported.

A regression explained and accepted by hand is listed in ``<results>/accepted_regressions.json``
(``[{"series": ..., "new_run": ..., "reason": ...}]``, the series as the check prints it): it is
reported with its reason and does not fail the check. An entry names one run, so the same series
regressing again in a later run fails again.
The torch reference's fused_add_rms_norm took 23 us replayed and 132 us eagerly on the same H200.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from bench.results import SERIES_KEY

DEFAULT_THRESHOLD = 0.07
ACCEPTED_NAME = "accepted_regressions.json"
MIN_ABS_US = 0.5  # below this a time change is machine-to-machine jitter (see the docstring)
LOWER_IS_BETTER = {"time": True, "throughput": False}


@dataclass(frozen=True)
class Verdict:
    """One series' newest run against its baseline."""

    series: str
    unit: str
    base: float
    new: float
    base_run: str
    new_run: str
    change: float  # fractional loss: +0.12 = 12% worse, negative = better
    threshold: float
    bands_apart: bool = True  # the new run's p20-p80 band lies wholly on the worse side
    large_enough: bool = True  # the move is above the absolute floor (times)
    accepted: str = ""  # the reason, when accepted_regressions.json lists this series and run

    @property
    def worse(self) -> bool:
        return self.change > self.threshold and self.bands_apart and self.large_enough

    @property
    def regressed(self) -> bool:
        return self.worse and not self.accepted

    def line(self) -> str:
        return (f"{self.series}: {self.base:.4g} -> {self.new:.4g} {self.unit} "
                f"({self.change:+.1%} worse, threshold {self.threshold:.1%}; "
                f"{self.base_run} -> {self.new_run})")


@dataclass
class CheckReport:
    verdicts: list[Verdict] = field(default_factory=list)
    single_run: int = 0  # series with nothing to compare yet
    no_baseline: int = 0  # series without a run matching --baseline
    method_changed: int = 0  # series whose two runs were timed differently (not compared)
    devices: list[str] = field(default_factory=list)
    baseline: str = "previous"

    @property
    def regressions(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.regressed]

    @property
    def accepted(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.worse and v.accepted]

    @property
    def passed(self) -> bool:
        return not self.regressions

    def summary(self) -> str:
        if not self.devices:
            return "check passed: no results to check"
        head = (f"devices: {', '.join(self.devices)}; {len(self.verdicts)} series compared with "
                f"the {self.baseline} run, {self.single_run} with a single run"
                + (f", {self.no_baseline} without a {self.baseline!r} run" if self.no_baseline
                   else "")
                + (f", {self.method_changed} timed differently (not compared)"
                   if self.method_changed else ""))
        if not self.verdicts:
            return f"check passed: nothing to compare yet ({head})"
        accepted = [f"  ACCEPTED {v.line()}: {v.accepted}" for v in self.accepted]
        if self.passed:
            better = sum(v.change < 0 for v in self.verdicts)
            extra = f", {len(accepted)} accepted" if accepted else ""
            return "\n".join([f"check passed: no regression ({head}; {better} got faster{extra})",
                              *accepted])
        lines = [f"check FAILED: {len(self.regressions)} regressed series ({head})"]
        return "\n".join(lines + ["  REGRESSED " + v.line() for v in self.regressions] + accepted)


def read_accepted(root) -> dict[tuple[str, str], str]:
    """{(series, new_run): reason} from <root>/accepted_regressions.json ({} when absent); a
    malformed file raises ValueError naming it."""
    path = Path(root) / ACCEPTED_NAME
    if not path.exists():
        return {}
    try:
        entries = json.loads(path.read_text())
        return {(e["series"], e["new_run"]): str(e["reason"]) for e in entries}
    except (json.JSONDecodeError, TypeError, KeyError) as err:
        raise ValueError(f"{path}: expected a list of {{series, new_run, reason}}: {err}") from err


def series_name(key: tuple) -> str:
    return " | ".join(str(k) for k in key)


def _spread(row) -> float:
    """(p80 - p20) / median of one run, 0 when unknown."""
    try:
        s = (float(row["p80"]) - float(row["p20"])) / float(row["value"])
    except (TypeError, ValueError, ZeroDivisionError):
        return 0.0
    return abs(s) if math.isfinite(s) else 0.0


def per_run(df):
    """One row per (series, run): the median of duplicates within a run, runs in time order."""
    cols = SERIES_KEY + ["run_id"]
    agg = {"value": "median", "p20": "median", "p80": "median", "timestamp": "max",
           "git_sha": "first", "unit": "first", "method": "first"}
    if "method" not in df.columns:
        agg.pop("method")
    out = df.groupby(cols, dropna=False, sort=False).agg(agg).reset_index()
    return out.sort_values(["timestamp", "run_id"], kind="stable")


def pick_baseline(runs, spec: str):
    """The baseline row among runs (time-ordered, newest last), or None."""
    older = runs.iloc[:-1]
    if older.empty:
        return None
    if spec == "previous":
        return older.iloc[-1]
    if spec == "first":
        return older.iloc[0]
    match = older[(older["run_id"] == spec) | older["git_sha"].astype(str).str.startswith(spec)]
    return match.iloc[-1] if len(match) else None


def _band(row) -> tuple[float, float]:
    """(low, high) of a run's p20-p80 band; the median alone when the quantiles are missing."""
    try:
        lo, hi = sorted((float(row["p20"]), float(row["p80"])))
    except (TypeError, ValueError):
        return float(row["value"]), float(row["value"])
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return float(row["value"]), float(row["value"])
    return lo, hi


def compare(key: tuple, base, new, threshold: float) -> Verdict:
    lower = LOWER_IS_BETTER[key[SERIES_KEY.index("metric")]]
    b, n = float(base["value"]), float(new["value"])
    change = (n / b - 1.0) if lower else (b / n - 1.0)
    thr = max(threshold, _spread(base), _spread(new))
    (b_lo, b_hi), (n_lo, n_hi) = _band(base), _band(new)
    apart = n_lo > b_hi if lower else n_hi < b_lo
    unit = str(new["unit"])
    large = not (lower and unit == "us" and abs(n - b) < MIN_ABS_US)
    return Verdict(series_name(key), unit, b, n, str(base["run_id"]), str(new["run_id"]),
                   change, thr, apart, large)


def check(df, baseline: str = "previous", threshold: float = DEFAULT_THRESHOLD,
          accepted: dict[tuple[str, str], str] | None = None) -> CheckReport:
    """Compare the newest run of every primary-metric series with its baseline.

    Parameters
    ----------
    df : DataFrame of results rows (bench.results.read_results).
    baseline : "previous" (default), "first", or a run id / git sha prefix.
    threshold : fractional loss allowed before a series counts as regressed (0.07 = 7%).
    accepted : {(series, new_run): reason} (read_accepted): regressions explained by hand.
    """
    report = CheckReport(baseline=baseline)
    if df is None or df.empty:
        return report
    df = df[df["metric"].isin(list(LOWER_IS_BETTER))]
    df = df[df["value"].astype(float) > 0]
    report.devices = sorted(df["device_slug"].astype(str).unique())
    for key, runs in per_run(df).groupby(SERIES_KEY, dropna=False, sort=True):
        if len(runs) < 2:
            report.single_run += 1
            continue
        base = pick_baseline(runs, baseline)
        if base is None:
            report.no_baseline += 1
            continue
        new = runs.iloc[-1]
        if str(base.get("method", "")) != str(new.get("method", "")):
            report.method_changed += 1
            continue
        verdict = compare(key, base, new, threshold)
        reason = (accepted or {}).get((verdict.series, verdict.new_run), "")
        report.verdicts.append(dataclasses.replace(verdict, accepted=reason) if reason
                               else verdict)
    return report
