"""Loading the CUDA op library: the prebuilt pykernels._C when it loads, else a JIT build of csrc/.

Each family's cuda.py calls `load()` at import and registers its fakes right after, so importing a
cuda.py either gives working ops or raises BackendUnavailable saying what is missing.
"""

from __future__ import annotations

from pykernels import envs
from pykernels._log import get_logger

log = get_logger("ops")


class BackendUnavailable(RuntimeError):
    """A backend cannot run here; the message names the missing piece."""


_state: dict[str, str | None] = {"source": None, "error": None}


def load() -> str:
    """Makes torch.ops.pykernels.* available; returns 'prebuilt' or the JIT build folder."""
    if _state["source"] is not None:
        return _state["source"]
    if _state["error"] is not None:
        raise BackendUnavailable(_state["error"])
    try:
        _state["source"] = _load()
    except Exception as err:  # any failure to build or load means: no CUDA backend here
        _state["error"] = str(err)
        raise BackendUnavailable(_state["error"]) from err
    return _state["source"]


def _load() -> str:
    if not envs.PYKERNELS_USE_JIT:
        try:
            import pykernels._C  # noqa: F401  (registers the ops when loaded)

            return "prebuilt"
        except ImportError as err:
            if "No module named" not in str(err):
                # Built against another torch or CUDA: say so, then rebuild through the JIT.
                log.warning("prebuilt pykernels._C does not load (%s); JIT-compiling csrc/", err)
    from pykernels import _build

    return _build.jit_load()


def available() -> tuple[bool, str]:
    """(True, source) when the CUDA ops load here, else (False, the reason)."""
    try:
        return True, load()
    except BackendUnavailable as err:
        return False, str(err)
