"""bench.timing on a GPU: which method times what."""

import pytest
import torch

from bench.timing import measure

pytestmark = pytest.mark.gpu


def test_host_bound_calls_are_graph_timed():
    # 200 one-element launches: ~2 us of GPU work each, several us of host work each, so the
    # eager call (~1 ms) is host-bound, far above GRAPH_BELOW_US. Events would time the host.
    x = torch.zeros(1, device="cuda")

    def fn(i):
        for _ in range(200):
            x.add_(1.0)

    t = measure(fn, rep_ms=20)
    assert t.method == "graph"
    eager = measure(fn, rep_ms=20, graph=False)
    assert t.median_us < 0.8 * eager.median_us, (t, eager)


def test_long_gpu_bound_calls_are_event_timed():
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)  # ~1.6 ms a matmul
    out = torch.empty_like(a)
    t = measure(lambda i: torch.matmul(a, a, out=out), rep_ms=20)
    assert t.method == "events"
    assert t.median_us > 500
