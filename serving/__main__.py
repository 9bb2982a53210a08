"""`python -m serving`: what this machine can serve with: device, versions, kernel backends.

`python -m serving generate --model qwen3-0.6b --quantization fp8`: greedy decoding through the
interim HF model runner (serving/hf.py), timed, with `--compare` against the unquantized model in
the same process. The engine and the HTTP server are not built yet; the report is what they will
print at start.
"""

from __future__ import annotations

import argparse
import sys

from serving.hf import QUANTIZATIONS


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


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected ints >= 1, got {text!r}")
    return values


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m serving",
        description="pykernels serving layer. Without a command: the kernels and backends "
                    "available here. The engine and OpenAI-compatible server are not built yet.",
    )
    sub = parser.add_subparsers(dest="command")
    gen = sub.add_parser("generate", help="greedy decoding through the HF model runner, timed")
    gen.add_argument("--model", default="qwen3-0.6b",
                     help="a preset (qwen3-0.6b, qwen3-8b, llama-3-8b, tiny; random weights) or "
                          "a local checkpoint directory")
    gen.add_argument("--quantization", default="none", choices=QUANTIZATIONS,
                     help="fp8: FP8 weight-only linears")
    gen.add_argument("--compare", action="store_true",
                     help="also run the unquantized model first, same weights, and compare")
    gen.add_argument("--batch-size", type=_int_list, default=[1], help="e.g. 1,32")
    gen.add_argument("--prompt-len", type=int, default=256)
    gen.add_argument("--new-tokens", type=int, default=128)
    gen.add_argument("--num-layers", type=int, default=None, help="keep the first N layers")
    gen.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    gen.add_argument("--device", default="cuda" if _cuda() else "cpu")
    gen.add_argument("--eager", action="store_true", help="no CUDA graph for the decode step")
    return parser


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "generate":
        from serving import generate

        return generate.main(args)
    rows = _report()
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
