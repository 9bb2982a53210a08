"""``python -m bench.norm``: RMSNorm and fused residual-add + RMSNorm, ours vs FlashInfer.

Both are memory-bound: the row reports TB/s over bytes read + written and the fraction of the
measured copy bandwidth. Issue 2's bar: the CUDA ops at >= 85% of the copy ceiling on the
``large`` preset (32768 x 8192 bf16 = 512 MiB per operand).

    python -m bench.norm --quick                  # llama-3-8b hidden + the large shape
    python -m bench.norm --backend cuda,fi --compare --model llama-3-70b
    python -m bench.norm --cpu --out /tmp/r       # tiny CPU smoke (torch; Triton interpreted)
"""

from __future__ import annotations

import argparse

import torch

from bench import cli, shapes
from bench.cli import Case, Family, Provider, main

KERNELS = ("rms_norm", "fused_add_rms_norm")
EPS = 1e-6
LARGE = (32768, 8192)  # tokens x hidden: 512 MiB in bf16, 8.5x the H200's L2 per operand
QUICK_TOKENS = (1, 64, 1024, 16384)
CPU_SHAPES = ((4, 128), (7, 111))  # aligned and odd hidden sizes, interpreter-cheap


def _nbytes(kernel: str, tokens: int, hidden: int, dtype: torch.dtype) -> int:
    # rms_norm reads x and writes out; the fused op reads x and residual and writes both back.
    # The weight (hidden elements) is read once per call.
    size = dtype.itemsize
    per_row = 2 if kernel == "rms_norm" else 4
    return (per_row * tokens + 1) * hidden * size


def case_for(kernel: str, tokens: int, hidden: int, dtype: torch.dtype, model: str = "") -> Case:
    return Case(kernel, {"tokens": tokens, "hidden": hidden}, dtype,
                nbytes=_nbytes(kernel, tokens, hidden, dtype), model=model)


def model_hiddens(model: str | None) -> list[tuple[int, str]]:
    """(hidden, model names) of one model or of every model in bench/shapes.py, deduplicated."""
    models = [shapes.get(model)] if model else list(shapes.MODELS.values())
    seen: dict[int, list[str]] = {}
    for m in models:
        seen.setdefault(m.hidden, []).append(m.name)
    return [(h, "+".join(names)) for h, names in seen.items()]


def make_cases(args: argparse.Namespace) -> list[Case]:
    if args.cpu:
        grid = [(t, h, "") for t, h in CPU_SHAPES]
    else:
        grid = cli.token_grid(args, model_hiddens, LARGE, QUICK_TOKENS)
    return [case_for(k, t, h, args.dtype, name) for k in KERNELS for t, h, name in grid]


def _inputs(case: Case, n: int, device: str, count: int) -> list[list[torch.Tensor]]:
    t, h = case.shape["tokens"], case.shape["hidden"]
    return [[torch.randn(t, h, dtype=case.dtype, device=device) for _ in range(count)]
            for _ in range(n)]


def _build(rms, fused):
    """A provider builder from rms(x, w, out) and fused(x, residual, w) calls."""

    def build(case: Case, n: int, device: str):
        w = torch.randn(case.shape["hidden"], dtype=case.dtype, device=device)
        if case.kernel == "rms_norm":
            sets = _inputs(case, n, device, 2)  # x, out
            return lambda i: rms(sets[i][0], w, sets[i][1])
        sets = _inputs(case, n, device, 2)  # x, residual (both updated in place)
        return lambda i: fused(sets[i][0], sets[i][1], w)

    return build


def _ours(backend: str) -> Provider:
    import pykernels

    def rms(x, w, out):
        return pykernels.rms_norm(x, w, EPS, out=out, backend=backend)

    def fused(x, r, w):
        return pykernels.fused_add_rms_norm(x, r, w, EPS, backend=backend)

    def backends_now():
        import pykernels.norm

        return pykernels.norm.backends()

    return Provider(backend, _build(rms, fused), available=cli.ours(backends_now, backend),
                    cpu=backend in ("torch", "triton"))


def _fi_rms(x, w, out):
    return cli.load("flashinfer.norm").rmsnorm(x, w, EPS, out=out)


def _fi_fused(x, r, w):
    return cli.load("flashinfer.norm").fused_add_rmsnorm(x, r, w, EPS)


FAMILY = Family(
    name="norm",
    description="RMSNorm and fused residual-add + RMSNorm: ours (cuda, triton, torch) vs "
                "FlashInfer (fi).",
    providers=(
        _ours("cuda"), _ours("triton"), _ours("torch"),
        Provider("fi", _build(_fi_rms, _fi_fused), available=cli.importable("flashinfer"),
                 hint=cli.FI_HINT, peer=True),
    ),
    cases=make_cases,
    presets=("default", "models", "large"),
)

if __name__ == "__main__":
    raise SystemExit(main(FAMILY))
