"""The regression check: planted regressions fail and are named, noise passes, devices never mix."""

from __future__ import annotations

import json

import pytest

from bench import dashboard, regress, results
from tests.bench.bench_fakes import H100, H200, grid, write_fake_run


def _check(root, **kw) -> regress.CheckReport:
    return regress.check(results.read_results(root), **kw)


def test_planted_ten_percent_regression_fails_and_is_named(root):
    write_fake_run(root, 1, grid())
    write_fake_run(root, 2, grid(cuda_4096=1.10))
    report = _check(root)
    assert not report.passed
    names = [v.series for v in report.regressions]
    assert len(names) == 2  # rms_norm and fused_add_rms_norm, cuda at 4096 tokens
    assert all("nvidia-h200" in n and "| cuda |" in n and "tokens=4096" in n for n in names)
    assert all("| time" in n for n in names)  # bandwidth repeats the time: not checked twice
    text = report.summary()
    assert "FAILED" in text and "rms_norm | cuda | tokens=4096 hidden=4096" in text
    assert "+10.0% worse" in text


def test_three_percent_noise_passes(root):
    write_fake_run(root, 1, grid())
    write_fake_run(root, 2, grid(scale=1.03, fi_1=0.97))
    report = _check(root)
    assert report.passed and len(report.verdicts) == len(grid())
    assert "check passed: no regression" in report.summary()


def test_threshold_widens_with_the_series_spread(root):
    # A series whose own p20-p80 band spans 20% does not fail on a 10% move ...
    write_fake_run(root, 1, grid(), spread=0.20)
    write_fake_run(root, 2, grid(cuda_4096=1.10), spread=0.20)
    assert _check(root).passed
    # ... but does fail on a 25% one.
    write_fake_run(root, 3, grid(cuda_4096=1.10 * 1.25), spread=0.20)
    assert not _check(root).passed


def test_devices_are_never_mixed(root):
    write_fake_run(root, 1, grid(), device=H200)
    write_fake_run(root, 2, grid(scale=1.5), device=H100)  # slower GPU, newer run: no regression
    report = _check(root)
    assert report.passed and not report.verdicts and report.single_run == 2 * len(grid())
    write_fake_run(root, 3, grid(scale=1.5 * 1.2), device=H100)
    report = _check(root)
    assert {v.series.split(" | ")[0] for v in report.verdicts} == {"nvidia-h100-80gb-hbm3"}
    assert len(report.regressions) == len(grid())


def test_split_run_and_sub_floor_moves_pass(root):
    """A run whose samples split between two speeds (median slow, p20 at the old speed), seen on
    the H200 for silu_and_mul, and a 0.3 us move of a 2 us kernel do not fail CI; the same moves
    with the bands apart and above the floor do."""
    # device_slug, source, kernel, provider, shape_label, dtype, metric (regress.SERIES_KEY)
    key = ("nvidia-h200", "bench", "silu_and_mul", "cuda", "tokens=16384", "bf16", "time")
    row = lambda v, lo, hi, run: {"value": v, "p20": lo, "p80": hi, "unit": "us", "run_id": run}
    split = regress.compare(key, row(333.8, 329.8, 336.9, "a"), row(395.0, 331.0, 400.0, "b"),
                            0.07)
    assert split.change > split.threshold and not split.bands_apart and not split.regressed
    apart = regress.compare(key, row(333.8, 329.8, 336.9, "a"), row(390.9, 380.0, 392.4, "b"),
                            0.07)
    assert apart.regressed
    tiny = {("rms_norm", "cuda", 1): 2.33}
    write_fake_run(root, 3, tiny)
    write_fake_run(root, 4, {("rms_norm", "cuda", 1): 2.62})  # +12%, bands apart, 0.29 us
    report = _check(root)
    assert report.passed
    assert any(v.change > 0.1 and not v.large_enough for v in report.verdicts)
    write_fake_run(root, 5, {("rms_norm", "cuda", 1): 3.30})  # +26%, 0.68 us: regressed
    assert not _check(root).passed


