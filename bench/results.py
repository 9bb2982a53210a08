"""Benchmark results: one long-format row per (case, provider, metric), stored per device.

Layout (``root`` is ``results/`` by default, ``--out DIR`` elsewhere)::

    <root>/<device-slug>/results.csv            every run appends its rows here
    <root>/<device-slug>/runs/<run_id>.json      one file per run: env, ceilings, command, rows

The CSV has a fixed column set (``COLUMNS``) shared by every kernel family, so
``pandas.read_csv`` reads it as is. The shape is stored twice: the ``shape_label`` string
(``"tokens=4096 hidden=8192"``, the family's own field order; not ``shape``, which would hide
behind ``DataFrame.shape``) identifies a series, and the common
fields get a column each (``tokens``, ``hidden``, ``batch``, ``kv_len`` ...; empty where a family
has no such field) so a pandas user can filter with ``df[df.hidden == 8192]``.
"""

from __future__ import annotations

import csv
import json
import math
import shlex
import sys
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from bench import env_info
from bench.ceilings import Ceilings
from bench.timing import Timing

SCHEMA_VERSION = 1
IDENTITY = ["run_id", "timestamp", "family", "source", "kernel", "provider", "shape_label",
            "model", "dtype"]
SHAPE_FIELDS = ["tokens", "hidden", "intermediate", "batch", "q_len", "kv_len", "num_q_heads",
                "num_kv_heads", "head_dim", "page_size", "m", "n", "k", "num_experts", "topk"]
METRIC = ["metric", "unit", "value", "p20", "p80", "fraction", "ceiling", "ceiling_value",
          "method", "samples"]
ENV = ["device", "device_slug", "compute_capability", "driver", "cuda", "torch", "triton",
       "flashinfer", "pykernels", "git_sha", "git_dirty"]
COLUMNS = IDENTITY + SHAPE_FIELDS + METRIC + ENV
# One series = one line on the dashboard and one regression check. The source keeps the CLI's
# graph-replay timings apart from pytest-benchmark's host-timed ones; the model is a label only.
SERIES_KEY = ["device_slug", "source", "kernel", "provider", "shape_label", "dtype", "metric"]
CSV_NAME = "results.csv"
# Columns pandas should keep as text (a git sha of digits only would otherwise become a number).
TEXT_COLUMNS = {c: str for c in ["run_id", "git_sha", "compute_capability", "driver", "cuda"]}

_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
                torch.float8_e4m3fn: "fp8_e4m3", torch.float8_e5m2: "fp8_e5m2"}


def dtype_name(dtype: torch.dtype) -> str:
    """Short dtype name used in rows and on the command line ("bf16", "fp16", ...)."""
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """torch dtype from a dtype or its short name ("bf16") or torch name ("bfloat16")."""
    if isinstance(dtype, torch.dtype):
        return dtype
    by_name = {v: k for k, v in _DTYPE_NAMES.items()}
    found = by_name.get(dtype, getattr(torch, dtype, None))
    if not isinstance(found, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(by_name)}")
    return found


def default_root() -> Path:
    """``results/`` of the checkout bench/ lives in; ``./results`` for an installed copy."""
    root = env_info.REPO_ROOT
    return root / "results" if (root / "pyproject.toml").exists() else Path("results").resolve()


