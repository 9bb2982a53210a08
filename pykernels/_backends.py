"""Backend dispatch shared by every op family: "auto" | "cuda" | "triton" | "torch" | ...

A family names its backends (name -> module path) and its `auto` order, fastest first as measured
on the GPU. Modules are imported on first use; one that fails to import is unavailable, with the
reason kept for the error message. Resolution is cached per (backend, device type) so the call path
after the first call is one dict lookup.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass, field
from types import ModuleType

import torch

from pykernels import envs
from pykernels._ops import BackendUnavailable


def hopper_or_newer(index: int | None) -> bool:
    """An sm_90+ GPU at CUDA device `index` (None: the current one): TMA, programmatic dependent
    launch."""
    return _capability(torch.cuda.current_device() if index is None else index)[0] >= 9


def wgmma_ready(device: torch.device) -> bool:
    """`device` runs sm_90a code (warpgroup MMAs): an H100 / H200, not a later architecture."""
    return device.type == "cuda" and _capability(
        torch.cuda.current_device() if device.index is None else device.index) == (9, 0)


def pdl_ready(device: torch.device) -> bool:
    """Programmatic dependent launch for kernels on `device` (Hopper and newer, unless
    PYKERNELS_ENABLE_PDL=0): such a kernel is scheduled while the one before it finishes and
    waits (`gdc_wait`) before it touches memory that kernel may write or read."""
    return device.type == "cuda" and hopper_or_newer(device.index) and envs.PYKERNELS_ENABLE_PDL


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    # Cached per concrete device (a capability query costs ~10 us of host time); a cache keyed
    # by None would keep the first current device's answer after the current device changed.
    return torch.cuda.get_device_capability(index)


def tma_ready(t: torch.Tensor) -> bool:
    """`t` can back a TMA descriptor: on a Hopper (or newer) GPU, with a contiguous last
    dimension, a 16-byte aligned base and every other stride a multiple of 16 bytes."""
    size = t.element_size()
    return (t.is_cuda and hopper_or_newer(t.device.index) and t.stride(-1) == 1
            and t.data_ptr() % 16 == 0 and all(s * size % 16 == 0 for s in t.stride()[:-1]))


# Backends that run only on CUDA tensors (triton too, unless TRITON_INTERPRET=1).
_CUDA_ONLY = {"cuda", "fi", "fa"}


@dataclass
class Family:
    name: str
    modules: dict[str, str]
    auto_order: tuple[str, ...]
    _resolved: dict[tuple[str, str], ModuleType] = field(default_factory=dict)
    _errors: dict[str, str] = field(default_factory=dict)

    def get(self, backend: str, device: torch.device) -> ModuleType:
        mod = self._resolved.get((backend, device.type))
        if mod is None:
            mod = self._resolve(backend, device)
            self._resolved[(backend, device.type)] = mod
        return mod

    def available(self) -> dict[str, str | None]:
        """Every backend with None when it imports, else the reason it cannot run."""
        out = {}
        for name in self.modules:
            try:
                self._import(name)
                out[name] = None
            except BackendUnavailable as err:
                out[name] = str(err)
        return out

    def _resolve(self, backend: str, device: torch.device) -> ModuleType:
        if backend == "auto":
            if device.type != "cuda":
                return self._import("torch")
            for name in self.auto_order:
                try:
                    return self._import(name)
                except BackendUnavailable:
                    continue
            return self._import("torch")
        if backend not in self.modules:
            choices = ", ".join(repr(b) for b in ("auto", *self.modules))
            raise ValueError(f"{self.name}: backend must be one of {choices}, got {backend!r}")
        on_cpu_ok = backend == "torch" or (backend == "triton" and envs.TRITON_INTERPRET)
        if device.type != "cuda" and not on_cpu_ok:
            hint = " (or set TRITON_INTERPRET=1)" if backend == "triton" else ""
            raise ValueError(
                f"{self.name}: backend {backend!r} needs CUDA tensors{hint}, got device {device}"
            )
        return self._import(backend)

    def _import(self, backend: str) -> ModuleType:
        if backend in self._errors:
            raise BackendUnavailable(self._errors[backend])
        try:
            return importlib.import_module(self.modules[backend])
        except (ImportError, BackendUnavailable) as err:
            self._errors[backend] = f"{self.name}: backend {backend!r} is unavailable: {err}"
            raise BackendUnavailable(self._errors[backend]) from err
