"""`python -m autotune.moe`: tune the fused-MoE Triton GEMMs.

    python -m autotune.moe --model mixtral                 # M = 1, 16, 64, 256, 1024, 4096
    python -m autotune.moe --model qwen3-30b-a3b --batch-sizes 1,2,4,8
    python -m autotune.moe --shape E=8,H=4096,I=14336,topk=2 --quant fp8_w8a8

Two ops, tuned in this order (one shape per MoE layer: E, H, I, topk, dtype, quant):

- ``fused_moe`` (Tunable ``fused_moe_triton``): the up GEMM with SiLU-and-mul fused, and
  BLOCK_SIZE_M, the align block size both GEMMs share. Timed as the whole layer (up, down at its
  current config where that fits the candidate's block, else the default; top-k sum; align
  excluded), so the BLOCK_SIZE_M choice pays for both GEMMs.
- ``fused_moe_down`` (``fused_moe_triton_down``): the down GEMM alone, at the BLOCK_SIZE_M the
  up op just chose (looked up when its case is built). Re-tuning the up op with another
  BLOCK_SIZE_M leaves the down entries valid (the launcher always runs down at up's
  BLOCK_SIZE_M) but tuned for another block: re-tune both (--force).

Search space, pruned per shape (all GEMM-like: prefetch on/off with num_stages):
BLOCK_SIZE_M within a factor 2 of the expected slots per expert (tokens * topk / E; vLLM's tuned
H200 configs sit at ~2x it, ../shared/ANCHORS.md); decode (<= 16 slots per expert, BLOCK_SIZE_M
16) searches thin N tiles, deep K tiles and deep pipelines (memory-bound); larger batches search
64/128-wide tiles with GROUP_SIZE_M 16 wherever an expert spans >= 2 blocks. Tiles needing more
than 128 fp32 accumulator registers per thread or ~200 KB of shared memory are dropped; warps
follow the tile size. Weight tiles by TMA on/off past decode, pipelined configs only. ~23-70
candidates per bucket, ~200-270 distinct compiles per model (the compile time dominates a cold
tune: 287 s for Mixtral and Qwen3 together on the H200, 160 s for DeepSeek-V3).
"""

from __future__ import annotations

import argparse
import functools
import math
import sys

import torch
import triton

from autotune.cli import Family, Op, dtype_of, input_sets
from autotune.cli import main as cli_main
from autotune.space import Space
from autotune.tuner import Case
from bench.moe import routing_logits
from pykernels import envs
from pykernels.moe import fused_moe_triton as kern
from pykernels.moe import ref
from pykernels.moe.quant import FP8_DTYPE, FP8_MAX, Fp8

MOE_M = [1, 16, 64, 256, 1024, 4096]  # bench.shapes.MOE_M, the ANCHORS grid
QUANTS = ("none", "fp8_w8a8")
SMEM_LIMIT = 200 * 1024  # of 227 KB per block on H100/H200; the rest for Triton's epilogue
MAX_ACC_REGS = 128  # fp32 accumulator values per thread before the tile spills

_COMMON = {"BLOCK_SIZE_K": [64, 128, 256], "GROUP_SIZE_M": [1, 16], "num_warps": [4, 8],
           "num_stages": [2, 3, 4, 5], "TMA": [False, True]}
UP_PARAMS = {"BLOCK_SIZE_M": [16, 32, 64, 128], "BLOCK_SIZE_N": [16, 32, 64, 128], **_COMMON}
DOWN_PARAMS = {"BLOCK_SIZE_N": [32, 64, 128, 256], **_COMMON}

# Reference-check tolerances (atol, rtol) on outputs of magnitude ~1: bf16 rounds the SiLU output
# and the result; fp8 may put a value that rounds differently in bf16 into another fp8 bin.
TOLERANCE = {torch.float32: (1e-3, 1e-3), torch.float16: (5e-3, 5e-3),
             torch.bfloat16: (3e-2, 3e-2), "fp8_w8a8": (6e-2, 6e-2)}


# ---- search space ----------------------------------------------------------------------------

def per_expert(shape: dict) -> float:
    return kern.slots_per_expert(shape["tokens"], shape["E"], shape["topk"])