def shape_string(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


@dataclass(frozen=True)
class RunInfo:
    """One invocation of a bench command: its id, time, command and environment."""

    run_id: str
    timestamp: str
    family: str
    command: str
    env: dict

    @property
    def device_slug(self) -> str:
        return self.env["device_slug"]


def new_run(family: str, device: str = "cuda", argv: list[str] | None = None,
            env: dict | None = None) -> RunInfo:
    """Start a run: collects the environment once and names the run
    ``<UTC time>-<family>-<sha7>`` (sortable, unique per family and second)."""
    env = env if env is not None else env_info.collect(device)
    now = datetime.now(timezone.utc)
    run_id = f"{now:%Y%m%dT%H%M%SZ}-{family}-{env['git_sha'][:7]}"
    argv = sys.argv if argv is None else argv
    return RunInfo(run_id, now.strftime("%Y-%m-%dT%H:%M:%SZ"), family, shlex.join(argv), env)


def _num(x: float | None) -> float | str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return ""
    return float(f"{x:.6g}")


def _metric_rows(t: Timing, nbytes: float, flops: float, dtype: torch.dtype,
                 ceil: Ceilings | None) -> list[dict]:
    ceil = ceil or Ceilings()
    floor = ceil.floor_us(nbytes, flops, dtype)
    rows = [dict(metric="time", unit="us", value=t.median_us, p20=t.p20_us, p80=t.p80_us,
                 fraction=floor / t.median_us if floor else None, ceiling="roofline",
                 ceiling_value=floor)]
    # Rates invert time, so the rate's p20 comes from the time's p80.
    if nbytes:
        rate = [nbytes / (us * 1e-6) / 1e12 for us in (t.median_us, t.p80_us, t.p20_us)]
        bw = ceil.copy_tbps
        rows.append(dict(metric="bandwidth", unit="TB/s", value=rate[0], p20=rate[1],
                         p80=rate[2], fraction=rate[0] / bw if bw else None, ceiling="copy",
                         ceiling_value=bw))
    if flops:
        rate = [flops / (us * 1e-6) / 1e12 for us in (t.median_us, t.p80_us, t.p20_us)]
        name, peak = ceil.compute_tflops(dtype)
        rows.append(dict(metric="compute", unit="TFLOP/s", value=rate[0], p20=rate[1],
                         p80=rate[2], fraction=rate[0] / peak if peak else None, ceiling=name,
                         ceiling_value=peak))
    return rows


def make_rows(run: RunInfo, *, kernel: str, provider: str, shape: dict,
              dtype: torch.dtype | str, timing: Timing, nbytes: float = 0, flops: float = 0,
              ceilings: Ceilings | None = None, model: str = "", source: str = "bench"
              ) -> list[dict]:
    """Results rows of one measurement: ``time`` (us) always, ``bandwidth`` (TB/s) when nbytes
    (bytes read + written per call) is given, ``compute`` (TFLOP/s) when flops is given.

    Each row carries its fraction of the relevant ceiling: the roofline floor over the time, the
    rate over the copy bandwidth, or the rate over the dtype's GEMM ceiling.
    """
    dtype = as_dtype(dtype)
    unknown = [k for k in shape if not isinstance(shape[k], (int, str))]
    if unknown:
        raise TypeError(f"shape fields must be int or str, got {unknown} in {shape}")
    base = {"run_id": run.run_id, "timestamp": run.timestamp, "family": run.family,
            "source": source, "kernel": kernel, "provider": provider,
            "shape_label": shape_string(shape), "model": model, "dtype": dtype_name(dtype),
            **{f: shape.get(f, "") for f in SHAPE_FIELDS},
            "method": timing.method, "samples": timing.samples, **run.env}
    rows = []
    for m in _metric_rows(timing, nbytes, flops, dtype, ceilings):
        m = {k: (_num(v) if k in ("value", "p20", "p80", "fraction", "ceiling_value") else v)
             for k, v in m.items()}
        rows.append({c: base.get(c, m.get(c, "")) for c in COLUMNS})
    return rows


def _append_csv(path: Path, rows: list[dict]) -> None:
    header = COLUMNS
    existing: list[dict] = []
    if path.exists():
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            old = reader.fieldnames or []
            if old != COLUMNS:  # schema changed: rewrite once with the union of the columns
                existing = list(reader)
                header = COLUMNS + [c for c in old if c not in COLUMNS]
    if existing or not path.exists():
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(existing)
            writer.writerows(rows)
        return
    with path.open("a", newline="") as f:
        csv.DictWriter(f, fieldnames=header, extrasaction="ignore").writerows(rows)


def write_run(root: Path | str, run: RunInfo, rows: list[dict],
              ceilings: Ceilings | None = None, extra: dict | None = None) -> tuple[Path, Path]:
    """Append rows to ``<root>/<slug>/results.csv`` and write ``runs/<run_id>.json``.

    Returns (csv path, json path). A run with no rows writes nothing and returns the paths it
    would have used.
    """
    folder = Path(root) / run.device_slug
    csv_path, json_path = folder / CSV_NAME, folder / "runs" / f"{run.run_id}.json"
    if not rows:
        return csv_path, json_path
    json_path.parent.mkdir(parents=True, exist_ok=True)
    _append_csv(csv_path, rows)
    record = {"schema": SCHEMA_VERSION, **asdict(run),
              "ceilings": ceilings.as_dict() if ceilings else None, **(extra or {}),
              "rows": rows}
    json_path.write_text(json.dumps(record, indent=1, default=str) + "\n")
    return csv_path, json_path


def read_results(root: Path | str, include_cpu: bool = False):
    """Every ``<root>/*/results.csv`` concatenated into one DataFrame (empty when none).

    CPU smoke folders (``cpu/``) are left out unless include_cpu.
    """
    import pandas as pd

    frames = []
    for path in sorted(Path(root).glob(f"*/{CSV_NAME}")):
        if path.parent.name == env_info.CPU_SLUG and not include_cpu:
            continue
        frames.append(pd.read_csv(path, dtype=TEXT_COLUMNS, keep_default_na=True))
    if not frames:
        return pd.DataFrame(columns=COLUMNS)
    return pd.concat(frames, ignore_index=True)
