"""`python -m serving`: what this machine can serve with: device, versions, kernel backends.

The engine and the HTTP server are not built yet; this report is what they will print at start.
"""

from __future__ import annotations

import argparse
import sys


def _report() -> list[tuple[str, str]]:
    import torch

    import pykernels
    from pykernels import activation, norm

    rows = [("pykernels", pykernels.__version__), ("torch", torch.__version__)]
    try:
        import triton

        rows.append(("triton", triton.__version__))
    except ImportError:
        rows.append(("triton", "not installed"))
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        rows.append(("device", f"{props.name} (sm_{props.major}{props.minor})"))
    else:
        rows.append(("device", "no CUDA GPU: ops run through the torch reference"))
    for family, backends in (("silu_and_mul", activation.backends()),
                             ("rms_norm", norm.backends())):
        for name, reason in backends.items():
            rows.append((f"{family}[{name}]", "ok" if reason is None else f"unavailable: {reason}"))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m serving",
        description="pykernels serving layer. The engine and OpenAI-compatible server are not "
                    "built yet; this prints the kernels and backends available here.",
    )
    parser.parse_args(argv)
    rows = _report()
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
