"""The env registry: typed parsing, clear errors, docs kept current, the one-reader rule."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from pykernels import envs

ROOT = Path(__file__).resolve().parent.parent
REQUIRED = {
    "SGLANG_FLASHINFER_AUTOTUNE_CACHE": (bool, True),
    "TRITON_DISABLE_MACA_OPT_MMA_PREFETCH": (bool, False),
    "VLLM_ENABLE_MOE_ALIGN_BLOCK_SIZE_TRITON": (bool, False),
    "VLLM_FUSED_MOE_CHUNK_SIZE": (int, 32768),
    "VLLM_ATTENTION_BACKEND": (str, None),
    "VLLM_FLASHINFER_FORCE_TENSOR_CORES": (bool, False),
    "VLLM_TEST_FORCE_FP8_MARLIN": (bool, False),
    "VLLM_MARLIN_USE_ATOMIC_ADD": (bool, False),
    "SGLANG_EXPERT_DISTRIBUTION_RECORD_DIR": (str, None),
    "PYKERNELS_CACHE_DIR": (str, "~/.cache/pykernels"),
    "PYKERNELS_LOG_LEVEL": (str, "WARNING"),
}


def test_required_variables_registered_with_defaults(monkeypatch):
    registered = {v.name: v for v in envs.all_vars()}
    for name, (type_, default) in REQUIRED.items():
        monkeypatch.delenv(name, raising=False)
        assert registered[name].type is type_, name
        assert getattr(envs, name) == default, name
        assert registered[name].description


@pytest.mark.parametrize("text,value", [
    ("1", True), ("0", False), ("true", True), ("FALSE", False), ("Yes", True), ("no", False),
    ("ON", True), ("off", False), (" true ", True),
])
def test_bool_spellings(monkeypatch, text, value):
    monkeypatch.setenv("VLLM_MARLIN_USE_ATOMIC_ADD", text)
    assert envs.VLLM_MARLIN_USE_ATOMIC_ADD is value


def test_bad_values_name_the_variable(monkeypatch):
    monkeypatch.setenv("SGLANG_FLASHINFER_AUTOTUNE_CACHE", "maybe")
    with pytest.raises(ValueError, match="AUTOTUNE_CACHE='maybe' is not a boolean"):
        _ = envs.SGLANG_FLASHINFER_AUTOTUNE_CACHE
    monkeypatch.setenv("VLLM_FUSED_MOE_CHUNK_SIZE", "32k")
    with pytest.raises(ValueError, match="VLLM_FUSED_MOE_CHUNK_SIZE='32k' is not a valid int"):
        _ = envs.VLLM_FUSED_MOE_CHUNK_SIZE


def test_int_and_empty_values(monkeypatch):
    monkeypatch.setenv("VLLM_FUSED_MOE_CHUNK_SIZE", "4096")
    assert envs.VLLM_FUSED_MOE_CHUNK_SIZE == 4096
    monkeypatch.setenv("VLLM_FUSED_MOE_CHUNK_SIZE", "")
    assert envs.VLLM_FUSED_MOE_CHUNK_SIZE == 32768  # empty counts as unset


def test_alias_for_sglang_spelling(monkeypatch, tmp_path):
    monkeypatch.delenv("SGLANG_EXPERT_DISTRIBUTION_RECORD_DIR", raising=False)
    monkeypatch.setenv("SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR", str(tmp_path))
    assert envs.SGLANG_EXPERT_DISTRIBUTION_RECORD_DIR == str(tmp_path)
    monkeypatch.setenv("SGLANG_EXPERT_DISTRIBUTION_RECORD_DIR", "/primary")
    assert envs.SGLANG_EXPERT_DISTRIBUTION_RECORD_DIR == "/primary"


def test_unknown_attribute():
    with pytest.raises(AttributeError, match="no variable 'NOPE'"):
        _ = envs.NOPE


def test_docs_are_current():
    doc = ROOT / "docs" / "environment_variables.md"
    assert doc.read_text() == envs.markdown(), (
        "docs/environment_variables.md is stale: run "
        "`python -m pykernels.envs --markdown > docs/environment_variables.md`"
    )


def test_cli_prints_every_variable(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pykernels.envs"], capture_output=True,
                          text=True, cwd=tmp_path, check=True)
    for var in envs.all_vars():
        assert var.name in proc.stdout
    assert "RuntimeWarning" not in proc.stderr


# Reads of os.environ (not writes such as `os.environ[k] = v`) outside the registry.
_READ = re.compile(r"os\.getenv\(|os\.environ\.get\(|os\.environ\[[^\]]+\](?!\s*=[^=])")


def test_no_other_module_reads_the_environment():
    offenders = []
    for package in ("pykernels", "autotune", "bench", "serving"):
        for path in (ROOT / package).rglob("*.py"):
            if path.name == "envs.py" and path.parent.name == "pykernels":
                continue
            for lineno, line in enumerate(path.read_text().splitlines(), 1):
                if _READ.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()}")
    assert not offenders, "read these through pykernels.envs:\n" + "\n".join(offenders)
