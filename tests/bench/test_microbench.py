"""GPU micro-benchmarks for pytest-benchmark (benchmarks, not timed tests: no speed asserts).

    pytest -m gpu tests/bench/test_microbench.py --benchmark-only --benchmark-json=bench.json
    python -m bench.dashboard --ingest bench.json

Each round replays a CUDA graph of ``calls_per_round`` calls and synchronizes, so host launch
overhead stays out and the sync (~10 us) is under ~1% of a ~1 ms round; the ingest divides the
round time by that count. The providers and inputs are the bench CLI's own (bench/norm.py,
bench/activation.py), so both paths time the same thing.
"""

from __future__ import annotations

import time

import pytest
import torch

from bench import activation, ceilings, env_info, norm

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

HIDDEN = 4096  # Llama-3-8B hidden size; its MLP width 14336 for silu_and_mul
INTERMEDIATE = 14336
TOKENS = (1, 4096)  # a decode step and a prefill chunk
ROUND_US = 1000.0  # target GPU time per round
PROVIDERS = ("cuda", "triton", "torch", "fi")


@pytest.fixture(scope="session")
def bench_info() -> dict:
    """Environment and ceilings recorded with every benchmark (measured once per session)."""
    return {"env": env_info.collect("cuda"), "ceilings": ceilings.get("cuda").as_dict()}


def _graphed(call, n_calls: int):
    """A function replaying a CUDA graph of n_calls calls, then synchronizing."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up outside capture: compilation, allocator
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(n_calls):
            call()

    def replay():
        graph.replay()
        torch.cuda.synchronize()

    replay.graph = graph  # keep the graph alive as long as the function
    return replay


def _calls_per_round(call) -> int:
    call()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        call()
    torch.cuda.synchronize()
    per_call_us = (time.perf_counter() - start) * 1e6 / 20
    return max(1, min(500, round(ROUND_US / max(per_call_us, 1.0))))


def _run(benchmark, bench_info, family, case, provider_name: str) -> None:
    provider = next(p for p in family.providers if p.name == provider_name)
    reason = provider.available("cuda")
    if reason:
        pytest.skip(f"{provider_name}: {reason}")
    fn = provider.build(case, 1, "cuda")
    calls = _calls_per_round(lambda: fn(0))
    target = _graphed(lambda: fn(0), calls)
    benchmark.group = case.kernel
    benchmark.extra_info.update(
        kernel=case.kernel, provider=provider_name, shape=case.shape, dtype="bf16",
        nbytes=case.nbytes, calls_per_round=calls, **bench_info)
    benchmark.pedantic(target, rounds=30, warmup_rounds=2, iterations=1)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("kernel", norm.KERNELS)
def test_norm(benchmark, bench_info, kernel, tokens, provider):
    case = norm.case_for(kernel, tokens, HIDDEN, torch.bfloat16, "llama-3-8b")
    _run(benchmark, bench_info, norm.FAMILY, case, provider)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("tokens", TOKENS)
def test_silu_and_mul(benchmark, bench_info, tokens, provider):
    case = activation.case_for(tokens, INTERMEDIATE, torch.bfloat16, "llama-3-8b")
    _run(benchmark, bench_info, activation.FAMILY, case, provider)
