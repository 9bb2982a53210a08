"""``python -m bench.activation``: SiLU-and-mul of a fused gate/up projection, ours vs FlashInfer.

Memory-bound: reads ``[tokens, 2d]``, writes ``[tokens, d]``; the row reports TB/s over bytes
read + written and the fraction of the measured copy bandwidth. Issue 2's bar: CUDA at >= 85%
of the copy ceiling on the ``large`` preset (16384 x 2*14336 bf16 = 896 MiB in).

    python -m bench.activation --quick
    python -m bench.activation --backend cuda,fi --compare --model mixtral
    python -m bench.activation --cpu --out /tmp/r
"""

from __future__ import annotations

import argparse

import torch

from bench import cli, shapes
from bench.cli import Case, Family, Provider, main

KERNEL = "silu_and_mul"
LARGE = (16384, 14336)  # tokens x d (Llama-3-8B's MLP width): 896 MiB in, 448 MiB out in bf16
QUICK_TOKENS = (1, 64, 1024, 16384)
CPU_SHAPES = ((4, 128), (7, 111))


def case_for(tokens: int, d: int, dtype: torch.dtype, model: str = "") -> Case:
    nbytes = 3 * tokens * d * dtype.itemsize  # 2d read + d written per token
    return Case(KERNEL, {"tokens": tokens, "intermediate": d}, dtype, nbytes=nbytes, model=model)


def model_widths(model: str | None) -> list[tuple[int, str]]:
    """(d, model names): each model's dense MLP width, plus its per-expert width for MoE
    models (the activation then runs on the routed tokens), deduplicated."""
    models = [shapes.get(model)] if model else list(shapes.MODELS.values())
    seen: dict[int, list[str]] = {}
    for m in models:
        seen.setdefault(m.intermediate, []).append(m.name)
        if m.is_moe and m.moe_intermediate != m.intermediate:
            seen.setdefault(m.moe_intermediate, []).append(f"{m.name}:expert")
    return [(d, "+".join(names)) for d, names in seen.items()]


def make_cases(args: argparse.Namespace) -> list[Case]:
    if args.cpu:
        return [case_for(t, d, args.dtype, "") for t, d in CPU_SHAPES]
    grid = cli.token_grid(args, model_widths, LARGE, QUICK_TOKENS)
    return [case_for(t, d, args.dtype, name) for t, d, name in grid]


def _build(call):
    """A provider builder from call(x, out)."""

    def build(case: Case, n: int, device: str):
        t, d = case.shape["tokens"], case.shape["intermediate"]
        xs = [torch.randn(t, 2 * d, dtype=case.dtype, device=device) for _ in range(n)]
        outs = [torch.empty(t, d, dtype=case.dtype, device=device) for _ in range(n)]
        return lambda i: call(xs[i], outs[i])

    return build


def _ours(backend: str) -> Provider:
    import pykernels

    def call(x, out):
        return pykernels.silu_and_mul(x, out=out, backend=backend)

    def backends_now():
        import pykernels.activation

        return pykernels.activation.backends()

    return Provider(backend, _build(call), available=cli.ours(backends_now, backend),
                    cpu=backend in ("torch", "triton"))


def _fi(x, out):
    return cli.load("flashinfer.activation").silu_and_mul(x, out=out)


FAMILY = Family(
    name="activation",
    description="silu_and_mul (gate/up fused): ours (cuda, triton, torch) vs FlashInfer (fi).",
    providers=(
        _ours("cuda"), _ours("triton"), _ours("torch"),
        Provider("fi", _build(_fi), available=cli.importable("flashinfer"),
                 hint=cli.FI_HINT, peer=True),
    ),
    cases=make_cases,
    presets=("default", "models", "large"),
)

if __name__ == "__main__":
    raise SystemExit(main(FAMILY))
