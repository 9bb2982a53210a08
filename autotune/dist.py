"""Several ranks, one set of configs: tune on rank 0 and broadcast through torch.distributed.

Ranks that pick different configs for the same shape run different kernels, and where a kernel's
choice changes a collective's schedule (or just its timing) other projects have seen deadlocks and
rank-to-rank numeric drift. Here rank 0 tunes (or reads its cache), then every rank installs rank
0's entries as in-process configs, which Tunable.lookup consults first.

Payloads travel as JSON text in a uint8 tensor (configs are data; no pickle), on the CPU for gloo
and on the current CUDA device for NCCL.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from autotune.tunable import Tunable, registry


def _world(group) -> tuple[int, int]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def broadcast_json(obj, group=None, src: int = 0):
    """obj of group rank `src` on every rank of `group` (JSON-serializable values only)."""
    import torch
    import torch.distributed as dist

    device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
    root = dist.get_global_rank(group, src) if group is not None else src
    mine = dist.get_rank(group) == src
    data = json.dumps(obj).encode() if mine else b""
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    dist.broadcast(size, root, group=group)
    if mine:
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    else:
        buf = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    dist.broadcast(buf, root, group=group)
    return json.loads(bytes(buf.cpu().numpy().tobytes()).decode())


def tune_on_rank0(tune_local, args: tuple, tunable: Tunable, group=None):
    """Run tune_local(*args) on rank 0 only; every rank installs rank 0's configs for the tuned
    shapes (freshly tuned or reused from rank 0's cache) and gets rank 0's report."""
    from autotune.tuner import Report

    rank, world = _world(group)
    if world <= 1:
        return tune_local(*args)
    payload = None
    if rank == 0:
        try:
            report = tune_local(*args)
            entries = {r.key: r.entry for r in report.results if r.entry is not None}
            payload = {"report": report.as_dict(), "entries": entries}
        except Exception as err:
            broadcast_json({"error": f"{type(err).__name__}: {err}"}, group)
            raise
    payload = broadcast_json(payload, group)
    if "error" in payload:
        raise RuntimeError(f"autotune: rank 0 failed to tune {tunable.name}: {payload['error']}")
    tunable.install(payload["entries"])
    return Report.from_dict(payload["report"])


def sync_configs(tunables: Iterable[Tunable] | None = None, group=None) -> int:
    """Make every rank use rank 0's configs (its cache and in-process entries) for `tunables`
    (default: every declared one). Call it on all ranks, e.g. before CUDA-graph capture.
    Returns the number of entries installed."""
    rank, world = _world(group)
    chosen = list(tunables) if tunables is not None else list(registry().values())
    if world <= 1:
        return 0
    payload = {t.name: t.known_entries() for t in chosen} if rank == 0 else None
    payload = broadcast_json(payload, group)
    for t in chosen:
        t.install(payload.get(t.name, {}))
    return sum(len(v) for v in payload.values())
