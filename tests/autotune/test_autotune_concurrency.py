"""Several processes writing one cache: no lost entry, no torn file, no stale lock."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

from autotune import store

# Each writer tunes its own buckets of the same tunable through the real tune() (a fake kernel
# and timer), so every bucket is one locked read-merge-write racing the 7 others.
WRITER = textwrap.dedent("""
    import sys, time
    import autotune
    from autotune.tuner import Case

    # Fixed metadata: keeps torch out of the child (a fast start), the lock path is the real one.
    autotune.env.collect = lambda sources=(): {"format": 1, "gpu": "fake", "torch": "x"}
    rank, start_at = int(sys.argv[1]), float(sys.argv[2])
    time.sleep(max(0.0, start_at - time.time()))  # all 8 start writing together
    t = autotune.Tunable("shared_op", family="fake", key=("n",), bucket="tokens",
                         default=lambda **_: {"BLOCK": 64})
    space = autotune.Space({"BLOCK": [32, 64, 128]})
    case = Case(run=lambda cfg, i: None, check=lambda cfg: None)
    shapes = [{"n": rank, "tokens": 2 ** i} for i in range(12)]
    report = autotune.tune(t, space, shapes, lambda shape: case,
                           timer=lambda fn, n: (fn(0), 1.0)[1])
    assert all(r.status == "tuned" for r in report.results), report
    print("done", rank)
""")

HOLDER = textwrap.dedent("""
    import sys, time
    from autotune import store
    with store.locked("held_op"):
        print("locked", flush=True)
        time.sleep(600)
""")


def test_eight_concurrent_writers_lose_nothing(cache_dir):
    start_at = str(time.time() + 2.0)
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(rank), start_at],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(8)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    files = sorted(p.name for p in cache_dir.iterdir())
    assert files == [".shared_op.lock", "shared_op.json"]  # no temp file left behind
    data = json.loads((cache_dir / "shared_op.json").read_text())  # whole, valid JSON
    keys = set(data["entries"])
    assert keys == {f"n={r},tokens={2 ** i}" for r in range(8) for i in range(12)}


def test_killed_lock_holder_does_not_block(cache_dir):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        # While it lives, the lock is really held...
        start = time.monotonic()
        try:
            with store.locked("held_op", timeout=0.2):
                raise AssertionError("acquired a lock another live process holds")
        except TimeoutError as err:
            assert "held_op" in str(err)
        assert time.monotonic() - start < 5
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
    # ...and once the holder is killed (no clean release), the next writer gets it at once.
    start = time.monotonic()
    path = store.merge("held_op", {"format": 1}, {"k": {"shape": {}, "config": {}}}, {},
                       timeout=5)
    assert time.monotonic() - start < 2
    assert store.read(path)[0] == "ok"
