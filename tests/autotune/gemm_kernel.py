"""A tiny GEMM-like Triton kernel for the prefetch tests: C = A @ B with tl.dot, `num_stages` as
the main-loop prefetch (software pipelining) switch.

Its launcher has a deliberate, realistic bug: it only runs K // BLOCK_K full tiles (as kernels
that assume K % BLOCK_K == 0 do), so a config whose BLOCK_K does not divide K gives a wrong
result without any out-of-bounds access. The tuner must discard exactly those configs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

import autotune


@triton.jit
def _matmul_kernel(a_ptr, b_ptr, c_ptr, M, N, K_TILES, sam, sak, sbk, sbn, scm, scn,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for t in range(0, K_TILES):
        k = t * BLOCK_K + rk
        a = tl.load(a_ptr + rm[:, None] * sam + k[None, :] * sak, mask=rm[:, None] < M, other=0.0)
        b = tl.load(b_ptr + k[:, None] * sbk + rn[None, :] * sbn, mask=rn[None, :] < N, other=0.0)
        acc += tl.dot(a, b)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(c_ptr + rm[:, None] * scm + rn[None, :] * scn, acc.to(c_ptr.dtype.element_ty),
             mask=mask)


def default_config(**_):
    return {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2,
            "prefetch": True}


TINY_GEMM = autotune.Tunable("tiny_gemm", family="test_gemm", key=("N", "K", "dtype"),
                             bucket="M", default=default_config, gemm_like=True,
                             sources=(__file__,))

SPACE = autotune.Space({"BLOCK_M": [16, 32], "BLOCK_N": [16], "BLOCK_K": [16, 32],
                        "num_warps": [4], "num_stages": [1, 3]})


def matmul(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, config: dict | None = None):
    M, K = a.shape
    N = b.shape[1]
    cfg = config or TINY_GEMM.lookup(M=M, N=N, K=K, dtype=a.dtype)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))
    _matmul_kernel[grid](a, b, c, M, N, K // cfg["BLOCK_K"], a.stride(0), a.stride(1),
                         b.stride(0), b.stride(1), c.stride(0), c.stride(1),
                         BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                         num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def make_case(shape: dict, device: str) -> autotune.Case:
    dtype = getattr(torch, shape["dtype"])
    a = torch.randn(shape["M"], shape["K"], dtype=dtype, device=device)
    b = torch.randn(shape["K"], shape["N"], dtype=dtype, device=device)
    c = torch.empty(shape["M"], shape["N"], dtype=dtype, device=device)
    expected = (a.float() @ b.float()).to(dtype)

    def run(config, i):
        matmul(a, b, c, config)

    def check(config):
        c.fill_(float("nan"))
        run(config, 0)
        torch.testing.assert_close(c, expected, atol=1e-2, rtol=1e-2)

    return autotune.Case(run, check)
