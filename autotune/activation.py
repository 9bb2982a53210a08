"""`python -m autotune.activation`: tune the Triton silu_and_mul launch config.

Search space per width d: BLOCK (columns per program; the grid is rows x ceil(d / BLOCK)) and
num_warps. Not GEMM-like: no prefetch dimension. Shapes: d from the model presets (the dense MLP
width, and the expert width of MoE models) or --shape d=N; tokens from --batch-sizes.
"""

from __future__ import annotations

import torch
import triton

from autotune.cli import Family, Op, check_close, dtype_of, input_sets, main
from autotune.space import Space
from autotune.tuner import Case
from pykernels.activation import ref
from pykernels.activation import triton as kern

BLOCKS = [2 ** p for p in range(5, 14)]  # 32 .. 8192
WARPS = [1, 2, 4, 8, 16]


def _valid(config: dict, shape: dict) -> bool:
    full = triton.next_power_of_2(shape["d"])
    per_thread = config["BLOCK"] / (32 * config["num_warps"])
    # Blocks wider than the row waste lanes; under 128 columns a program is mostly overhead.
    return min(128, full) <= config["BLOCK"] <= full and 1 <= per_thread <= 32


SPACE = Space({"BLOCK": BLOCKS, "num_warps": WARPS}, valid=_valid)


def silu_and_mul_case(shape: dict, device: str) -> Case:
    dtype, m, d = dtype_of(shape), shape["tokens"], shape["d"]
    n = input_sets(3 * m * d * dtype.itemsize, device)
    xs = [torch.randn(m, 2 * d, dtype=dtype, device=device) for _ in range(n)]
    outs = [torch.empty(m, d, dtype=dtype, device=device) for _ in range(n)]
    expected = ref.silu_and_mul_ref(xs[0])

    def run(config, i):
        kern.silu_and_mul(outs[i], xs[i], config=config)

    def check(config):
        outs[0].fill_(float("nan"))
        run(config, 0)
        check_close(outs[0], expected)

    return Case(run, check, n)


def _model_shapes(model) -> list[dict]:
    widths = [model.intermediate] + ([model.moe_intermediate] if model.is_moe else [])
    return [{"d": d} for d in dict.fromkeys(widths)]


FAMILY = Family(
    name="activation",
    description="Tune the Triton silu_and_mul kernel.",
    ops={"silu_and_mul": Op(kern.SILU_AND_MUL, SPACE, silu_and_mul_case, _model_shapes)},
)

if __name__ == "__main__":
    raise SystemExit(main(FAMILY))
