"""Where a benchmark ran: device, driver/CUDA, library versions and git revision.

Every results row carries these fields so a number can be traced to the machine and the code that
produced it; the device slug names the results folder (``results/nvidia-h200/``) so series from
different GPUs never mix.
"""

from __future__ import annotations

import functools
import importlib.metadata
import re
import subprocess
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
CPU_SLUG = "cpu"


def device_slug(name: str) -> str:
    """Folder name for a device: lower case, runs of other characters folded to one dash.

    Examples
    --------
    >>> device_slug("NVIDIA H100 80GB HBM3")
    'nvidia-h100-80gb-hbm3'
    """
    slug = re.sub(r"[^a-z0-9]+", "-", name.strip().lower()).strip("-")
    return slug or "unknown"


def _version(*dists: str) -> str:
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return ""


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


@functools.lru_cache(maxsize=1)
def git_revision() -> tuple[str, bool | str]:
    """(HEAD sha, dirty) of the checkout bench/ lives in.

    PYKERNELS_GIT_SHA, when set, wins with dirty unknown (""): a tree copied to a GPU machine
    may carry a `.git` from an earlier copy (run ids of one session all named its first sha).
    Without it, git answers; a tree without .git records ("unknown", "").
    """
    from pykernels import envs

    if envs.PYKERNELS_GIT_SHA:
        return envs.PYKERNELS_GIT_SHA, ""
    sha = _run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT)
    if not sha:
        return "unknown", ""
    # Untracked files (new result files, scratch scripts) do not change what was measured.
    dirty = bool(_run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT))
    return sha, dirty


@functools.lru_cache(maxsize=1)
def driver_version() -> str:
    """NVIDIA driver version from NVML when installed, else nvidia-smi; "" when neither answers."""
    try:
        import pynvml  # nvidia-ml-py; optional

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # not installed, or no driver: fall back to the CLI
        pass
    out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return out.splitlines()[0].strip() if out else ""


def _device_fields(device: str) -> dict:
    if device == "cpu" or not torch.cuda.is_available():
        return {"device": "cpu", "device_slug": CPU_SLUG, "compute_capability": "",
                "driver": "", "cuda": torch.version.cuda or ""}
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    name = torch.cuda.get_device_name(index)
    major, minor = torch.cuda.get_device_capability(index)
    return {"device": name, "device_slug": device_slug(name),
            "compute_capability": f"{major}.{minor}", "driver": driver_version(),
            "cuda": torch.version.cuda or ""}


def collect(device: str = "cuda") -> dict:
    """The environment fields of a results row.

    Parameters
    ----------
    device : str
        ``"cuda"`` (or ``"cuda:N"``) for the GPU the run uses, ``"cpu"`` for a smoke run.

    Returns
    -------
    dict with keys device, device_slug, compute_capability, driver, cuda, torch, triton,
    flashinfer, pykernels, git_sha, git_dirty. Missing pieces are "" (never an exception).
    """
    import pykernels

    sha, dirty = git_revision()
    return {
        **_device_fields(device),
        "torch": torch.__version__,
        "triton": _version("triton", "pytorch-triton"),
        "flashinfer": _version("flashinfer-python", "flashinfer"),
        "pykernels": pykernels.__version__,
        "git_sha": sha,
        "git_dirty": dirty,
    }
