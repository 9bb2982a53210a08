"""`python -m autotune.norm`: tune the Triton rms_norm and fused_add_rms_norm launch configs.

Search space per hidden size: BLOCK (one pass when BLOCK >= hidden, else BLOCK-wide chunks read
twice) and num_warps. Not GEMM-like: no prefetch dimension. Shapes: hidden from the model presets
(or --shape hidden=N), tokens from --batch-sizes.
"""

from __future__ import annotations

import torch
import triton

from autotune.cli import Family, Op, check_close, dtype_of, input_sets, main
from autotune.space import Space
from autotune.tuner import Case
from pykernels.norm import ref
from pykernels.norm import triton as kern

EPS = 1e-6
BLOCKS = [2 ** p for p in range(5, 15)]  # 32 .. 16384 (kern.ONE_PASS_MAX)
WARPS = [1, 2, 4, 8, 16]


def _valid(config: dict, shape: dict) -> bool:
    full = min(triton.next_power_of_2(shape["hidden"]), kern.ONE_PASS_MAX)
    block, per_thread = config["BLOCK"], config["BLOCK"] / (32 * config["num_warps"])
    # Chunks under 1/8 of the row only add loop trips; over ~32 values a thread spills.
    return full // 8 <= block <= full and 1 <= per_thread <= 32


SPACE = Space({"BLOCK": BLOCKS, "num_warps": WARPS}, valid=_valid)


def _inputs(shape: dict, device: str, n_tensors: int):
    dtype, m, h = dtype_of(shape), shape["tokens"], shape["hidden"]
    n = input_sets(n_tensors * m * h * dtype.itemsize, device)
    sets = [[torch.randn(m, h, dtype=dtype, device=device) for _ in range(n_tensors)]
            for _ in range(n)]
    weight = torch.randn(h, dtype=dtype, device=device)
    return sets, weight, n


def rms_norm_case(shape: dict, device: str) -> Case:
    sets, weight, n = _inputs(shape, device, 2)  # [x, out]
    expected = ref.rms_norm_ref(sets[0][0], weight, EPS)

    def run(config, i):
        x, out = sets[i]
        kern.rms_norm(out, x, weight, EPS, config=config)

    def check(config):
        sets[0][1].fill_(float("nan"))
        run(config, 0)
        check_close(sets[0][1], expected)

    return Case(run, check, n)


def fused_add_rms_norm_case(shape: dict, device: str) -> Case:
    sets, weight, n = _inputs(shape, device, 2)  # [x, residual], both updated in place
    x0, r0 = sets[0][0].clone(), sets[0][1].clone()
    expected, expected_res = ref.fused_add_rms_norm_ref(x0, r0, weight, EPS)

    def run(config, i):
        x, residual = sets[i]
        kern.fused_add_rms_norm(x, residual, weight, EPS, config=config)

    def check(config):
        x, residual = x0.clone(), r0.clone()
        kern.fused_add_rms_norm(x, residual, weight, EPS, config=config)
        check_close(residual, expected_res, "residual")
        check_close(x, expected, "x")

    return Case(run, check, n)


def _model_shapes(model) -> list[dict]:
    return [{"hidden": model.hidden}]


FAMILY = Family(
    name="norm",
    description="Tune the Triton RMSNorm kernels (rms_norm, fused_add_rms_norm).",
    ops={
        "rms_norm": Op(kern.RMS_NORM, SPACE, rms_norm_case, _model_shapes),
        "fused_add_rms_norm": Op(kern.FUSED_ADD_RMS_NORM, SPACE, fused_add_rms_norm_case,
                                 _model_shapes),
    },
)

if __name__ == "__main__":
    raise SystemExit(main(FAMILY))
