"""pykernels autotuner.

Two floors (see shared/DESIGN.md): this package's core (env, store, shipped, space, tunable, tuner,
dist, fi) imports only the standard library, pykernels.envs/_log and, lazily, torch/triton and
bench.timing, so kernel modules can declare a Tunable and look configs up without an import cycle.
The family drivers and CLIs (cli, norm, activation, show, diff, ship, acceptance) sit on top and
may import kernels and bench.

Kernel side::

    from autotune import Tunable
    RMS_NORM = Tunable("rms_norm", family="norm", key=("hidden", "dtype"), bucket="tokens",
                       default=lambda hidden, **_: default_config(hidden), sources=(__file__,))
    cfg = RMS_NORM.lookup(tokens=rows, hidden=hidden, dtype=x.dtype)

Driver side: a Space, a make_case(shape) -> Case, then ``tune(...)`` or the CLI machinery in
autotune.cli. See docs/autotune.md.
"""

from autotune.space import Space
from autotune.tunable import (
    Tunable,
    get,
    invalidate,
    registry,
    reset,
    set_batch_sizes,
)
from autotune.tuner import Case, Report, plan, tune

__all__ = [
    "Case", "Report", "Space", "Tunable", "get", "invalidate", "plan", "registry", "reset",
    "set_batch_sizes", "sync_configs", "tune", "flashinfer_autotune",
]


def __getattr__(name: str):
    # dist and fi are imported on first use only (torch.distributed / flashinfer).
    if name == "sync_configs":
        from autotune.dist import sync_configs

        return sync_configs
    if name == "flashinfer_autotune":
        from autotune.fi import flashinfer_autotune

        return flashinfer_autotune
    raise AttributeError(f"module 'autotune' has no attribute {name!r}")
