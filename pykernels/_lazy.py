"""Lazy public names of a package (PEP 562): ``import pykernels`` (which the autotune core does
for ``pykernels.envs``) must not load Triton or the CUDA op library, so each package maps its
public names to the modules that define them and imports a module on first use."""

from __future__ import annotations

import importlib


def exports(package: str, table: dict[str, str], namespace: dict):
    """(``__getattr__``, ``__dir__``) for `package`: name -> defining module in `table`; a
    resolved name is cached in the package's `namespace` (its ``globals()``)."""

    def __getattr__(name: str):
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__():
        return sorted(set(namespace) | set(table))

    return __getattr__, __dir__