def block_m_range(slots: float) -> tuple[int, int]:
    """BLOCK_SIZE_M candidates: [target / 2, 2 * target] around the expected slots per expert,
    within 16..128 (the lower end at most 64, so large batches still try 64-row tiles)."""
    target = 1 << max(0, math.ceil(math.log2(max(slots, 1))))
    return max(16, min(target // 2, 64)), max(16, min(2 * target, 128))


# (BLOCK_SIZE_K, num_stages) pairs searched: ~256-512 K values in flight at decode, where the
# GEMM streams weights (vLLM's tuned H200 decode configs: 64 x 5, 128 x 5, 256 x 3, 256 x 2), and
# 2-4 stages of 64/128 at larger batches (their 64 x 4, 128 x 3, 128 x 2). num_stages 1 is
# prefetch off, tried with 128-256 deep K tiles (and the only choice under
# TRITON_DISABLE_MACA_OPT_MMA_PREFETCH=1).
DECODE_PIPES = {(64, 5), (128, 3), (128, 4), (128, 5), (256, 2), (256, 3)}
LARGE_PIPES = {(64, 3), (64, 4), (128, 2), (128, 3)}


def _pipe_ok(bk: int, stages: int, decode: bool) -> bool:
    if stages == 1:
        return bk == (256 if decode else 128) or envs.TRITON_DISABLE_MACA_OPT_MMA_PREFETCH
    return (bk, stages) in (DECODE_PIPES if decode else LARGE_PIPES)


def _warps_ok(warps: int, acc: int, decode: bool) -> bool:
    """Accumulator values per program (acc) decide the warps: 4 warps up to 16K values (128
    registers a thread: a 64 x 128 gated tile, one 64 x 256 accumulator, compiles for sm_90 to
    254 registers without stack), 8 warps from 16K, or from 4K at decode (vLLM's 16 x 256
    decode tile runs 8 warps)."""
    if warps == 4:
        return acc <= 16384
    return acc >= 16384 or (decode and acc >= 4096)


def _regs_ok_without_prefetch(cfg: dict, bm: int, tiles: int, elt: int) -> bool:
    """num_stages 1 loads each tile through registers: accumulators plus the loaded A and B
    tiles must fit ~160 of 255 registers a thread (the sm_90 compile of a 16 x 128 x 256 gated
    tile at 4 warps, ~270 by this count, spilled 576 B of stack)."""
    threads = 32 * cfg["num_warps"]
    loaded = (bm + tiles * cfg["BLOCK_SIZE_N"]) * cfg["BLOCK_SIZE_K"] * elt / 4
    return (tiles * bm * cfg["BLOCK_SIZE_N"] + loaded) / threads <= 160


def _tile_ok(cfg: dict, bm: int, n_out: int, k: int, slots: float, tiles: int,
             elt: int) -> bool:
    bn, bk, group = cfg["BLOCK_SIZE_N"], cfg["BLOCK_SIZE_K"], cfg["GROUP_SIZE_M"]
    stages = cfg["num_stages"]
    if bn > max(16, triton.next_power_of_2(n_out)) or bk > max(16, triton.next_power_of_2(k)):
        return False
    decode = bm == 16 and slots <= 16  # weight streaming: thin N tiles, deep K pipelines
    if not _pipe_ok(bk, stages, decode) and bk >= min(64, k):
        return False
    if decode and group != 1:
        return False
    if cfg.get("TMA") and (decode or stages == 1):
        # Weight tiles by TMA timed within 1-4% of cp.async at decode on the H200 (shipped
        # configs, Mixtral and Qwen3 at 1-64 tokens) and 4-13% faster from 256 tokens on the
        # up GEMM (Mixtral 1024 tokens: 1233 -> 1090 us): searched where it pays, and only
        # pipelined (at num_stages 1 a TMA load waits like any other).
        return False
    if not decode and (bn < min(64, triton.next_power_of_2(n_out)) or
                       group != (16 if slots >= 2 * bm else 1)):
        return False
    if stages == 1 and not _regs_ok_without_prefetch(cfg, bm, tiles, elt):
        return False
    return _fits(cfg, bm, tiles, elt, decode)


def _fits(cfg: dict, bm: int, tiles: int, elt: int, decode: bool) -> bool:
    """The tile's accumulators suit its warps and its pipeline fits shared memory."""
    bn, bk = cfg["BLOCK_SIZE_N"], cfg["BLOCK_SIZE_K"]
    smem = cfg["num_stages"] * (bm * bk + tiles * bn * bk) * elt
    return _warps_ok(cfg["num_warps"], tiles * bm * bn, decode) and smem <= SMEM_LIMIT


def _elt(shape: dict) -> int:
    return 1 if shape["quant"] != "none" else dtype_of(shape).itemsize


def up_valid(cfg: dict, shape: dict) -> bool:
    slots = per_expert(shape)
    lo, hi = block_m_range(slots)
    bm = cfg["BLOCK_SIZE_M"]
    return lo <= bm <= hi and _tile_ok(cfg, bm, shape["I"], shape["H"], slots, 2, _elt(shape))


def down_valid(cfg: dict, shape: dict) -> bool:
    bm = _up_config(shape)["BLOCK_SIZE_M"]
    return _tile_ok(cfg, bm, shape["H"], shape["I"], per_expert(shape), 1, _elt(shape))


UP_SPACE = Space(UP_PARAMS, valid=up_valid)
DOWN_SPACE = Space(DOWN_PARAMS, valid=down_valid)


def _up_config(shape: dict) -> dict:
    """The up op's config now (tuned in this process, cached, shipped or default)."""
    fields = {k: shape[k] for k in kern.KEY}
    return kern.FUSED_MOE_UP.lookup(tokens=shape["tokens"], **fields)


# ---- inputs ------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _weights(E: int, H: int, I: int, dtype: str, quant: str, device: str):  # noqa: E741
    """w1, w2 (scaled so activations stay ~1) and the fp8 scales; one model at a time."""
    dt = getattr(torch, dtype)
    w1 = torch.randn(E, 2 * I, H, device=device) / math.sqrt(H)
    w2 = torch.randn(E, H, I, device=device) / math.sqrt(I)
    if quant == "none":
        return w1.to(dt), w2.to(dt), None, None
    # Per-tensor weight scales, dynamic per-token activations: the common serving setup.
    (q1, s1), (q2, s2) = _quantize(w1), _quantize(w2)
    return q1, q2, Fp8(s1, None), Fp8(s2, None)


def _quantize(w: torch.Tensor):
    scale = (w.abs().amax(dim=(1, 2)) / FP8_MAX).float()
    return (w / scale[:, None, None]).to(FP8_DTYPE), scale


# Input set i of a tune routes by bench.moe's seeded draw TUNE_SETS + i: every tune times the
# same routing, and not the draws the bench times (it rotates through at most 64 sets). With
# unseeded draws a decode bucket's time depended on how many experts the draw touched
# (Qwen3-30B-A3B at 16 tokens, 128 slots over 128 experts: 81-91 in three draws); one config
# timed 164 us in one H200 tune and 189 us in another, and 193 us in bench.moe whichever down
# config ran behind it.
TUNE_SETS = 1000


class _Layer:
    """Inputs of one bucket: weights, n routed input sets, buffers, the fp32 reference of set 0
    and the aligned routing per BLOCK_SIZE_M (built at check time, reused while timing)."""

    def __init__(self, shape: dict, device: str):
        E, H, I, topk, m = (shape[k] for k in ("E", "H", "I", "topk", "tokens"))  # noqa: E741
        self.dtype = dtype_of(shape)
        self.w1, self.w2, self.fp8_1, self.fp8_2 = _weights(E, H, I, str(shape["dtype"]),
                                                            shape["quant"], device)
        touched = min(E, m * topk) * (3 * H * I) * self.w1.element_size()
        self.n = min(8, input_sets(touched + m * H * self.dtype.itemsize, device))
        self.sets = []
        for i in range(self.n):
            x = torch.randn(m, H, device=device).to(self.dtype)
            logits = routing_logits(m, E, TUNE_SETS + i).to(device)
            weights, ids = ref.fused_topk(logits, topk, True)
            self.sets.append((x, weights, ids))
        self.out = torch.empty(m, H, dtype=self.dtype, device=device)
        self.ws = kern.Workspace(m, topk, I, H, self.dtype, torch.device(device),
                                 self.fp8_1 is not None)
        x, weights, ids = self.sets[0]
        kw = {} if self.fp8_1 is None else {"w1_scale": self.fp8_1.w_scale,
                                            "w2_scale": self.fp8_2.w_scale}
        self.expected = ref.fused_moe(x, self.w1, self.w2, weights, ids, act_dtype=self.dtype,
                                      **kw)
        self.tol = TOLERANCE["fp8_w8a8" if self.fp8_1 is not None else self.dtype]
        self.E = E
        self._routing: dict[int, list] = {}

    def routing(self, bm: int) -> list:
        if bm not in self._routing:
            self._routing[bm] = [kern.route(ids, bm, self.E) for _, _, ids in self.sets]
        return self._routing[bm]

    def layer(self, up_cfg: dict, down_cfg: dict, i: int) -> None:
        x, weights, _ = self.sets[i]
        r = self.routing(up_cfg["BLOCK_SIZE_M"])[i]
        kern.run_routed(self.out, x, self.w1, self.w2, weights, r, self.ws, up_cfg, down_cfg,
                        self.fp8_1, self.fp8_2)

    def check(self, up_cfg: dict, down_cfg: dict) -> None:
        self.out.fill_(float("nan"))
        self.layer(up_cfg, down_cfg, 0)
        atol, rtol = self.tol
        torch.testing.assert_close(self.out.float(), self.expected, atol=atol, rtol=rtol,
                                   msg=lambda m: f"fused_moe output differs from the "
                                                 f"reference: {m}")


def _down_config(shape: dict) -> dict:
    fields = {k: shape[k] for k in kern.KEY}
    return kern.FUSED_MOE_DOWN.lookup(tokens=shape["tokens"], **fields)


def down_for_block(down_cfg: dict, bm: int, shape: dict) -> dict:
    """The down config an up candidate with BLOCK_SIZE_M `bm` is timed with: the current one
    where its tile fits a bm-row block (accumulators and shared memory, as the down space
    prunes), else the untuned default. The current one was tuned at one block size: at Mixtral
    1024 tokens the down entry of a 64-row block (256-wide, 4 warps) behind a 128-row up tile
    holds 256 accumulators a thread and spills, and every 128-row up candidate timed 4000-4500
    us on an H200 where the best of them, behind a down tile that fits, runs the layer in 1515
    us against 1667 us for the 64-row tile the tuner kept."""
    if _fits(down_cfg, bm, 1, _elt(shape), bm == 16):
        return down_cfg
    return kern.default_config(shape["tokens"], shape["E"], shape["topk"], shape["quant"],
                               down=True)


def up_case(shape: dict, device: str) -> Case:
    layer, down_cfg = _Layer(shape, device), _down_config(shape)

    def run(config, i):
        layer.layer(config, down_for_block(down_cfg, config["BLOCK_SIZE_M"], shape), i)

    def check(config):
        layer.check(config, down_for_block(down_cfg, config["BLOCK_SIZE_M"], shape))

    return Case(run, check, layer.n)


def down_case(shape: dict, device: str) -> Case:
    layer, up_cfg = _Layer(shape, device), _up_config(shape)
    topk = shape["topk"]
    acts = []  # each set's SiLU output, computed once at the up config
    for i, (x, _, _) in enumerate(layer.sets):
        r = layer.routing(up_cfg["BLOCK_SIZE_M"])[i]
        layer.ws.act_rows(r.em)  # (and the fp8 copy the down stage quantizes into)
        act = torch.empty_like(layer.ws.act)
        kern.up_stage(x, layer.w1, act, r, topk, up_cfg, layer.fp8_1, layer.ws.xq, layer.ws.xs)
        acts.append(act)

    def run(config, i):
        r = layer.routing(up_cfg["BLOCK_SIZE_M"])[i]
        kern.down_stage(acts[i], layer.w2, layer.ws.y, layer.sets[i][1], r, config,
                        layer.fp8_2, layer.ws.aq, layer.ws.as_)

    def check(config):
        layer.check(up_cfg, config)

    return Case(run, check, layer.n)


# ---- shapes and the CLI ------------------------------------------------------------------------

_QUANT = {"value": "none"}  # --quant, read by the model presets


def _model_shapes(model) -> list[dict]:
    if not model.is_moe:
        return []
    return [{"E": model.num_experts, "H": model.hidden, "I": model.moe_intermediate,
             "topk": model.topk, "quant": _QUANT["value"]}]


FAMILY = Family(
    name="moe",
    description="Tune the fused-MoE Triton GEMMs (up + SiLU, then down). Shapes: --model "
                "presets or --shape E=8,H=4096,I=14336,topk=2; --quant none|fp8_w8a8.",
    ops={
        "fused_moe": Op(kern.FUSED_MOE_UP, UP_SPACE, up_case, _model_shapes),
        "fused_moe_down": Op(kern.FUSED_MOE_DOWN, DOWN_SPACE, down_case, _model_shapes),
    },
    default_models=("mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v3"),
)


def _prepare_argv(argv: list[str]) -> list[str]:
    """Strip --quant (set for the presets and added to --shape values without one) and default
    --batch-sizes to the MoE grid."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--quant", choices=QUANTS, default="none")
    args, rest = pre.parse_known_args(argv)
    _QUANT["value"] = args.quant
    out = []
    for i, arg in enumerate(rest):
        if i > 0 and rest[i - 1] == "--shape" and "quant=" not in arg:
            arg = f"{arg},quant={args.quant}"
        elif arg.startswith("--shape=") and "quant=" not in arg:
            arg = f"{arg},quant={args.quant}"
        out.append(arg)
    if not any(a == "--batch-sizes" or a.startswith("--batch-sizes=") for a in out):
        out += ["--batch-sizes", ",".join(map(str, MOE_M))]
    return out


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        print("moe options: --quant {none,fp8_w8a8} (default none): weight/activation format "
              "of the presets and of --shape values without quant=\n")
        return cli_main(FAMILY, args)
    return cli_main(FAMILY, _prepare_argv(args))


if __name__ == "__main__":
    raise SystemExit(main())
