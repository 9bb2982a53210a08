"""Search spaces: the cartesian product of launch parameters, filtered per shape.

GEMM-like tunables get a `prefetch` dimension (on/off) tied to `num_stages`: prefetch off means
no software pipelining of the main loop (Triton: num_stages=1; CUDA: a single-stage loop without
cp.async of the next tile), prefetch on means num_stages >= 2. With
TRITON_DISABLE_MACA_OPT_MMA_PREFETCH=1 only prefetch-off configs are generated (and lookups force
it over any stored config, see Tunable.lookup).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

PREFETCH = "prefetch"
STAGES = "num_stages"


def canonical(config: Mapping) -> tuple:
    """A hashable, order-free form of a config (to dedupe and to compare winners)."""
    return tuple(sorted((k, v) for k, v in config.items()))


def force_prefetch_off(config: Mapping) -> dict:
    return {**config, PREFETCH: False, STAGES: 1}


def _prefetch_consistent(config: dict) -> dict | None:
    """Tie num_stages to prefetch: off -> 1 stage; on -> >= 2 stages (else the config is void)."""
    if not config.get(PREFETCH, True):
        return {**config, STAGES: 1}
    if config.get(STAGES, 2) < 2:
        return None
    return config


@dataclass(frozen=True)
class Space:
    """Launch parameters to search and a per-shape filter.

    Parameters
    ----------
    params : {name: values}
        E.g. ``{"BLOCK_M": [64, 128], "num_warps": [4, 8], "num_stages": [2, 3, 4]}``. For a
        GEMM-like tunable, ``prefetch`` defaults to ``[True, False]`` when absent and
        ``num_stages`` is required.
    valid : callable(config, shape) -> bool, optional
        Drops configs that cannot work or make no sense for a shape (registers, shared memory,
        blocks far larger than the problem). Wrong results are caught later by the reference
        check; this only saves time.
    """

    params: Mapping[str, Sequence]
    valid: Callable[[dict, Mapping], bool] | None = None
    extra: Sequence[Mapping] = field(default_factory=tuple)  # hand-picked configs to add

    def configs(self, shape: Mapping, *, gemm_like: bool = False,
                prefetch_off: bool = False) -> list[dict]:
        """The distinct candidate configs for `shape`, in a stable order."""
        params = dict(self.params)
        if gemm_like:
            if STAGES not in params:
                raise ValueError("a GEMM-like search space needs a 'num_stages' parameter")
            params.setdefault(PREFETCH, [True, False])
            if prefetch_off:
                params[PREFETCH] = [False]
        names = list(params)
        raw = [dict(zip(names, values)) for values in itertools.product(*params.values())]
        out, seen = [], set()
        for config in [*raw, *map(dict, self.extra)]:
            if gemm_like:
                config = force_prefetch_off(config) if prefetch_off else config
                config = _prefetch_consistent(config)
                if config is None:
                    continue
            if self.valid is not None and not self.valid(config, shape):
                continue
            key = canonical(config)
            if key not in seen:
                seen.add(key)
                out.append(config)
        return out