def test_runs_timed_differently_are_not_compared(root):
    write_fake_run(root, 1, grid())
    write_fake_run(root, 2, grid(cuda_4096=5.0))
    df = results.read_results(root)
    df.loc[df.run_id == df.run_id.max(), "method"] = "events"  # baseline was replayed
    report = regress.check(df)
    assert report.passed and report.method_changed == len(grid())
    assert "timed differently (not compared)" in report.summary()


def test_single_run_and_no_results_pass(root):
    assert _check(root).passed
    assert _check(root).summary() == "check passed: no results to check"
    write_fake_run(root, 1, grid())
    report = _check(root)
    assert report.passed and "nothing to compare yet" in report.summary()


def test_baseline_first_and_by_sha(root):
    first = write_fake_run(root, 1, grid())
    write_fake_run(root, 2, grid(cuda_4096=1.05))
    write_fake_run(root, 3, grid(cuda_4096=1.10))
    assert _check(root).passed  # 1.10 / 1.05: under 7% vs the previous run
    assert not _check(root, baseline="first").passed
    assert not _check(root, baseline=first.env["git_sha"][:8]).passed
    assert not _check(root, baseline=first.run_id).passed
    report = _check(root, baseline="deadbeef")
    assert report.passed and report.no_baseline == len(grid())


def test_higher_is_better_metrics(root):
    write_fake_run(root, 1, grid())
    write_fake_run(root, 2, grid())
    df = results.read_results(root)
    df = df[df.metric == "time"].copy()
    df["metric"] = "throughput"
    late = df.run_id == df.run_id.max()
    for col in ("value", "p20", "p80"):  # 10% fewer tokens/s, the whole band with it
        df.loc[late, col] = df.loc[late, col] * 0.9
    report = regress.check(df)
    assert len(report.regressions) == len(grid())
    assert report.regressions[0].change == pytest.approx(1 / 0.9 - 1)


def test_dashboard_check_exit_status(root, capsys):
    args = ["--check", "--results", str(root)]
    assert dashboard.main(args) == 0
    write_fake_run(root, 1, grid())
    write_fake_run(root, 2, grid(triton_1=1.2))
    assert dashboard.main(args) == 1
    out = capsys.readouterr().out
    assert "REGRESSED nvidia-h200 | bench | rms_norm | triton | tokens=1 hidden=4096" in out
    assert dashboard.main(args + ["--threshold", "0.25"]) == 0


def test_accepted_regressions_pass_with_their_reason(root, capsys):
    write_fake_run(root, 1, grid())
    write_fake_run(root, 2, grid(cuda_4096=1.10))
    regressed = _check(root).regressions
    assert len(regressed) == 2
    first = regressed[0]
    entry = {"series": first.series, "new_run": first.new_run, "reason": "config retuned"}
    (root / regress.ACCEPTED_NAME).write_text(json.dumps([entry]))
    report = _check(root, accepted=regress.read_accepted(root))
    assert [v.series for v in report.regressions] == [regressed[1].series]  # the other fails
    assert [v.series for v in report.accepted] == [first.series]
    assert f"ACCEPTED {first.series}" in report.summary()
    assert "config retuned" in report.summary()
    # both accepted: the check passes and still shows them
    entries = [entry, {**entry, "series": regressed[1].series}]
    (root / regress.ACCEPTED_NAME).write_text(json.dumps(entries))
    args = ["--check", "--results", str(root)]
    assert dashboard.main(args) == 0
    out = capsys.readouterr().out
    assert "check passed: no regression" in out and "2 accepted" in out
    # an acceptance names one run: the same series regressing in a later run fails again
    write_fake_run(root, 3, grid(cuda_4096=1.10 * 1.10))
    assert dashboard.main(args) == 1
    # a malformed file is an error naming it, not a silent pass
    (root / regress.ACCEPTED_NAME).write_text(json.dumps([{"series": "x"}]))
    assert dashboard.main(args) == 2
    assert regress.ACCEPTED_NAME in capsys.readouterr().err
