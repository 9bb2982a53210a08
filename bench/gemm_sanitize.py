"""Tiny grid of the CUDA FP8 W8A16 GEMM for compute-sanitizer (issue 7 acceptance):

    compute-sanitizer --tool memcheck python -m bench.gemm_sanitize
    compute-sanitizer --tool racecheck python -m bench.gemm_sanitize   # shared memory

Every case is also checked against the reference, so a clean memcheck run is a correct one too.
Shapes are small (memcheck slows kernels ~100x) but cover both CTA widths (64/128 channels),
every token tile (8..64) with partial tiles, a K % 128 == 64 tail, per-channel and per-group
scales, one and several K splits with the lock and the atomic reduction, prefetch off (1 stage)
and deep pipelines, a row-strided x, and the wgmma path (last column) on sm_90.
"""

from __future__ import annotations

import torch

from pykernels._backends import wgmma_ready
from pykernels.quant import cuda, ref
from tests.quant._cases import CUDA_GROUP_TOL, TOL, close, make_weight, make_x, poisoned

CASES = [  # (m, n, k, group, block_n, block_m, splits, stages, atomic, wgmma)
    (1, 128, 256, -1, 128, 8, 1, 1, False, False),
    (3, 192, 320, -1, 64, 8, 2, 2, False, False),
    (17, 256, 448, 128, 128, 16, 3, 3, False, False),
    (33, 128, 4160, -1, 128, 32, 4, 4, True, False),
    (70, 64, 1088, 128, 64, 64, 5, 6, True, False),
    (5, 384, 640, 128, 128, 8, 2, 1, False, False),
    (2, 128, 320, -1, 128, 8, 1, 3, False, True),
    (40, 192, 4160, 128, 64, 32, 3, 4, False, True),
    (70, 256, 1088, -1, 128, 64, 2, 1, True, True),
    (13, 128, 640, 128, 128, 16, 1, 2, False, True),
]


def main() -> int:
    failures = 0
    wgmma_ok = wgmma_ready(torch.device("cuda"))
    for i, (m, n, k, group, bn, bm, splits, stages, atomic, wgmma) in enumerate(CASES):
        if wgmma and not wgmma_ok:
            print(f"case {i}: wgmma needs an sm_90 GPU: skipped")
            continue
        dt = torch.bfloat16 if i % 2 else torch.float16
        torch.manual_seed(i)
        w = make_weight(n, k, group, device="cuda")
        x = make_x(m, k, dt, device="cuda", strided=i % 3 == 1)
        want = poisoned(m, n, dtype=dt, device="cuda")
        ref.gemm(x, w.qweight, w.scales, want)
        got = poisoned(m, n, dtype=dt, device="cuda")
        cfg = {"block_n": bn, "block_m": bm, "splits": splits, "num_stages": stages,
               "wgmma": wgmma}
        torch.ops.pykernels.fp8_marlin_gemm(got, x, w.qweight, w.scales,
                                            cuda.new_locks(x.device), bn, bm, splits, stages,
                                            atomic, wgmma)
        try:
            close(got, want, (CUDA_GROUP_TOL if group > 0 else TOL)[dt])
            ok = True
        except AssertionError:
            ok = False
        failures += not ok
        err = (got.float() - want.float()).abs().max().item()
        print(f"case {i}: m={m} n={n} k={k} group={group} {cfg} atomic={atomic} "
              f"max|err| {err:.1e} {'OK' if ok else 'FAIL'}", flush=True)
    torch.cuda.synchronize()
    print("FAILED" if failures else "all cases OK")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
