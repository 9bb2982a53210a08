"""pykernels: kernels for LLM serving on NVIDIA Hopper.

Ops are exposed lazily (module __getattr__), so `import pykernels.envs` from the autotune core
pulls in no kernel module and no import cycle can form.
"""

from __future__ import annotations

from pykernels import _lazy

__version__ = "0.1.0"

_LAZY = {
    "silu_and_mul": "pykernels.activation",
    "rms_norm": "pykernels.norm",
    "fused_add_rms_norm": "pykernels.norm",
}

__all__ = ["__version__", *_LAZY]


__getattr__, __dir__ = _lazy.exports(__name__, _LAZY, globals())
