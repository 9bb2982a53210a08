"""Tuning: check every candidate against the reference, time the survivors, keep the fastest.

    report = tune(RMS_NORM, space, shapes, make_case)

For each shape (one bucket): the candidates are the space's configs with the heuristic default
first (the default always competes). Each candidate is checked against the reference on the tuning
inputs (`Case.check` raises on a wrong result; a crash is caught the same way) and discarded with
the reason when it fails; the rest are timed (default timer: bench.timing.measure, the median of
CUDA-event timings with CUDA-graph replay for short kernels). The entry records the winner, its
time, the default's time, the runner-up and its margin, and the fastest timings (autotune.diff uses
them to compare two tunes). The near-best candidates (within 15%, at least two, at most 5) are
re-timed in three interleaved rounds and ranked by their median (`CONFIRM_*`), so drift and
one-off noise decide fewer winners.

SGLANG_FLASHINFER_AUTOTUNE_CACHE=1 (default): buckets already in this environment's cache are
reused, new ones are merged into it after each bucket. =0: every bucket is tuned afresh, the cache
file is not opened for writing, and the result goes to a new runs/ file whose path is logged.
Either way the process then uses what it tuned (Tunable.install).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field

from autotune import space as space_mod
from autotune import store
from autotune.tunable import Tunable
from pykernels import envs
from pykernels._log import get_logger

log = get_logger("autotune")

MAX_TIMINGS = 64  # fastest timings kept per entry (diff reads them)
MAX_DISCARDED = 16  # discarded candidates listed per entry (all are counted)
# Confirmation round: the candidates within CONFIRM_WITHIN of the fastest (at least the fastest
# two, at most CONFIRM_TOP) are timed again CONFIRM_ROUNDS times, interleaved (the order rotating
# every round), and ranked by the median of all their timings. One pass in order lets clock
# drift over a bucket and one-off noise pick the winner: two fresh MoE tunes on an H200
# (2026-11-21) disagreed on 2 of 6 buckets, where one config timed 4-9% apart between the tunes
# (5787 vs 5266 us). The window is 15% wide: with 5%, the next two fresh Mixtral tunes (H200,
# 2026-11-21) still disagreed on 3 of 12 buckets, each time because the other tune's winner
# had one first-pass reading 5-13% slow here and was never re-timed (a compute-bound bucket's
# time swings 5-15% between rounds on that GPU).
CONFIRM_WITHIN = 0.15
CONFIRM_TOP = 5
CONFIRM_ROUNDS = 3


@dataclass
class Case:
    """One shape to tune, built by the family driver.

    run(config, i): launch with `config` on input set i (timed; no allocation, no host sync, so
    it can be captured in a CUDA graph). check(config): run once and compare with the reference,
    raising on a mismatch. n_inputs: input sets rotated through while timing (L2 does not flatter).
    """

    run: Callable[[dict, int], object]
    check: Callable[[dict], None]
    n_inputs: int = 1


@dataclass
class Planned:
    shape: dict
    key: str
    default: dict
    candidates: list[dict]
    cached: dict | None = None  # the reusable cache entry, when there is one


@dataclass
class BucketResult:
    key: str
    shape: dict
    status: str  # "tuned", "cached", "skipped" (budget), "failed"
    entry: dict | None = None
    seconds: float = 0.0
    reason: str = ""


@dataclass
class Report:
    name: str
    mode: str  # "cache" or "run"
    results: list[BucketResult] = field(default_factory=list)
    seconds: float = 0.0
    path: str | None = None  # the cache or runs/ file written

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> Report:
        results = [BucketResult(**r) for r in data.get("results", [])]
        return cls(**{**data, "results": results})


def default_timer(device: str = "cuda", warmup_ms: float = 5.0, rep_ms: float = 30.0):
    """bench.timing.measure with short windows (tuning ranks many configs; the bench harness
    measures the winners properly)."""
    from bench.timing import measure

    def timer(fn, n_inputs):
        return measure(fn, n_inputs=n_inputs, warmup_ms=warmup_ms, rep_ms=rep_ms, device=device)

    return timer


def _prefetch_off(tunable: Tunable) -> bool:
    return tunable.gemm_like and envs.TRITON_DISABLE_MACA_OPT_MMA_PREFETCH


def _reusable(entry: dict | None, prefetch_off: bool) -> bool:
    if not entry or not entry.get("complete", True):
        return False
    # A bucket tuned with prefetch forced off did not search prefetch on: tune it again.
    return prefetch_off or not entry.get("prefetch_forced_off", False)


def plan(tunable: Tunable, space: space_mod.Space, shapes: Iterable[Mapping],
         force: bool = False) -> list[Planned]:
    """What tune() would do for each distinct bucket: its candidates, or the cache entry reused."""
    use_cache = envs.SGLANG_FLASHINFER_AUTOTUNE_CACHE and not force
    cached = tunable.cache_entries() if use_cache else {}
    off = _prefetch_off(tunable)
    out, seen = [], set()
    for raw in shapes:
        shape = tunable.shape_of(**raw)
        key = tunable.key_of(shape)
        if key in seen:
            continue
        seen.add(key)
        default = tunable.default_for(**shape)
        default = space_mod.force_prefetch_off(default) if off else default
        configs = space.configs(shape, gemm_like=tunable.gemm_like, prefetch_off=off)
        dkey = space_mod.canonical(default)
        candidates = [default] + [c for c in configs if space_mod.canonical(c) != dkey]
        entry = cached.get(key)
        out.append(Planned(shape, key, default, candidates,
                           entry if _reusable(entry, off) else None))
    return out


def _short(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip().replace("\n", " ")
    return text[:300]


def _measure(case: Case, config: dict, timer) -> tuple[float, str]:
    t = timer(lambda i: case.run(config, i), case.n_inputs)
    us = float(getattr(t, "median_us", t))
    if not math.isfinite(us) or us <= 0:
        raise ValueError(f"timer returned {us!r}")
    return us, getattr(t, "method", "")


def _entry(p: Planned, timings: list, discarded: list, default_us, complete: bool,
           method: str, off: bool, gemm_like: bool) -> dict:
    timings.sort(key=lambda r: r[1])
    (best, best_us), runner = timings[0], (timings[1] if len(timings) > 1 else None)
    entry = {
        "shape": p.shape, "config": best, "time_us": round(best_us, 4),
        "default_config": p.default,
        "default_us": None if default_us is None else round(default_us, 4),
        "speedup_vs_default": None if default_us is None else round(default_us / best_us, 4),
        "runner_up": None if runner is None else {"config": runner[0],
                                                  "time_us": round(runner[1], 4)},
        "margin": None if runner is None else round(runner[1] / best_us - 1, 5),
        "candidates": len(p.candidates), "measured": len(timings),
        "discarded_count": len(discarded), "discarded": discarded[:MAX_DISCARDED],
        "timings": [[c, round(us, 4)] for c, us in timings[:MAX_TIMINGS]],
        "complete": complete, "timing_method": method,
        "tuned_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if gemm_like:
        entry["prefetch_forced_off"] = off
    return entry


def tune_bucket(tunable: Tunable, p: Planned, make_case, timer, deadline: float | None = None,
                progress=None) -> tuple[dict | None, list]:
    """Check, then time every candidate of one bucket. (entry or None, discarded)."""
    case = make_case(p.shape)
    timings, discarded, default_us, method, complete = [], [], None, "", True
    for i, config in enumerate(p.candidates):
        if i > 0 and deadline is not None and time.monotonic() > deadline:
            complete = False  # out of budget: keep what was measured (the default at least)
            if progress is not None:
                progress.update(len(p.candidates) - i)
            break
        stage = "check"
        try:
            case.check(config)
            stage = "timing"
            us, method = _measure(case, config, timer)
            timings.append((config, us))
            default_us = us if i == 0 else default_us
        except Exception as err:  # a wrong or crashing config is reported, never fatal
            discarded.append({"config": config, "default": i == 0,
                              "reason": f"{stage} failed: {_short(err)}"})
            if i == 0:
                log.warning("autotune: the default %s config %s fails for %s (%s)", tunable.name,
                            config, p.key, _short(err))
        if progress is not None:
            progress.update(1)
    if not timings:
        return None, discarded
    confirmed = 0
    if deadline is None or time.monotonic() <= deadline:
        timings, confirmed = _confirm(case, timings, timer, discarded)
        if not timings:
            return None, discarded
        default_us = next((us for c, us in timings if c == p.candidates[0]), None)
    off = _prefetch_off(tunable)
    entry = _entry(p, timings, discarded, default_us, complete, method, off, tunable.gemm_like)
    entry["confirmed"] = confirmed
    return entry, discarded


def _confirm(case: Case, timings: list, timer, discarded: list) -> tuple[list, int]:
    """Re-times the near-best candidates interleaved (CONFIRM_*); (timings with their medians,
    how many were re-timed). A candidate failing now is discarded like one failing at first."""
    ranked = sorted(timings, key=lambda t: t[1])
    within = sum(us <= ranked[0][1] * (1 + CONFIRM_WITHIN) for _, us in ranked)
    near = ranked[:min(max(within, 2), CONFIRM_TOP)]  # the runner-up at least: a fluke first
    if len(near) < 2:
        return timings, 0
    samples = {id(c): [us] for c, us in near}
    for r in range(CONFIRM_ROUNDS):
        for config, _ in near[r % len(near):] + near[:r % len(near)]:
            if id(config) not in samples:
                continue
            try:
                samples[id(config)].append(_measure(case, config, timer)[0])
            except Exception as err:
                discarded.append({"config": config, "default": False,
                                  "reason": f"confirmation failed: {_short(err)}"})
                del samples[id(config)]
    out = []
    for config, us in timings:
        if id(config) in samples:
            out.append((config, statistics.median(samples[id(config)])))
        elif all(config is not c for c, _ in near):
            out.append((config, us))
    return out, len(near)


def tune(tunable: Tunable, space: space_mod.Space, shapes: Iterable[Mapping],
         make_case: Callable[[dict], Case], *, timer=None, device: str = "cuda",
         budget_s: float | None = None, deadline: float | None = None, force: bool = False,
         progress=None, distributed: bool = False, group=None) -> Report:
    """Tune `tunable` over `shapes` (dicts with the key fields and the bucket dimension).

    timer(fn, n_inputs) -> µs or a bench.timing.Timing (default: default_timer(device)).
    budget_s / deadline (time.monotonic()): no new bucket starts after it, and the running one
    stops after its current candidate (its entry is marked incomplete and re-tuned next time).
    force: re-tune buckets already in the cache. progress: anything with update(n) (tqdm).
    distributed: tune on rank 0 only and broadcast the configs through torch.distributed
    (`group`, default the world), so every rank launches the same configs.
    """
    if budget_s is not None:
        end = time.monotonic() + budget_s
        deadline = end if deadline is None else min(deadline, end)
    args = (tunable, space, shapes, make_case, timer or default_timer(device), deadline, force,
            progress)
    if distributed:
        from autotune import dist

        return dist.tune_on_rank0(_tune_local, args, tunable, group)
    return _tune_local(*args)


def _tune_local(tunable, space, shapes, make_case, timer, deadline, force, progress) -> Report:
    start = time.monotonic()
    use_cache = envs.SGLANG_FLASHINFER_AUTOTUNE_CACHE
    report = Report(tunable.name, "cache" if use_cache else "run")
    meta, info = tunable.metadata(), {**tunable.info(), "mode": report.mode}
    fresh: dict[str, dict] = {}
    try:
        for p in plan(tunable, space, shapes, force):
            result = _run_planned(tunable, p, make_case, timer, deadline, progress)
            report.results.append(result)
            if result.status == "tuned":
                fresh[p.key] = result.entry
                if use_cache:  # merged per bucket: a killed run keeps what it finished
                    report.path = str(store.merge(tunable.name, meta, {p.key: result.entry},
                                                  info))
    finally:
        if not use_cache and fresh:
            report.path = str(store.write_run(tunable.name, meta, fresh, info))
            log.warning("autotune: SGLANG_FLASHINFER_AUTOTUNE_CACHE=0: %s results written to %s "
                        "(the cache is untouched)", tunable.name, report.path)
        tunable.install(fresh)
        report.seconds = time.monotonic() - start
    return report


def _run_planned(tunable, p: Planned, make_case, timer, deadline, progress) -> BucketResult:
    t0 = time.monotonic()
    if p.cached is not None:
        if progress is not None:
            progress.update(len(p.candidates))
        return BucketResult(p.key, p.shape, "cached", p.cached)
    if deadline is not None and time.monotonic() > deadline:
        if progress is not None:
            progress.update(len(p.candidates))
        return BucketResult(p.key, p.shape, "skipped", reason="out of budget")
    try:
        entry, discarded = tune_bucket(tunable, p, make_case, timer, deadline, progress)
    except Exception as err:  # building the inputs failed (e.g. out of memory)
        if progress is not None:
            progress.update(len(p.candidates))
        log.warning("autotune: %s %s failed: %s", tunable.name, p.key, _short(err))
        return BucketResult(p.key, p.shape, "failed", seconds=time.monotonic() - t0,
                            reason=_short(err))
    if entry is None:
        return BucketResult(p.key, p.shape, "failed", seconds=time.monotonic() - t0,
                            reason=f"all {len(discarded)} candidates discarded: "
                                   f"{discarded[0]['reason'] if discarded else ''}")
    return BucketResult(p.key, p.shape, "tuned", entry, time.monotonic() - t0)
