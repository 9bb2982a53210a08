"""Shared fakes of the autotune tests (imported by name: tests/autotune is on sys.path)."""

from __future__ import annotations

import contextlib

from autotune.tuner import Case


class FakeBench:
    """A fake kernel for the tuner: run() remembers the config, the timer reports `times(cfg)`.
    Configs whose BLOCK is in `wrong` fail the reference check; in `crash` raise at launch; in
    `slow_crash` raise while timed."""

    def __init__(self, times=None, wrong=(), crash=(), timing_crash=()):
        self.times = times or (lambda cfg: 10.0 + cfg["BLOCK"] / 64)
        self.wrong, self.crash, self.timing_crash = set(wrong), set(crash), set(timing_crash)
        self.last = None
        self.timed: list[dict] = []
        self.shapes: list[dict] = []

    def make_case(self, shape):
        self.shapes.append(shape)

        def run(cfg, i):
            if cfg["BLOCK"] in self.crash:
                raise RuntimeError("launch failed")
            self.last = cfg

        def check(cfg):
            run(cfg, 0)
            if cfg["BLOCK"] in self.wrong:
                raise AssertionError("output differs from the reference")

        return Case(run, check)

    def timer(self, fn, n_inputs):
        fn(0)
        if self.last["BLOCK"] in self.timing_crash:
            raise RuntimeError("graph capture failed")
        self.timed.append(self.last)
        return self.times(self.last)


def default_cfg(**_):
    return {"BLOCK": 64, "num_warps": 4}


def shapes(*tokens, n=256, dtype="float16"):
    return [{"n": n, "dtype": dtype, "tokens": t} for t in tokens]


def other_env_meta(tunable, **changes):
    meta = dict(tunable.metadata())
    meta.update(changes or {"torch": "0.0.0-other"})
    return meta


@contextlib.contextmanager
def isolated_cache(tmp_path, monkeypatch, *unset_env: str):
    """A fresh autotune cache under tmp_path, no shipped configs, no tuning env overrides (plus
    `unset_env`), fresh memos and warn-once keys; yields the cache's autotune folder."""
    import autotune
    from autotune import shipped
    from pykernels import _log

    monkeypatch.setenv("PYKERNELS_CACHE_DIR", str(tmp_path / "cache"))
    for name in ("SGLANG_FLASHINFER_AUTOTUNE_CACHE", "TRITON_DISABLE_MACA_OPT_MMA_PREFETCH",
                 *unset_env):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(shipped, "CONFIGS_DIR", tmp_path / "configs")
    _log.warn_once.__kwdefaults__["_seen"].clear()
    autotune.set_batch_sizes(None)
    autotune.reset()
    try:
        yield tmp_path / "cache" / "autotune"
    finally:
        autotune.set_batch_sizes(None)
        autotune.reset()

