"""Dashboard rendering (HTML + PNGs from synthetic results) and the pytest-benchmark ingest."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from bench import dashboard, results
from tests.bench.bench_fakes import H100, H200, grid, write_fake_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_render_html_and_pngs(root):
    for day in (1, 2, 3):
        write_fake_run(root, day, grid(scale=1 + day / 100))
    write_fake_run(root, 1, grid(scale=1.3), device=H100)
    assert dashboard.main(["--results", str(root)]) == 0
    out = root / "dashboard"
    index = (out / "index.html").read_text()
    assert "NVIDIA H200" in index and "NVIDIA H100 80GB HBM3" in index
    assert "copy 4.27 TB/s" in index
    pngs = sorted(out.glob("png/*/*.png"))
    # Per device and kernel: the newest-run picture and the trend; devices in their own folders.
    assert {p.parent.name for p in pngs} == {"nvidia-h200", "nvidia-h100-80gb-hbm3"}
    assert {p.name for p in pngs if p.parent.name == "nvidia-h200"} == {
        "rms_norm_latest.png", "rms_norm_trend.png",
        "fused_add_rms_norm_latest.png", "fused_add_rms_norm_trend.png"}
    for png in pngs:
        data = png.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 2000
        assert f"png/{png.parent.name}/{png.name}" in index


def test_render_removes_stale_pngs_and_handles_no_results(root, capsys):
    assert dashboard.main(["--results", str(root)]) == 0
    assert "nothing to render" in capsys.readouterr().out
    stale = root / "dashboard" / "png" / "nvidia-h200" / "gone_latest.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(PNG_MAGIC)
    write_fake_run(root, 1, grid())
    assert dashboard.main(["--results", str(root)]) == 0
    assert not stale.exists()


def test_shape_measured_twice_in_one_run_renders(root, tmp_path):
    """A quick run measures the same shape under two presets (seen on the H100, 2026-11-21):
    the plots take the median instead of failing on duplicate labels."""
    for day in (1, 2):
        run = write_fake_run(root, day, grid())
        rows = results.read_results(root)
        again = rows[rows["run_id"] == run.run_id].to_dict("records")
        results.write_run(root, run, again, None)
    df = results.read_results(root)
    assert df.duplicated(["run_id", "kernel", "provider", "shape_label", "metric"]).any()
    dashboard.render(df, tmp_path / "dash")
    assert (tmp_path / "dash" / "png" / "nvidia-h200" / "rms_norm_trend.png").stat().st_size


def test_many_shapes_spill_into_pages(root, tmp_path):
    times = {("rms_norm", "cuda", t): 1.0 + t / 100 for t in range(1, 31)}
    write_fake_run(root, 1, times)
    write_fake_run(root, 2, times)
    dashboard.render(results.read_results(root), tmp_path / "dash")
    names = {p.name for p in (tmp_path / "dash" / "png" / "nvidia-h200").glob("*.png")}
    assert names == {"rms_norm_latest.png", "rms_norm_trend.png", "rms_norm_trend_p2.png"}


def _pytest_benchmark_json(path, device=H200, sha="0123456789abcdef0123"):
    env = {"device": device, "torch": "2.11.0", "git_sha": sha}
    benches = []
    for provider, median_s in (("cuda", 0.002), ("fi", 0.0021)):
        benches.append({
            "name": f"test_norm[{provider}]", "group": "rms_norm", "params": {"provider": provider},
            "extra_info": {"kernel": "rms_norm", "provider": provider, "dtype": "bf16",
                           "shape": {"tokens": 4096, "hidden": 4096}, "nbytes": 4096 * 4096 * 4,
                           "calls_per_round": 200, "env": env,
                           "ceilings": {"copy_tbps": 4.27, "bf16_tflops": 694.0, "notes": []}},
            "stats": {"min": median_s * 0.9, "max": median_s * 1.2, "mean": median_s,
                      "median": median_s, "q1": median_s * 0.99, "q3": median_s * 1.01,
                      "rounds": 30, "iqr": median_s * 0.02}})
    benches.append({"name": "test_other[7]", "group": None, "params": {"n": 7},
                    "extra_info": {}, "stats": {"median": 1e-5, "q1": 1e-5, "q3": 1e-5}})
    data = {"machine_info": {}, "commit_info": {"id": sha, "dirty": False},
            "datetime": "2026-11-21T06:00:00.123456+00:00", "version": "5.1.0",
            "benchmarks": benches}
    path.write_text(json.dumps(data))
    return path


def test_ingest_pytest_benchmark_json(root, tmp_path, capsys):
    src = _pytest_benchmark_json(tmp_path / "bench.json")
    assert dashboard.main(["--results", str(root), "--ingest", str(src)]) == 0
    assert "ingested" in capsys.readouterr().out
    df = pd.read_csv(root / "nvidia-h200" / "results.csv")
    times = df[df.metric == "time"]
    assert set(times.source) == {dashboard.SOURCE}
    cuda = times[times.provider == "cuda"].iloc[0]
    assert cuda.value == pytest.approx(10.0)  # 2 ms a round / 200 calls
    assert cuda.kernel == "rms_norm" and cuda.tokens == 4096
    assert cuda.fraction == pytest.approx(4096 * 4096 * 4 / 4.27e6 / 10.0, rel=1e-4)
    other = times[times.provider == "default"].iloc[0]
    assert other.shape_label == "n=7" and other.kernel == "test_other[7]"
    # The same file again adds nothing (its run id is derived from the file).
    n_rows = len(df)
    assert dashboard.main(["--results", str(root), "--ingest", str(src), "--check"]) == 0
    assert len(pd.read_csv(root / "nvidia-h200" / "results.csv")) == n_rows


def test_ingest_needs_a_device(root, tmp_path, capsys):
    src = _pytest_benchmark_json(tmp_path / "bench.json", device="")
    assert dashboard.main(["--results", str(root), "--ingest", str(src)]) == 2
    assert "--device" in capsys.readouterr().err
    csv_path, n = dashboard.ingest_file(src, root, device=H100)
    assert n > 0 and csv_path.parent.name == "nvidia-h100-80gb-hbm3"
