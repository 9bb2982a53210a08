"""Results rows: schema, fractions of the ceilings, CSV/JSON round trip through pandas."""

from __future__ import annotations

import csv
import json

import pandas as pd
import pytest
import torch

from bench import env_info, results
from bench.ceilings import Ceilings
from bench.timing import Timing
from tests.bench.bench_fakes import CEIL, H100, H200, grid, write_fake_run


def test_device_slug():
    assert env_info.device_slug("NVIDIA H200") == "nvidia-h200"
    assert env_info.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert env_info.device_slug("  ") == "unknown"


def test_dtype_names_round_trip():
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn):
        assert results.as_dtype(results.dtype_name(dtype)) is dtype
    assert results.as_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        results.as_dtype("bf17")


def _run() -> results.RunInfo:
    return results.new_run("norm", "cpu", argv=["python", "-m", "bench.norm"],
                           env={**env_info.collect("cpu"), "git_sha": "abc1234def"})


def test_metric_rows_and_fractions():
    # 4.27 MB read + written in 1 us is exactly the 4.27 TB/s copy ceiling: fraction 1.
    rows = results.make_rows(_run(), kernel="rms_norm", provider="cuda",
                             shape={"tokens": 1, "hidden": 8}, dtype=torch.bfloat16,
                             timing=Timing(1.0, 0.9, 1.25, 50, "graph"), nbytes=4.27e6,
                             flops=694e6, ceilings=CEIL)
    by = {r["metric"]: r for r in rows}
    assert set(by) == {"time", "bandwidth", "compute"}
    assert list(rows[0]) == results.COLUMNS
    assert by["time"]["unit"] == "us" and by["time"]["fraction"] == pytest.approx(1.0)
    assert by["bandwidth"]["value"] == pytest.approx(4.27)
    assert by["bandwidth"]["fraction"] == pytest.approx(1.0)
    # A rate's p20 comes from the time's p80: slower calls, lower rate.
    assert by["bandwidth"]["p20"] == pytest.approx(4.27 / 1.25)
    assert by["compute"]["ceiling"] == "bf16_gemm"
    assert by["compute"]["fraction"] == pytest.approx(1.0)
    assert by["time"]["tokens"] == 1 and by["time"]["batch"] == ""


def test_no_ceiling_means_no_fraction():
    rows = results.make_rows(_run(), kernel="k", provider="torch", shape={"tokens": 3},
                             dtype="fp32", timing=Timing(5.0, 4.0, 6.0, 5, "cpu"), nbytes=100,
                             ceilings=Ceilings())
    assert all(r["fraction"] == "" for r in rows)


def test_bad_shape_value_is_rejected():
    with pytest.raises(TypeError, match="shape fields"):
        results.make_rows(_run(), kernel="k", provider="p", shape={"tokens": 1.5}, dtype="bf16",
                          timing=Timing(1, 1, 1, 1, "cpu"))


def test_round_trip_through_pandas(root):
    write_fake_run(root, 1, grid())
    run = write_fake_run(root, 2, grid())
    write_fake_run(root, 2, grid(scale=1.3), device=H100)
    path = root / "nvidia-h200" / "results.csv"
    df = pd.read_csv(path)  # no arguments, no post-processing
    assert list(df.columns) == results.COLUMNS
    assert len(df) == 2 * 2 * len(grid())  # two runs, time + bandwidth per case
    sel = df[(df.hidden == 4096) & (df.tokens == 4096) & (df.provider == "cuda")
             & (df.kernel == "rms_norm") & (df.metric == "time")]
    assert sorted(sel.value) == pytest.approx([50.0, 50.0])
    assert set(df.shape_label.unique()) == {"tokens=1 hidden=4096", "tokens=4096 hidden=4096"}
    assert df.p20.le(df.value).all() and df.value.le(df.p80).all()
    record = json.loads((root / "nvidia-h200" / "runs" / f"{run.run_id}.json").read_text())
    assert record["run_id"] == run.run_id and record["ceilings"]["copy_tbps"] == 4.27
    assert len(record["rows"]) == 2 * len(grid())
    both = results.read_results(root)
    assert set(both.device_slug) == {"nvidia-h200", "nvidia-h100-80gb-hbm3"}
    assert both.git_sha.map(type).eq(str).all()


def test_header_written_once_and_schema_change_rewrites(root):
    folder = root / "nvidia-h200"
    folder.mkdir(parents=True)
    old_cols = [c for c in results.COLUMNS if c != "model"] + ["legacy"]
    with (folder / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=old_cols)
        writer.writeheader()
        writer.writerow({c: "x" for c in old_cols} | {"value": 1.0, "device_slug": "nvidia-h200"})
    write_fake_run(root, 3, grid(), device=H200)
    write_fake_run(root, 4, grid(), device=H200)
    text = (folder / "results.csv").read_text().splitlines()
    assert sum(line.startswith("run_id,") for line in text) == 1
    df = pd.read_csv(folder / "results.csv")
    assert list(df.columns) == results.COLUMNS + ["legacy"]
    assert len(df) == 1 + 2 * 2 * len(grid())


def test_read_results_skips_cpu_unless_asked(root):
    write_fake_run(root, 1, grid(), device="cpu")
    assert results.read_results(root).empty
    assert not results.read_results(root, include_cpu=True).empty


def test_read_results_empty_root(tmp_path):
    df = results.read_results(tmp_path / "nothing")
    assert df.empty and list(df.columns) == results.COLUMNS


def test_git_sha_env_wins(monkeypatch):
    """PYKERNELS_GIT_SHA is recorded over git's answer (a copied tree's .git can be stale)."""
    from bench import env_info

    monkeypatch.setenv("PYKERNELS_GIT_SHA", "0123456789abcdef")
    env_info.git_revision.cache_clear()
    try:
        assert env_info.git_revision() == ("0123456789abcdef", "")
        monkeypatch.delenv("PYKERNELS_GIT_SHA")
        env_info.git_revision.cache_clear()
        assert env_info.git_revision()[0] != "0123456789abcdef"
    finally:
        env_info.git_revision.cache_clear()
