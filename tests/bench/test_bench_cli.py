"""The shared CLI: skip-with-hint, no-GPU behaviour, failures, and --cpu smokes of the families."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import types

import pandas as pd
import pytest
import torch

from bench import activation, attention, cli, norm, results
from bench.env_info import REPO_ROOT

NO_GPU = not torch.cuda.is_available()


def _build(case, n, device):
    x = torch.ones(case.shape["tokens"], device=device)
    return lambda i: x.mul(2)


def _broken(case, n, device):
    raise RuntimeError("kernel exploded [x]")


FAKE = cli.Family(
    name="fake",
    description="test family",
    providers=(
        cli.Provider("torch", _build, cpu=True),
        cli.Provider("fi", _build, available=lambda d: "flashinfer is not installed",
                     hint="pip install flashinfer-python", peer=True),
        cli.Provider("broken", _broken, cpu=True),
    ),
    cases=lambda args: [cli.Case("double", {"tokens": t}, args.dtype, nbytes=8 * t)
                        for t in (4, 8)],
)


def test_missing_backend_is_skipped_with_install_hint(tmp_path, capsys):
    status = cli.main(FAKE, ["--cpu", "--backend", "torch,fi", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert status == 0
    assert "skipped fi: flashinfer is not installed (pip install flashinfer-python)" in out
    assert "Traceback" not in out
    assert "double" in out and "tokens=4" in out  # the table came


@pytest.mark.skipif(importlib.util.find_spec("flashinfer") is not None,
                    reason="flashinfer is installed here")
def test_real_family_reports_flashinfer_hint(capsys):
    assert cli.main(norm.FAMILY, ["--cpu", "--backend", "fi", "--no-save"]) == 0
    assert "pip install flashinfer-python" in capsys.readouterr().out


def test_failing_provider_is_reported_and_fails_the_run(tmp_path, capsys):
    status = cli.main(FAKE, ["--cpu", "--backend", "torch,broken", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert status == 1
    assert "failed: RuntimeError: kernel exploded [x]" in out
    df = pd.read_csv(tmp_path / "cpu" / "results.csv")
    assert set(df.provider) == {"torch"}  # the failure wrote no rows
    with pytest.raises(RuntimeError, match="exploded"):
        cli.main(FAKE, ["--cpu", "--backend", "broken", "--no-save", "--traceback"])


def test_unknown_backend_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(FAKE, ["--cpu", "--backend", "nope"])
    assert exc.value.code == 2
    assert "unknown backend 'nope'" in capsys.readouterr().err


def test_backend_alias_selects_every_provider_of_it():
    chosen, skipped = cli.select_providers(attention.FAMILY, "fi", "cuda")
    assert {p.name for p in chosen} | {n for n, _ in skipped} == {"fi", "fi-tc"}
    chosen, _ = cli.select_providers(attention.FAMILY, "torch", "cpu")
    assert [p.name for p in chosen] == ["torch", "torch-sdpa"]


@pytest.mark.skipif(not NO_GPU, reason="checks the no-GPU path")
def test_without_gpu_says_so_and_exits_cleanly(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(results, "default_root", lambda: tmp_path)
    assert cli.main(norm.FAMILY, []) == 0
    out = capsys.readouterr().out
    assert "no CUDA GPU" in out and "--cpu" in out
    assert not any(tmp_path.iterdir())


def test_cpu_smoke_writes_nowhere_without_out(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(results, "default_root", lambda: tmp_path)
    assert cli.main(norm.FAMILY, ["--cpu", "--backend", "torch"]) == 0
    assert not any(tmp_path.iterdir())
    assert "wrote" not in capsys.readouterr().out


@pytest.mark.parametrize("family,kernels", [
    (norm.FAMILY, {"rms_norm", "fused_add_rms_norm"}),
    (activation.FAMILY, {"silu_and_mul"}),
])
def test_cpu_smoke_torch(family, kernels, tmp_path, capsys):
    status = cli.main(family, ["--cpu", "--backend", "torch", "--compare", "--out", str(tmp_path)])
    assert status == 0
    out = capsys.readouterr().out
    assert "vs torch" in out and "1.00x" in out
    df = pd.read_csv(tmp_path / "cpu" / "results.csv")
    assert set(df.kernel) == kernels and set(df.provider) == {"torch"}
    assert set(df.dtype) == {"fp32"} and set(df.device_slug) == {"cpu"}
    assert df[df.metric == "time"].value.gt(0).all()
    assert len(list((tmp_path / "cpu" / "runs").glob("*.json"))) == 1


@pytest.mark.parametrize("module", ["bench.norm", "bench.activation"])
def test_cpu_smoke_triton_interpreter(module, tmp_path):
    # TRITON_INTERPRET is read when a kernel is defined: it must be set before the process starts.
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-m", module, "--cpu", "--backend", "triton,torch", "--out",
         str(tmp_path)], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    df = pd.read_csv(tmp_path / "cpu" / "results.csv")
    assert set(df.provider) == {"triton", "torch"}


def test_fi_norm_and_activation_wiring(monkeypatch):
    # A stand-in with flashinfer.norm / flashinfer.activation's signatures, computed by the refs.
    from pykernels.activation.ref import silu_and_mul_ref
    from pykernels.norm.ref import fused_add_rms_norm_ref, rms_norm_ref

    def fused(x, residual, weight, eps=1e-6, enable_pdl=None):  # in place, returns None
        normed, r = fused_add_rms_norm_ref(x, residual, weight, eps)
        residual.copy_(r)
        fake.written = x.copy_(normed)

    def rmsnorm(x, weight, eps=1e-6, out=None, enable_pdl=None):
        return out.copy_(rms_norm_ref(x, weight, eps))

    fake = types.SimpleNamespace(
        rmsnorm=rmsnorm, fused_add_rmsnorm=fused,
        silu_and_mul=lambda x, out=None, enable_pdl=None: out.copy_(silu_and_mul_ref(x)))
    monkeypatch.setattr(cli, "load", lambda module="flashinfer": fake)
    for family, case in ((norm.FAMILY, norm.case_for("rms_norm", 3, 64, torch.float32)),
                         (norm.FAMILY, norm.case_for("fused_add_rms_norm", 3, 64, torch.float32)),
                         (activation.FAMILY, activation.case_for(3, 64, torch.float32))):
        fi = next(p for p in family.providers if p.name == "fi")
        ours = next(p for p in family.providers if p.name == "torch")
        torch.manual_seed(0)
        got = fi.build(case, 2, "cpu")(1)
        torch.manual_seed(0)
        want = ours.build(case, 2, "cpu")(1)
        if case.kernel == "fused_add_rms_norm":
            got, want = fake.written, want[0]
        torch.testing.assert_close(got, want)
