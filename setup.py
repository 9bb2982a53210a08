"""Builds the CUDA extension pykernels._C from csrc/; everything else is in pyproject.toml.

The extension is built ahead of time only when a CUDA toolkit (nvcc) and a CUDA-enabled torch are
importable here, which needs `pip install --no-build-isolation ...` (an isolated build would not
see the installed torch). Otherwise the install is pure Python and the first use of a CUDA op
JIT-compiles csrc/ (pykernels/_build.py). PYKERNELS_BUILD_EXT=0/1/auto overrides;
TORCH_CUDA_ARCH_LIST (default 9.0a) picks the architectures.
"""

import importlib.util
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _load_by_path(name: str, path: Path):
    # pykernels/envs.py and _build.py are stdlib-only at import: load them without the package.
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _cuda_extension():
    envs = _load_by_path("_pykernels_envs", ROOT / "pykernels" / "envs.py")
    mode = envs.PYKERNELS_BUILD_EXT.strip().lower()
    if mode in ("0", "false", "no", "off"):
        return None
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        torch = None
    reason = None
    if torch is None:
        reason = "torch is not importable in the build environment (use --no-build-isolation)"
    elif torch.version.cuda is None:
        reason = f"torch {torch.__version__} is a CPU build"
    elif CUDA_HOME is None:
        reason = "no CUDA toolkit (nvcc) found; set CUDA_HOME"
    if reason is not None:
        if mode in ("1", "true", "yes", "on"):
            raise RuntimeError(f"PYKERNELS_BUILD_EXT=1 but pykernels._C cannot be built: {reason}")
        print(f"pykernels: not building pykernels._C ({reason}); CUDA ops will JIT-compile "
              "on first use", file=sys.stderr)
        return None
    build = _load_by_path("_pykernels_build", ROOT / "pykernels" / "_build.py")
    build.set_arch_list(envs.TORCH_CUDA_ARCH_LIST)
    ext = CUDAExtension(
        name="pykernels._C",
        sources=[str(p.relative_to(ROOT)) for p in build.sources()],
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={"cxx": build.CXX_FLAGS, "nvcc": build.NVCC_FLAGS},
        extra_link_args=build.link_flags(),
    )
    return ext, BuildExtension


_built = _cuda_extension()
if _built is None:
    setup()
else:
    setup(ext_modules=[_built[0]], cmdclass={"build_ext": _built[1]})
