"""Several ranks: tune on rank 0, broadcast through torch.distributed (gloo, 2 CPU processes)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

WORKER = textwrap.dedent("""
    import json, sys
    import torch.distributed as dist
    import autotune
    from autotune.tuner import Case

    rank = int(sys.argv[1])
    dist.init_process_group("gloo", rank=rank, world_size=2)
    default = lambda **_: {"BLOCK": 64}
    space = autotune.Space({"BLOCK": [32, 256]})
    state = {}
    def run(cfg, i):
        state["cfg"] = cfg
    case = Case(run, lambda cfg: run(cfg, 0))
    # Each rank's own measurements would disagree: rank 0 likes 32, rank 1 likes 256.
    def timer(fn, n):
        fn(0)
        return float(state["cfg"]["BLOCK"]) if rank == 0 else 1000.0 - state["cfg"]["BLOCK"]
    shapes = [{"n": 8, "tokens": m} for m in (1, 16)]

    tuned = autotune.Tunable("dist_op", family="fake", key=("n",), default=default)
    report = autotune.tune(tuned, space, shapes, lambda s: case, timer=timer, distributed=True)

    synced = autotune.Tunable("dist_sync", family="fake", key=("n",), default=default)
    if rank == 0:
        synced.install({"n=8,tokens=4": {"shape": {"n": 8, "tokens": 4},
                                         "config": {"BLOCK": 32}}})
    else:  # rank 1's own cache says something else
        from autotune import store
        store.merge("dist_sync", synced.metadata(), {"n=8,tokens=4": {
            "shape": {"n": 8, "tokens": 4}, "config": {"BLOCK": 999}}}, {})
        assert synced.lookup(n=8, tokens=4) == {"BLOCK": 999}
    count = autotune.sync_configs([synced])
    print(json.dumps({
        "rank": rank, "statuses": [r.status for r in report.results],
        "tuned": [tuned.lookup(n=8, tokens=m) for m in (1, 16)],
        "synced": synced.lookup(n=8, tokens=4), "count": count}))
    dist.destroy_process_group()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rank0_tunes_and_every_rank_uses_its_configs(tmp_path):
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    procs = []
    for rank in range(2):
        env = {**base, "PYKERNELS_CACHE_DIR": str(tmp_path / f"rank{rank}")}
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, str(rank)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        outs.append(json.loads(out.strip().splitlines()[-1]))
    r0, r1 = outs
    assert r0["tuned"] == r1["tuned"] == [{"BLOCK": 32}, {"BLOCK": 32}]  # rank 0's choice
    assert r0["statuses"] == r1["statuses"] == ["tuned", "tuned"]  # rank 0's report
    assert r0["synced"] == r1["synced"] == {"BLOCK": 32}
    assert r0["count"] == r1["count"] == 1
    # Only rank 0 tuned and wrote; rank 1 wrote only the file it made itself.
    assert (tmp_path / "rank0" / "autotune" / "dist_op.json").exists()
    assert not (tmp_path / "rank1" / "autotune" / "dist_op.json").exists()
