"""The CLIs: `autotune.<family> --dry-run`, the no-GPU message, a --cpu smoke run, `show`,
`diff`, `ship`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import autotune
from autotune import diff, ship, show, store, tune
from autotune.norm import FAMILY as NORM
from tests.autotune.autotune_helpers import FakeBench, shapes

TINY = ["--shape", "hidden=64", "--batch-sizes", "1,4", "--dtype", "float32"]


def test_dry_run_lists_buckets_and_what_is_cached(capsys, cache_dir):
    from autotune.cli import main

    assert main(NORM, ["--dry-run", *TINY]) == 0
    out = capsys.readouterr().out
    assert "rms_norm" in out and "fused_add_rms_norm" in out
    assert "hidden=64,dtype=float32,tokens=1" in out and "tune" in out
    assert not cache_dir.exists()  # a dry run writes nothing
    assert main(NORM, ["--dry-run", "--model", "llama-3-8b", "--op", "rms_norm",
                       "--batch-sizes", "1,3"]) == 0
    out = capsys.readouterr().out
    # --batch-sizes become the buckets (CUDA-graph sizes), 3 stays 3
    assert "hidden=4096,dtype=bfloat16,tokens=3" in out and "fused" not in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_no_gpu_says_so_and_exits_cleanly(capsys, cache_dir):
    from autotune.cli import main

    assert main(NORM, TINY) == 0
    assert "no CUDA GPU here" in capsys.readouterr().out
    assert not cache_dir.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter smoke run")
def test_cpu_smoke_run_then_warm_rerun(capsys, cache_dir, tmp_path):
    from autotune.cli import main

    report = tmp_path / "report.json"
    assert main(NORM, ["--cpu", "--no-progress", "--report", str(report), *TINY]) == 0
    out = capsys.readouterr().out
    assert "best vs default" in out and "total tuning time" in out
    body = json.loads(report.read_text())
    assert [r["status"] for rep in body["reports"] for r in rep["results"]] == ["tuned"] * 4
    assert (cache_dir / "rms_norm.json").exists()
    assert (cache_dir / "fused_add_rms_norm.json").exists()
    assert main(NORM, ["--cpu", "--no-progress", "--report", str(report), *TINY]) == 0
    body = json.loads(report.read_text())
    assert [r["status"] for rep in body["reports"] for r in rep["results"]] == ["cached"] * 4


def test_module_entry_points_run():
    for module in ("autotune", "autotune.norm", "autotune.show", "autotune.diff"):
        args = [] if module in ("autotune",) else ["--help"]
        done = subprocess.run([sys.executable, "-m", module, *args], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr


def _gemm_cache(cache_dir):
    t = autotune.Tunable("show_gemm", family="fake", key=("n", "dtype"), gemm_like=True,
                         default=lambda **_: {"BLOCK": 64, "num_stages": 2, "prefetch": True})
    bench = FakeBench(times=lambda c: 5.0 if c["prefetch"] else 9.0)
    space = autotune.Space({"BLOCK": [32, 64], "num_stages": [1, 3]})
    return t, tune(t, space, shapes(4, 8), bench.make_case, timer=bench.timer)


def test_show_lists_entries_metadata_and_prefetch(capsys, cache_dir):
    _gemm_cache(cache_dir)
    assert show.main(["show_gemm"]) == 0
    out = capsys.readouterr().out
    assert "show_gemm" in out and "n=256,dtype=float16,tokens=4" in out
    assert "prefetch=True" in out and "this environment" in out and "torch=" in out
    assert show.main(["--json"]) == 0
    blocks = json.loads(capsys.readouterr().out)
    assert [b["name"] for b in blocks] == ["show_gemm"]
    assert blocks[0]["metadata"]["gemm_like"] is True


def test_show_includes_runs_and_shipped(capsys, cache_dir, monkeypatch):
    monkeypatch.setenv("SGLANG_FLASHINFER_AUTOTUNE_CACHE", "0")
    _, report = _gemm_cache(cache_dir)
    target, n = ship.ship(report.path, allow_cpu=True, gpu="NVIDIA H200")
    assert show.main(["--runs"]) == 0
    out = capsys.readouterr().out
    assert "runs: show_gemm" in out and "shipped: show_gemm" in out and str(target) in out


def _runs_file(cache_dir, times):
    bench = FakeBench(times=times)
    t = autotune.Tunable("diff_op", family="fake", key=("n", "dtype"),
                         default=lambda **_: {"BLOCK": 64, "num_warps": 4})
    space = autotune.Space({"BLOCK": [32, 128], "num_warps": [4]})
    return tune(t, space, shapes(1, 2, 4, 8), bench.make_case, timer=bench.timer).path


def test_diff_reports_stability(capsys, cache_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("SGLANG_FLASHINFER_AUTOTUNE_CACHE", "0")
    a = _runs_file(cache_dir, lambda c: {32: 10.0, 64: 11.0, 128: 12.0}[c["BLOCK"]])
    # B: 64 beats 32 by 1% everywhere; A's winner is within 3% in B, but B's is 10% off in A.
    b_times = {32: 10.2, 64: 10.1, 128: 12.5}
    b = _runs_file(cache_dir, lambda c: b_times[c["BLOCK"]])
    result = diff.compare(a, b)
    assert result["buckets"] == 4 and result["same_winner_share"] == 0.0
    assert result["agree_share"] == 0.0
    assert result["rows"][0]["cross_a_in_b"] == pytest.approx(10.2 / 10.1 - 1)
    out_json = tmp_path / "d.json"
    assert diff.main([a, b, "--json", str(out_json)]) == 0
    assert "same winner 0%" in capsys.readouterr().out
    assert json.loads(out_json.read_text())["buckets"] == 4
    assert diff.compare(a, a)["same_winner_share"] == 1.0
    assert diff.main([a, str(tmp_path / "missing.json")]) == 2


def test_ship_promotes_and_lookup_uses_it(cache_dir, on_gpu):
    on_gpu("cpu", cc=None)
    t, report = _gemm_cache(cache_dir)
    with pytest.raises(ValueError, match="CPU"):
        ship.ship(report.path)
    target, n = ship.ship(report.path, allow_cpu=True, gpu="NVIDIA H200")
    assert n == 2 and target.name == "NVIDIA_H200.json" and target.parent.name == "fake"
    doc = json.loads(target.read_text())
    entry = doc["show_gemm"]["entries"]["n=256,dtype=float16,tokens=4"]
    assert "timings" not in entry and entry["config"]["prefetch"] is True
    assert ship.main([str(report.path), "--allow-cpu", "--gpu", "NVIDIA H200"]) == 0
    # A fresh process on an H200 (no user cache) gets the shipped config.
    for p in cache_dir.glob("*.json"):
        p.unlink()
    doc["show_gemm"]["_metadata"]["compute_capability"] = "9.0"
    store.atomic_write(target, doc)
    autotune.reset()
    on_gpu("NVIDIA H200")
    config, source = t.resolve(tokens=4, n=256, dtype="float16")
    assert source == "shipped NVIDIA H200" and config["prefetch"] is True


def test_core_floor_imports_nothing_above_it():
    """The core (what kernel modules import) pulls in no kernel, bench, serving, torch or CLI
    module: DESIGN.md's two floors, so no import cycle can form."""
    code = ("import sys, autotune, autotune.dist, autotune.fi\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'triton', 'bench', "
            "'serving', 'flashinfer', 'rich', 'tqdm') or m.startswith(('pykernels.norm', "
            "'pykernels.activation', 'autotune.cli', 'autotune.norm'))]\n"
            "assert not bad, bad\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
