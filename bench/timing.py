"""Timing helpers shared by the benchmarks and the autotuner (bottom floor: imports only torch).

`measure(fn, n_inputs=...)` runs `fn(i)` for input set i, rotating through the sets so repeated
calls do not find their data in L2, and returns the median with p20/p80 in microseconds. Kernels
under ~100 us, and calls whose launches take longer than their GPU work, are timed as CUDA-graph
replays (launch gaps removed, the way the anchors were measured); longer ones per call with CUDA
events. Warm-up calls are never timed.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

GRAPH_BELOW_US = 100.0  # eager estimate under which a graph replay is used


@dataclass(frozen=True)
class Timing:
    median_us: float
    p20_us: float
    p80_us: float
    samples: int
    method: str  # "graph", "events" or "cpu"

    def as_dict(self) -> dict:
        return asdict(self)


def _quantiles(values_us: list[float], method: str) -> Timing:
    q = statistics.quantiles(values_us, n=10, method="inclusive") if len(values_us) > 1 else None
    med = statistics.median(values_us)
    return Timing(med, q[1] if q else med, q[7] if q else med, len(values_us), method)


def rotation_count(bytes_per_call: int, device=None, factor: float = 3.0, cap: int = 64) -> int:
    """How many distinct input sets to rotate through so one pass over them moves `factor` times
    the device's L2 (60 MB on the H200): a call then rarely finds its inputs still cached."""
    if not torch.cuda.is_available():
        return 1
    props = torch.cuda.get_device_properties(device or torch.cuda.current_device())
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    return max(1, min(cap, math.ceil(factor * l2 / max(bytes_per_call, 1))))


def _cpu_measure(fn, n_inputs: int, reps: int) -> Timing:
    fn(0)
    times = []
    for i in range(reps):
        start = time.perf_counter()
        fn(i % n_inputs)
        times.append((time.perf_counter() - start) * 1e6)
    return _quantiles(times, "cpu")


def _events_measure(fn, n_inputs: int, reps: int) -> Timing:
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        starts[i].record()
        fn(i % n_inputs)
        ends[i].record()
    torch.cuda.synchronize()
    return _quantiles([s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)], "events")


def _capture(fn, n_inputs: int, calls: int) -> torch.cuda.CUDAGraph:
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i % n_inputs)
    graph.replay()
    torch.cuda.synchronize()
    return graph


def _replay_us(graph: torch.cuda.CUDAGraph) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3


def _graph_calls(per_call_us: float, n_inputs: int) -> int:
    # One graph holds enough calls (a multiple of n_inputs) to run >= ~200 us per replay, so the
    # per-replay event overhead (~2 us) stays under 1%.
    return n_inputs * max(1, math.ceil(200.0 / max(per_call_us, 0.5) / n_inputs))


def _graph_measure(fn, n_inputs: int, per_call_us: float, rep_ms: float) -> Timing:
    calls = _graph_calls(per_call_us, n_inputs)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(n_inputs):  # warm-up on the capture stream (allocator, lazy init)
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = _capture(fn, n_inputs, calls)
    # A host-bound eager estimate overstates the GPU time (4x for a 30 us fused_moe layer,
    # measure()): size the graph again from one timed replay.
    per_call_us = _replay_us(graph) / calls
    if per_call_us * calls < 150.0:
        del graph
        calls = _graph_calls(per_call_us, n_inputs)
        graph = _capture(fn, n_inputs, calls)
    replays = max(5, min(1000, int(rep_ms * 1e3 / (per_call_us * calls))))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    for i in range(replays):
        starts[i].record()
        graph.replay()
        ends[i].record()
    torch.cuda.synchronize()
    per_call = [s.elapsed_time(e) * 1e3 / calls for s, e in zip(starts, ends)]
    del graph
    return _quantiles(per_call, "graph")


def measure(
    fn: Callable[[int], object],
    *,
    n_inputs: int = 1,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    graph: bool | None = None,
    device: str = "cuda",
) -> Timing:
    """Median/p20/p80 time of one call of fn(i), i cycling over range(n_inputs).

    graph=None picks CUDA-graph replay when one eager call takes under GRAPH_BELOW_US or the
    eager calls are host-bound (launching took over half their time); fn must then be
    capturable (no host syncs, no allocation that changes between calls).
    device="cpu" times with the host clock (smoke runs without a GPU).
    """
    if device == "cpu" or not torch.cuda.is_available():
        return _cpu_measure(fn, n_inputs, reps=max(3, int(rep_ms)))
    fn(0)  # first call: compilation, autotuning, lazy init
    torch.cuda.synchronize()
    # Two passes over the inputs, the second one counted: a first call per input can carry
    # one-off host work (triton's per-argument specialization, a tensor descriptor's first
    # encode) that pushed a 20 us kernel over GRAPH_BELOW_US into host-bound event timing.
    for _ in range(2):
        start = time.perf_counter()
        for i in range(n_inputs):
            fn(i)
        enqueued = time.perf_counter()
        torch.cuda.synchronize()
    done = time.perf_counter()
    per_call_us = max((done - start) * 1e6 / n_inputs, 0.5)
    # Host-bound: the launches took most of the time, so the GPU idled between them and events
    # would time the host. A fused_moe layer of Qwen3-30B-A3B at 1 token (four launches, ~30 us
    # of GPU work) took 100-115 us a call eagerly on an H200 and timed 113 us with events.
    host_bound = enqueued - start > 0.5 * (done - start)
    warmup = max(1, min(1000, int(warmup_ms * 1e3 / per_call_us)))
    for i in range(warmup):
        fn(i % n_inputs)
    torch.cuda.synchronize()
    if graph is None:
        graph = per_call_us < GRAPH_BELOW_US or host_bound
    if graph:
        return _graph_measure(fn, n_inputs, per_call_us, rep_ms)
    reps = max(10, min(1000, int(rep_ms * 1e3 / per_call_us)))
    return _events_measure(fn, n_inputs, reps)
