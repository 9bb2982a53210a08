"""Synthetic results for the harness tests: runs written through bench.results into a tmp root.

A plain module (not conftest.py) so `from bench_fakes import ...` never picks up another
directory's conftest."""

from __future__ import annotations

import hashlib
from pathlib import Path

from bench import results
from bench.ceilings import Ceilings
from bench.env_info import device_slug
from bench.timing import Timing

H200 = "NVIDIA H200"
H100 = "NVIDIA H100 80GB HBM3"
CEIL = Ceilings(copy_tbps=4.27, bf16_tflops=694.0, fp8_tflops=1257.0)


def fake_env(device: str, sha: str) -> dict:
    return {"device": device, "device_slug": device_slug(device), "compute_capability": "9.0",
            "driver": "580.65.06", "cuda": "13.0", "torch": "2.11.0", "triton": "3.6.0",
            "flashinfer": "0.6.18.post1", "pykernels": "0.1.0", "git_sha": sha,
            "git_dirty": False}


def write_fake_run(root: Path, day: int, times: dict, device: str = H200,
                   spread: float = 0.01, family: str = "norm") -> results.RunInfo:
    """One run on `device` at 2026-11-<day>: times maps (kernel, provider, tokens) -> us.
    Every case gets time + bandwidth rows with a p20-p80 band of +-spread/2."""
    sha = hashlib.sha1(f"{device}{day}".encode()).hexdigest()
    run = results.RunInfo(f"202611{day:02d}T000000Z-{family}-{sha[:7]}",
                          f"2026-11-{day:02d}T00:00:00Z", family, "test", fake_env(device, sha))
    rows = []
    for (kernel, provider, tokens), us in times.items():
        t = Timing(us, us * (1 - spread / 2), us * (1 + spread / 2), 100, "graph")
        rows += results.make_rows(run, kernel=kernel, provider=provider,
                                  shape={"tokens": tokens, "hidden": 4096}, dtype="bf16",
                                  timing=t, nbytes=2 * tokens * 4096 * 2, ceilings=CEIL)
    results.write_run(root, run, rows, CEIL)
    return run


def grid(scale: float = 1.0, **override) -> dict:
    """A small grid of times (us); override={'cuda_4096': 1.1} scales one entry."""
    out = {}
    for kernel in ("rms_norm", "fused_add_rms_norm"):
        for provider, base in (("cuda", 10.0), ("triton", 12.0), ("fi", 10.5)):
            for tokens in (1, 4096):
                us = base * (1 + tokens / 1024) * scale
                out[(kernel, provider, tokens)] = us * override.get(f"{provider}_{tokens}", 1.0)
    return out
