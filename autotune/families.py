"""The tuning drivers, by family: `python -m autotune.<family>`. A new kernel family adds a line.
Top floor: importing a driver imports its kernels."""

from __future__ import annotations

import importlib

FAMILIES = {
    "norm": "autotune.norm",
    "activation": "autotune.activation",
    "attention": "autotune.attention",
    "moe": "autotune.moe",
    "gemm": "autotune.gemm",
}


def load(name: str):
    """The driver module of a family (its FAMILY object declares the ops)."""
    if name not in FAMILIES:
        raise SystemExit(f"unknown family {name!r}; choose one of {', '.join(FAMILIES)}")
    return importlib.import_module(FAMILIES[name])


def load_all() -> dict:
    """Import every driver so every Tunable is registered; a driver that fails to import (its
    kernel needs something missing here) is skipped with the reason."""
    out = {}
    for name, module in FAMILIES.items():
        try:
            out[name] = importlib.import_module(module)
        except Exception as err:  # e.g. no triton: show/diff still work on the files
            out[name] = err
    return out
