"""Compiling csrc/ into the op library: the flags, ahead of time (setup.py), JIT, and compile-only.

Stdlib-only at import (setup.py loads this file by path); torch is imported inside functions.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
from pathlib import Path

CSRC = Path(__file__).resolve().parent.parent / "csrc"
# Let torch choose -std (c++17 up to torch 2.10, c++20 after): passing ours too makes nvcc fail.
CXX_FLAGS = ["-O3"]
NVCC_FLAGS = ["-O3", "-lineinfo"]  # -lineinfo: compute-sanitizer and ncu report source lines

log = logging.getLogger("pykernels.build")  # stdlib only: setup.py loads this file by path


def sources() -> list[Path]:
    if not CSRC.is_dir():
        raise RuntimeError(
            f"pykernels: CUDA sources not found at {CSRC}; install from a source checkout "
            "(pip install -e .) or build pykernels._C ahead of time"
        )
    return sorted(CSRC.rglob("*.cu")) + [CSRC / "torch_bindings.cpp"]


def link_flags() -> list[str]:
    """Link the C++ runtime the running torch uses, by path, so pykernels._C shares it.

    Some images' compilers (the GPU machines' /opt/gcc g++, 2026-11-21) link libstdc++ statically
    into a shared library. Its code then mixes with the process's libstdc++.so.6 data (locale
    facet ids: data symbols are not bound by -Bsymbolic-functions) and formatting an integer into
    an error message segfaulted. Naming the loaded libstdc++.so.6 first resolves every C++ runtime
    symbol there; an archive is then never searched for them.
    """
    import torch  # noqa: F401  (loads libstdc++.so.6 into this process)

    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libstdc++.so" in line}
    except OSError:  # not Linux
        return []
    return sorted(p for p in paths if p.startswith("/"))[:1]


def set_arch_list(arch_list: str) -> None:
    # torch.utils.cpp_extension reads the architectures from this variable.
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list


def _source_hash() -> str:
    digest = hashlib.sha256()
    for path in sorted(CSRC.rglob("*")):
        if path.suffix in (".cu", ".cuh", ".h", ".cpp"):
            digest.update(str(path.relative_to(CSRC)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def missing_piece() -> str | None:
    """Why csrc/ cannot be compiled here, or None when it can."""
    import torch
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        return (f"torch {torch.__version__} is a CPU build; the CUDA backend needs a CUDA build of "
                "torch and an NVIDIA GPU")
    if cpp_extension.CUDA_HOME is None:
        return "no CUDA toolkit found (nvcc); install it or set CUDA_HOME"
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja); it is needed to JIT-compile csrc/"
    return None


def jit_load() -> str:
    """JIT-compiles csrc/ into <PYKERNELS_CACHE_DIR>/jit/<tag>/ (reused while nothing changed)
    and loads it; returns the build folder."""
    import torch
    from torch.utils import cpp_extension

    from pykernels import envs

    reason = missing_piece()
    if reason is not None:
        raise RuntimeError(f"pykernels CUDA ops unavailable: {reason}")
    set_arch_list(envs.TORCH_CUDA_ARCH_LIST)
    tag = "-".join([
        f"torch{torch.__version__}", f"cuda{torch.version.cuda}",
        envs.TORCH_CUDA_ARCH_LIST.replace(" ", "_").replace(";", "_"), _source_hash(),
    ])
    build_dir = Path(envs.PYKERNELS_CACHE_DIR).expanduser() / "jit" / tag
    build_dir.mkdir(parents=True, exist_ok=True)
    log.info("JIT-compiling csrc/ into %s (first use only)", build_dir)
    cpp_extension.load(
        name="pykernels_C",
        sources=[str(s) for s in sources()],
        extra_include_paths=[str(CSRC)],
        extra_cflags=CXX_FLAGS,
        extra_cuda_cflags=NVCC_FLAGS,
        extra_ldflags=link_flags(),
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=envs.PYKERNELS_JIT_VERBOSE,
    )
    return str(build_dir)


# Torch's own nvcc defines (torch.utils.cpp_extension.COMMON_NVCC_FLAGS), repeated for the
# compile-only check, which runs nvcc directly.
_TORCH_NVCC_DEFINES = [
    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
]


def compile_check(nvcc: str = "nvcc", arch: str = "90a") -> list[tuple[str, bool, str]]:
    """Compiles (no link) every torch-free header through a small translation unit, then the
    launchers and bindings against the installed torch's headers, for sm_<arch>. For CI boxes
    without a GPU: syntax and type errors fail early. Returns (what, ok, compiler output)."""
    import sysconfig
    import tempfile

    from torch.utils import cpp_extension

    gencode = f"-gencode=arch=compute_{arch},code=sm_{arch}"
    torch_inc = [f"-I{p}" for p in cpp_extension.include_paths()]
    py_inc = f"-I{sysconfig.get_paths()['include']}"
    # The CPU wheel ships c10/cuda headers without their generated config header; skip it.
    torch_defs = ["-std=c++20", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", *_TORCH_NVCC_DEFINES]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for header in sorted(CSRC.rglob("*.cuh")):
            unit = Path(tmp) / (header.stem + "_check.cu")
            unit.write_text(f'#include "{header}"\n')
            cmd = [nvcc, gencode, "-std=c++17", "-O3", "-c", str(unit), "-o", f"{unit}.o"]
            results.append(_run(f"header {header.relative_to(CSRC)}", cmd))
        for source in sorted(CSRC.rglob("*.cu")):
            cmd = [nvcc, gencode, *torch_defs, *torch_inc, py_inc, f"-I{CSRC}", "-O3", "-c",
                   str(source), "-o", str(Path(tmp) / (source.stem + ".o"))]
            results.append(_run(f"launcher {source.relative_to(CSRC)}", cmd))
        bindings = CSRC / "torch_bindings.cpp"
        cmd = ["c++", "-std=c++20", "-fsyntax-only", *torch_inc, py_inc, f"-I{CSRC}", str(bindings)]
        results.append(_run("bindings torch_bindings.cpp", cmd))
    return results


def _run(what: str, cmd: list[str]) -> tuple[str, bool, str]:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return what, proc.returncode == 0, (proc.stdout + proc.stderr).strip()


if __name__ == "__main__":
    import sys

    failed = 0
    for what, ok, output in compile_check():
        print(f"{'ok  ' if ok else 'FAIL'} {what}")
        if not ok:
            failed += 1
            print(output)
    sys.exit(1 if failed else 0)
