"""pykernels: kernels for LLM serving on NVIDIA Hopper.

Ops are exposed lazily (module __getattr__), so `import pykernels.envs` from the autotune core
pulls in no kernel module and no import cycle can form.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "silu_and_mul": "pykernels.activation",
    "rms_norm": "pykernels.norm",
    "fused_add_rms_norm": "pykernels.norm",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pykernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
