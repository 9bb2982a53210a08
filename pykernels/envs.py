"""The one registry of environment variables read by pykernels, autotune, bench and serving.

No other module reads ``os.environ`` for these names: import this module and read the attribute,
e.g. ``envs.PYKERNELS_CACHE_DIR``. Values are parsed on every access, so a test or a user that
changes ``os.environ`` sees the new value at once; a malformed value raises ``ValueError`` naming
the variable and the value.

``python -m pykernels.envs`` prints every variable with its default and current value;
``python -m pykernels.envs --markdown`` prints ``docs/environment_variables.md``.

This module imports nothing from the package (autotune's core imports it), so keep it stdlib-only.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


@dataclass(frozen=True)
class EnvVar:
    """One variable: its type (bool/int/float/str), default (None = unset) and description."""

    name: str
    type: type
    default: Any
    description: str
    aliases: tuple[str, ...] = ()

    def raw(self) -> str | None:
        """The string set in the environment (the name first, then its aliases), or None."""
        for key in (self.name, *self.aliases):
            value = os.environ.get(key)
            if value is not None and value.strip() != "":
                return value
        return None

    def parse(self, text: str) -> Any:
        text = text.strip()
        if self.type is bool:
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise ValueError(
                f"{self.name}={text!r} is not a boolean: use one of 1/0, true/false, yes/no, on/off"
            )
        if self.type in (int, float):
            try:
                return self.type(text)
            except ValueError:
                raise ValueError(
                    f"{self.name}={text!r} is not a valid {self.type.__name__}"
                ) from None
        return text

    def get(self) -> Any:
        text = self.raw()
        return self.default if text is None else self.parse(text)


_REGISTRY: dict[str, EnvVar] = {}


def register(name, type_, default, description, aliases=()) -> EnvVar:
    if name in _REGISTRY:
        raise ValueError(f"environment variable {name} is registered twice")
    var = EnvVar(name, type_, default, description, tuple(aliases))
    _REGISTRY[name] = var
    return var


def all_vars() -> list[EnvVar]:
    return list(_REGISTRY.values())


def __getattr__(name: str) -> Any:
    var = _REGISTRY.get(name)
    if var is None:
        raise AttributeError(f"module 'pykernels.envs' has no variable {name!r}")
    return var.get()


# ---- autotuning --------------------------------------------------------------------------------
register("SGLANG_FLASHINFER_AUTOTUNE_CACHE", bool, True,
         "Reuse and extend the on-disk autotune cache. 0: tune afresh, write the result to "
         "<cache>/runs/<name>.<timestamp>.json and leave the cache file untouched.")
register("TRITON_DISABLE_MACA_OPT_MMA_PREFETCH", bool, False,
         "Turn main-loop prefetch off in every GEMM-like kernel (Triton: num_stages=1; CUDA: "
         "single-stage main loop without cp.async prefetch), overriding tuned configs.")
register("PYKERNELS_ENABLE_PDL", bool, True,
         "Programmatic dependent launch (Hopper and newer) where a kernel uses it (the Triton "
         "split-KV decode's split and merge kernels; fused_moe's two GEMMs and top-k sum). 0 "
         "launches them plainly, e.g. for a tool that cannot follow it.")
register("PYKERNELS_CACHE_DIR", str, "~/.cache/pykernels",
         "Root of the on-disk caches: autotune/ (tuned configs, runs/) and jit/ (CUDA builds).")
register("PYKERNELS_LOG_LEVEL", str, "WARNING",
         "Log level of the 'pykernels' loggers (DEBUG, INFO, WARNING, ERROR).")
register("PYKERNELS_GIT_SHA", str, None,
         "Git sha recorded in benchmark results, over what git answers (a tree copied to a "
         "GPU machine may have no .git or a stale one); unset: asked from git.")

# ---- building the CUDA extension -----------------------------------------------------------------
register("PYKERNELS_BUILD_EXT", str, "auto",
         "setup.py: build pykernels._C ahead of time. auto: when nvcc and a CUDA torch are "
         "present; "
         "1: always (fail if impossible); 0: never (first use JIT-compiles).")
register("TORCH_CUDA_ARCH_LIST", str, "9.0a",
         "CUDA architectures pykernels._C is built for, ahead of time or JIT (read by torch too).")
register("PYKERNELS_JIT_VERBOSE", bool, False,
         "Print the compiler's output while JIT-compiling csrc/.")
register("PYKERNELS_USE_JIT", bool, False,
         "Ignore a prebuilt pykernels._C and JIT-compile csrc/ (tests the JIT path).")
register("CUDA_HOME", str, None,
         "CUDA toolkit root for building csrc/ (read by torch too); unset: found from nvcc "
         "on PATH.")
register("TRITON_INTERPRET", bool, False,
         "Triton's own switch (read by Triton too): run Triton kernels on the CPU through its "
         "interpreter; pykernels then accepts CPU tensors for backend='triton'.")

# ---- MoE -----------------------------------------------------------------------------------------
register("VLLM_ENABLE_MOE_ALIGN_BLOCK_SIZE_TRITON", bool, False,
         "Use the Triton moe_align_block_size kernel instead of the CUDA one.")
register("VLLM_FUSED_MOE_CHUNK_SIZE", int, 32768,
         "fused_moe processes at most this many tokens per chunk, bounding its workspace.")
register("SGLANG_EXPERT_DISTRIBUTION_RECORD_DIR", str, None,
         "When set, record per-layer tokens per expert on the device and dump them as JSON here.",
         aliases=("SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR",))

# ---- attention -----------------------------------------------------------------------------------
register("VLLM_ATTENTION_BACKEND", str, None,
         "Default attention backend (triton, cuda, fi, fa, torch); unset: auto, the fastest tuned.")
register("VLLM_FLASHINFER_FORCE_TENSOR_CORES", bool, False,
         "Make the FlashInfer decode wrapper use tensor cores at every GQA ratio.")

# ---- quantized GEMM ------------------------------------------------------------------------------
register("VLLM_TEST_FORCE_FP8_MARLIN", bool, False,
         "Use the FP8 weight-only (W8A16) Marlin-style path even where a native FP8 W8A8 path "
         "exists.")
register("VLLM_MARLIN_USE_ATOMIC_ADD", bool, False,
         "Split-K reduction of the FP8 Marlin GEMM through atomicAdd instead of the lock-based "
         "one.")


def _fmt(value: Any) -> str:
    return "(unset)" if value is None else str(value)


def markdown() -> str:
    """The text of docs/environment_variables.md, generated from the registry."""
    lines = [
        "# Environment variables",
        "",
        "Generated by `python -m pykernels.envs --markdown > docs/environment_variables.md`;",
        "`tests/test_envs.py` fails when this file is out of date. Booleans accept",
        "1/0, true/false, yes/no, on/off in any case; an empty value counts as unset.",
        "",
        "| name | type | default | description |",
        "|---|---|---|---|",
    ]
    for var in all_vars():
        name = f"`{var.name}`"
        if var.aliases:
            name += " (alias " + ", ".join(f"`{a}`" for a in var.aliases) + ")"
        lines.append(f"| {name} | {var.type.__name__} | {_fmt(var.default)} | {var.description} |")
    return "\n".join(lines) + "\n"


def _main(argv: list[str]) -> int:
    if "--markdown" in argv:
        sys.stdout.write(markdown())
        return 0
    width = max(len(v.name) for v in all_vars())
    print(f"{'name':<{width}}  {'type':<5}  {'default':<18}  current")
    for var in all_vars():
        try:
            current = _fmt(var.get())
        except ValueError as err:
            current = f"INVALID ({err})"
        print(f"{var.name:<{width}}  {var.type.__name__:<5}  {_fmt(var.default):<18}  {current}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
