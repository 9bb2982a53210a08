"""Tiny grid of the CUDA attention kernels for compute-sanitizer (issue 5 acceptance):

    compute-sanitizer --tool memcheck python -m bench.attention_sanitize
    compute-sanitizer --tool racecheck python -m bench.attention_sanitize   # shared memory

Every case is also checked against the reference, so a clean memcheck run is a correct one too.
Shapes are small (memcheck slows kernels ~100x) but cover one and many splits (the last-CTA
merge), partial tiles, empty requests, windows, soft cap, fp8, every head_dim, GQA groups 1 to 16,
page sizes 1/5/16, strided q, and the append kernel with padding slots.
"""

from __future__ import annotations

import torch

from pykernels import attention
from pykernels.attention import ref
from tests.attention._cases import TOL, Paged

CASES = [  # (q heads, kv heads, head_dim, page size, kv dtype, splits, options)
    (32, 8, 128, 16, None, 1, {}),
    (32, 8, 128, 16, None, 5, {}),
    (8, 8, 64, 1, None, 3, {"window_left": 7}),
    (12, 2, 256, 5, None, 2, {"logits_soft_cap": 10.0}),
    (16, 1, 128, 16, torch.float8_e4m3fn, 4, {"k_scale": 0.5, "v_scale": 2.0}),
    (40, 8, 64, 16, torch.float8_e4m3fn, 1, {}),
    (32, 2, 128, 16, None, 3, {"num_stages": 2}),
    (8, 1, 256, 16, torch.float8_e4m3fn, 2, {"num_stages": 3}),
]


def main() -> int:
    failures = 0
    for i, (hq, hkv, d, ps, kv_dtype, splits, kw) in enumerate(CASES):
        kw = dict(kw)
        cfg = {k: kw.pop(k) for k in list(kw) if k == "num_stages"}  # a launch knob, not math
        dt = torch.bfloat16 if i % 2 else torch.float16
        p = Paged([1, 70, 0, 133, 16], ps, hkv, d, dt, device="cuda", kv_dtype=kv_dtype, seed=i)
        q = p.q(hq, d, dt, strided=i % 2 == 1)
        got = attention.paged_decode(q, p.cache, *p.table, backend="cuda",
                                     config={"num_splits": splits, **cfg}, **kw)
        want = ref.decode_ref(q, p.cache, *p.table, **kw)
        err = (got.float() - want).abs().max().item()
        atol, rtol = TOL[dt]  # the tests' per-dtype tolerance (P is rounded to dt before P.V)
        ok = bool(((got.float() - want).abs() <= atol + rtol * want.abs()).all())
        failures += not ok
        print(f"decode case {i}: {hq}q/{hkv}kv d{d} p{ps} splits={splits} {kw} max|err| {err:.1e} "
              f"{'OK' if ok else 'FAIL'}", flush=True)
    for kv_dtype in (torch.bfloat16, torch.float8_e4m3fn):
        p = Paged([30, 3], 16, 2, 128, torch.bfloat16, device="cuda", kv_dtype=kv_dtype)
        qkv = torch.randn(4, 12, 128, dtype=torch.bfloat16, device="cuda")
        k, v = qkv[:, 8:10], qkv[:, 10:12]
        slots = torch.tensor([0, -1, 31, 40], device="cuda")
        want = p.cache.clone()
        ref.append_ref(k, v, want, slots, 0.5, 0.25)
        attention.append_paged_kv(k, v, p.cache, slots, k_scale=0.5, v_scale=0.25,
                                  backend="cuda")
        ok = torch.equal(p.cache.view(torch.uint8), want.view(torch.uint8))
        failures += not ok
        print(f"append {kv_dtype}: {'OK' if ok else 'FAIL'}", flush=True)
    torch.cuda.synchronize()
    print("sanitize grid:", "all OK" if not failures else f"{failures} FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
