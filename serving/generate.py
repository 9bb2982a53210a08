"""`python -m serving generate`: greedy decoding through serving/hf.py, timed per batch size.

With ``--compare`` the unquantized model runs first and the quantized one (the same weights,
converted in place) second, in one process: the table then gives the decode-step speedup and how
far the quantized model's prompt logits are from the unquantized ones (relative L2 error, and
whether the greedy first token agrees).
"""

from __future__ import annotations

import argparse
import json

import torch

from serving import hf


def _row(name: str, batch: int, d: hf.Decoded) -> dict:
    return {"quantization": name, "batch": batch, "prefill_ms": d.prefill_s * 1e3,
            "step_ms": d.step_s * 1e3, "tok_per_s": batch / d.step_s}


def _compare(row: dict, base: dict, d: hf.Decoded, ref: hf.Decoded) -> None:
    diff = (d.prompt_logits - ref.prompt_logits).norm() / ref.prompt_logits.norm()
    first = (d.tokens[:, 0] == ref.tokens[:, 0]).float().mean()
    row.update(step_speedup=base["step_ms"] / row["step_ms"], logits_rel_err=float(diff),
               first_token_agree=float(first))


def _print(rows: list[dict]) -> None:
    cols = ["quantization", "batch", "prefill_ms", "step_ms", "tok_per_s", "step_speedup",
            "logits_rel_err", "first_token_agree"]
    cols = [c for c in cols if any(c in r for r in rows)]
    print("  ".join(f"{c:>17}" for c in cols))
    for r in rows:
        cells = [r.get(c, "") for c in cols]
        print("  ".join(f"{v:>17.4g}" if isinstance(v, float) else f"{v!s:>17}"
                        for v in cells))


def main(args: argparse.Namespace) -> int:
    dtype = getattr(torch, args.dtype)
    model = hf.load_model(args.model, dtype=dtype, device=args.device,
                          num_layers=args.num_layers)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompts = {b: torch.randint(0, vocab, (b, args.prompt_len), generator=gen).to(args.device)
               for b in args.batch_size}
    runs = ["none", args.quantization] if args.compare and args.quantization != "none" else \
        [args.quantization]
    rows, done = [], {}
    for name in runs:
        hf.apply_quantization(model, name)
        for b, prompt in prompts.items():
            d = hf.greedy_decode(model, prompt, args.new_tokens, graph=not args.eager)
            row = _row(name, b, d)
            if name != "none" and ("none", b) in done:
                _compare(row, done[("none", b)][0], d, done[("none", b)][1])
            done[(name, b)] = (row, d)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\nserving generate: {args.model}, {args.dtype}, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, device {args.device}"
          f"{', eager steps' if args.eager else ''}")
    _print(rows)
    return 0
