"""``python -m bench.moe``: fused MoE (two grouped GEMMs + SiLU-and-mul + top-k sum) and its align.

Shapes: the MoE models of bench/shapes.py (mixtral-8x7b E=8 top2 H=4096 I=14336, qwen3-30b-a3b
E=128 top8 H=2048 I=768, deepseek-v3 E=256 top8 H=7168 I=2048) over ``shapes.MOE_M`` tokens.
Routing: seeded random logits -> ``fused_topk`` (softmax top-k renormalized for Mixtral and
Qwen3, sigmoid top-8 renormalized for DeepSeek; no grouped top-k); weights ~ N(0, 1/fan_in).

Kernels (the ``kernel`` column):

- ``fused_moe``: align excluded, the work of ../shared/ANCHORS.md: the Triton launcher's own
  steps (pykernels.moe.fused_moe_triton: chunk_configs -> route -> run_routed) with route(), the
  align, run once per input set outside the timing, at the block size the tuned config picks
  (``routed_call``); checked once against the public call. The torch backend has no align step:
  its row is its whole call. The Mixtral and Qwen3 bf16 rows carry the stored reference time in
  their note (vLLM's tuned Triton kernel measured on an H200: a number from the anchors file, not
  a peer timed in this run).
- ``fused_moe_e2e``: the public call as a model makes it, align included.
- ``moe_align``: ``moe_align_block_size`` alone (cuda, triton; torch = the reference) at the
  block size fused_moe would use (the Triton launcher's config lookup; ``--align-block`` to force
  one); plus the acceptance shape 16384 tokens x top-8 over 512 experts in the default grid.

Floor of a fused_moe row = max(bytes / copy bandwidth, FLOPs / GEMM ceiling of the dtype), with
bytes = unique experts the routing touches x (2I*H + H*I) x weight bytes (+ scales) + hidden in
and out, and FLOPs = 2 * tokens * topk * (2I*H + I*H); both measured ceilings come from
bench/ceilings.py. ``--fp8``: w8a8 (e4m3 weights with per-expert scales, or per-channel with
``--per-channel``; activations quantized per token inside fused_moe), judged by the fp8 ceiling.

    python -m bench.moe --quick
    python -m bench.moe --model qwen3-30b-a3b --backend triton,torch --compare
    python -m bench.moe --mode align --backend cuda,triton
    python -m bench.moe --cpu --out /tmp/r          # tiny CPU smoke (torch; Triton interpreted)
"""

from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from bench import cli, shapes, timing
from bench.cli import Case, Family, Provider
from pykernels import envs

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3 value
MODELS = ("mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v3")
QUICK_MODELS = ("mixtral-8x7b", "qwen3-30b-a3b")  # the acceptance models
QUICK_M = (1, 64, 1024)
ALIGN_EXTRA = ((16384, 8, 512),)  # tokens, topk, experts: issue 6's "<= 40 us at E = 512" shape
SEED = 1234
# ../shared/ANCHORS.md, "Fused MoE (bf16)": vLLM's Triton fused MoE with its tuned H200 configs,
# align excluded, measured on an H200. A stored number, printed beside our rows, never timed here.
REFERENCE_US = {
    "mixtral-8x7b": dict(zip(shapes.MOE_M, (203, 676, 694, 798, 1669, 5445))),
    "qwen3-30b-a3b": dict(zip(shapes.MOE_M, (55.6, 225, 311, 346, 422, 898))),
}


@dataclass(frozen=True)
class MoEShape:
    name: str
    experts: int
    topk: int
    hidden: int
    inter: int  # per-expert MLP width I: w1 is [E, 2I, H], w2 [E, H, I]
    scoring: str = "softmax"
    renormalize: bool = True


CPU_SHAPE = MoEShape("cpu-tiny", 4, 2, 32, 16)
CPU_M = (1, 7)


def moe_shape(name: str) -> MoEShape:
    m = shapes.get(name)
    if not m.is_moe:
        raise ValueError(f"--model {name!r} is not an MoE model; choose one of {', '.join(MODELS)}")
    scoring = "sigmoid" if m.name.startswith("deepseek") else "softmax"
    return MoEShape(m.name, m.num_experts, m.topk, m.hidden, m.moe_intermediate, scoring)


# ---- routing and the floor -----------------------------------------------------------------


def routing_logits(tokens: int, experts: int, index: int) -> torch.Tensor:
    """Input set `index`'s gating logits: seeded on the CPU, so the floor (computed here) and the
    timed inputs (the same tensor moved to the device) see the same routing."""
    gen = torch.Generator().manual_seed(SEED + index)
    return torch.randn(tokens, experts, generator=gen)


def touched_experts(tokens: int, s: MoEShape, index: int) -> int:
    """Unique experts set `index` routes to (top-k of the logits = top-k of their scores)."""
    logits = routing_logits(tokens, s.experts, index)
    return int(logits.topk(s.topk, dim=-1).indices.unique().numel())


def weight_bytes_per_expert(s: MoEShape, fp8: bool = False, per_channel: bool = False) -> int:
    elems = 3 * s.inter * s.hidden  # w1 (2I x H) + w2 (H x I)
    if not fp8:
        return 2 * elems
    scales = 4 * (3 * s.inter if per_channel else 2)  # fp32 per output channel, or per tensor
    return elems + scales


def moe_nbytes(tokens: int, s: MoEShape, touched: float, fp8: bool = False,
               per_channel: bool = False, act_bytes: int = 2) -> float:
    """Bytes a perfect kernel moves: touched experts' weights + hidden read + output written
    (act_bytes each: bf16 also under w8a8) + the routing (fp32 weights, int32 ids)."""
    acts = 2 * tokens * s.hidden * act_bytes + tokens * s.topk * 8
    return touched * weight_bytes_per_expert(s, fp8, per_channel) + acts


def moe_flops(tokens: int, s: MoEShape) -> float:
    return 2.0 * tokens * s.topk * 3 * s.inter * s.hidden  # (2I*H + I*H) MACs per routed token


def _launcher():
    """pykernels.moe.fused_moe_triton, or None where it cannot be imported."""
    try:
        return importlib.import_module("pykernels.moe.fused_moe_triton")
    except ImportError:
        return None


def align_block(tokens: int, experts: int, topk: int, s: MoEShape | None = None,
                dtype: torch.dtype = torch.bfloat16, fp8: bool = False,
                override: int | None = None) -> int:
    """The BLOCK_SIZE_M fused_moe aligns with: the Triton launcher's config for a model shape
    (tuned or its default), its heuristic for a bare (tokens, experts, topk), or vLLM's untuned
    rule (16 when tokens <= experts, else 64) without the launcher; `override` wins."""
    if override:
        return override
    impl = _launcher()
    if impl is None:
        return 16 if tokens <= experts else 64
    if s is None:
        return int(impl.default_config(tokens, experts, topk)["BLOCK_SIZE_M"])
    w2 = torch.empty(s.experts, s.hidden, s.inter, device="meta")  # lookup reads shapes only
    quant = "fp8_w8a8" if fp8 else "none"
    return int(impl.lookup(tokens, w2, w2, s.topk, dtype, quant)[0]["BLOCK_SIZE_M"])


def align_nbytes(tokens: int, topk: int, experts: int, block: int) -> int:
    """ids read + sorted ids, expert ids and the total written (the worst-case padded sizes)."""
    cap = tokens * topk + experts * (block - 1)
    return 4 * (tokens * topk + cap + -(-cap // block) + 1)


# ---- cases ---------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", default="all", choices=("all", "fused", "align"),
                   help="fused_moe rows (align excluded and included), align rows, or all")
    p.add_argument("--fp8", action="store_true", help="fp8 w8a8 weights (e4m3, scaled)")
    p.add_argument("--per-channel", action="store_true",
                   help="with --fp8: per-output-channel weight scales (default per expert)")
    p.add_argument("--align-block", type=int, default=None,
                   help="block size of the moe_align rows (default: the one fused_moe's "
                        "config picks)")


def fused_cases(tokens: int, s: MoEShape, dtype: torch.dtype, fp8: bool = False,
                per_channel: bool = False) -> list[Case]:
    """The fused_moe and fused_moe_e2e cases of one shape; floor from the routing of the input
    sets the harness will build (their count comes from the same rotation rule it uses)."""
    act_bytes = 2 if fp8 else dtype.itemsize
    first = touched_experts(tokens, s, 0)
    footprint = int(moe_nbytes(tokens, s, first, fp8, per_channel, act_bytes))
    n = timing.rotation_count(footprint)
    touched = sum(touched_experts(tokens, s, i) for i in range(n)) / n
    shape = {"tokens": tokens, "num_experts": s.experts, "topk": s.topk, "hidden": s.hidden,
             "intermediate": s.inter}
    common = dict(nbytes=int(moe_nbytes(tokens, s, touched, fp8, per_channel, act_bytes)),
                  flops=moe_flops(tokens, s), model=s.name, footprint=footprint)
    if fp8:  # a shape field, so per-tensor and per-channel rows are separate series
        shape["weight_scales"] = "channel" if per_channel else "expert"
    case_dtype = FP8 if fp8 else dtype
    return [Case(k, dict(shape), case_dtype, **common) for k in ("fused_moe", "fused_moe_e2e")]


def align_case(tokens: int, topk: int, experts: int, block: int, model: str = "") -> Case:
    shape = {"tokens": tokens, "num_experts": experts, "topk": topk, "block_size": block}
    return Case("moe_align", shape, torch.int32, nbytes=align_nbytes(tokens, topk, experts, block),
                model=model)


def _grid(args: argparse.Namespace) -> tuple[list[MoEShape], tuple[int, ...]]:
    if args.cpu:
        return [CPU_SHAPE], CPU_M
    names = [args.model] if args.model else QUICK_MODELS if args.quick else MODELS
    return [moe_shape(n) for n in names], QUICK_M if args.quick else tuple(shapes.MOE_M)


def make_cases(args: argparse.Namespace) -> list[Case]:
    # --dtype fp8 works too once bench/cli.py's DTYPES names it; activations stay bf16.
    fp8 = bool(args.fp8) or args.dtype == FP8
    dtype = torch.bfloat16 if args.dtype == FP8 else args.dtype
    if args.per_channel and not fp8:
        raise ValueError("--per-channel needs --fp8")
    models, grid = _grid(args)
    cases = []
    for s in models:
        for m in grid:
            if args.mode in ("all", "fused"):
                cases += fused_cases(m, s, dtype, fp8, args.per_channel)
            if args.mode in ("all", "align"):
                block = align_block(m, s.experts, s.topk, s, dtype, fp8, args.align_block)
                cases.append(align_case(m, s.topk, s.experts, block, s.name))
    if args.mode in ("all", "align") and not (args.cpu or args.quick or args.model):
        for m, k, e in ALIGN_EXTRA:
            block = align_block(m, e, k, override=args.align_block)
            cases.append(align_case(m, k, e, block, "acceptance"))
    return cases


# ---- inputs --------------------------------------------------------------------------------


def _api() -> SimpleNamespace:
    """Our MoE ops, imported on first use (so this module imports before they exist)."""
    mod = importlib.import_module
    return SimpleNamespace(
        fused_moe=mod("pykernels.moe").fused_moe,
        fused_topk=mod("pykernels.moe.topk").fused_topk,
        align=mod("pykernels.moe.align").moe_align_block_size,
        impl=mod("pykernels.moe.fused_moe_triton"),  # the launcher's pieces: route, run_routed
        Fp8=mod("pykernels.moe.quant").Fp8)


def shape_of(case: Case) -> MoEShape:
    sh = case.shape
    scoring = "sigmoid" if case.model.startswith("deepseek") else "softmax"
    return MoEShape(case.model, sh["num_experts"], sh["topk"], sh.get("hidden", 0),
                    sh.get("intermediate", 0), scoring)


def _fp8_weight(shape: tuple[int, ...], fan_in: int, per_channel: bool, device: str):
    """(e4m3 weight, fp32 scales) built one expert at a time (DeepSeek: 256 x 117 MB of fp32
    would not fit at once): scales [E] per expert, or [E, N, 1] per output channel."""
    q = torch.empty(shape, dtype=FP8, device=device)
    scales = torch.empty((shape[0], shape[1], 1) if per_channel else (shape[0],),
                         dtype=torch.float32, device=device)
    for e in range(shape[0]):
        w = torch.randn(shape[1:], device=device) / fan_in ** 0.5
        amax = w.abs().amax(dim=-1, keepdim=True) if per_channel else w.abs().amax()
        scale = amax.clamp(min=1e-12) / FP8_MAX
        q[e] = (w / scale).to(FP8)
        scales[e] = scale
    return q, scales


_WEIGHTS: dict = {}  # one entry: the last shape's weights, reused by every case of that model


def weights(s: MoEShape, dtype: torch.dtype, device: str, per_channel: bool = False) -> dict:
    """w1, w2 (and fp8 scales) of a shape, kept for the next case of the same model."""
    key = (s.experts, s.hidden, s.inter, dtype, per_channel, device)
    if key not in _WEIGHTS:
        _WEIGHTS.clear()  # free the previous model's weights first (DeepSeek bf16: 22.5 GB)
        if dtype == FP8:
            w1, s1 = _fp8_weight((s.experts, 2 * s.inter, s.hidden), s.hidden, per_channel, device)
            w2, s2 = _fp8_weight((s.experts, s.hidden, s.inter), s.inter, per_channel, device)
            quant = dict(use_fp8_w8a8=True, per_channel_quant=per_channel, w1_scale=s1,
                         w2_scale=s2)
        else:
            w1 = torch.randn(s.experts, 2 * s.inter, s.hidden, device=device, dtype=dtype)
            w2 = torch.randn(s.experts, s.hidden, s.inter, device=device, dtype=dtype)
            w1.mul_(s.hidden ** -0.5)
            w2.mul_(s.inter ** -0.5)
            quant = {}
        _WEIGHTS[key] = dict(w1=w1, w2=w2, **quant)
    return _WEIGHTS[key]


@dataclass
class Inputs:
    """n input sets over one set of weights: hidden, routing (own seed per set), output."""

    hidden: list[torch.Tensor]
    topk_weights: list[torch.Tensor]
    topk_ids: list[torch.Tensor]
    out: list[torch.Tensor]
    w: dict


def make_inputs(case: Case, n: int, device: str) -> Inputs:
    s, tokens = shape_of(case), case.shape["tokens"]
    act = torch.bfloat16 if case.dtype == FP8 else case.dtype
    topk = _api().fused_topk
    hidden, tw, ids = [], [], []
    for i in range(n):
        logits = routing_logits(tokens, s.experts, i).to(device)
        w, e = topk(logits, s.topk, s.renormalize, scoring=s.scoring)
        hidden.append(torch.randn(tokens, s.hidden, device=device, dtype=act))
        tw.append(w)
        ids.append(e)
    out = [torch.empty_like(h) for h in hidden]
    per_channel = case.shape.get("weight_scales") == "channel"
    return Inputs(hidden, tw, ids, out, weights(s, case.dtype, device, per_channel))


# ---- align excluded ------------------------------------------------------------------------


def _fp8_pair(w: dict, api: SimpleNamespace) -> tuple:
    """The (up, down) Fp8 arguments of the Triton launcher (dynamic per-token activations)."""
    if not w.get("use_fp8_w8a8"):
        return None, None
    per_channel = w["per_channel_quant"]
    s1, s2 = (w[k].reshape(w[k].shape[:2]) if per_channel else w[k]
              for k in ("w1_scale", "w2_scale"))
    return api.Fp8(s1, None), api.Fp8(s2, None)


def routed_call(api: SimpleNamespace, x: Inputs, n: int):
    """fn(i): the Triton fused_moe on set i with its align done here, outside the timing.

    fused_moe_triton.fused_experts is `chunk_configs -> route (align) -> run_routed` per chunk
    of VLLM_FUSED_MOE_CHUNK_SIZE tokens; this runs the same sequence with route() called now, at
    the block size the looked-up config picks, so the timed calls are run_routed only."""
    impl, w1, w2 = api.impl, x.w["w1"], x.w["w2"]
    tokens, topk = x.topk_ids[0].shape
    fp8 = _fp8_pair(x.w, api)
    quant = "none" if fp8[0] is None else "fp8_w8a8"
    chunk = max(1, envs.VLLM_FUSED_MOE_CHUNK_SIZE)
    ws = impl.Workspace(min(tokens, chunk), topk, w2.shape[2], w2.shape[1], x.hidden[0].dtype,
                        x.hidden[0].device, fp8[0] is not None)
    plans = []
    for i in range(n):
        plan = []
        for start in range(0, tokens, chunk):
            end = min(start + chunk, tokens)
            up, down = impl.chunk_configs(end - start, w1, w2, topk, x.hidden[i].dtype, quant,
                                          None)
            r = impl.route(x.topk_ids[i][start:end], up["BLOCK_SIZE_M"], w1.shape[0])
            plan.append((slice(start, end), r, up, down))
        plans.append(plan)

    def fn(i):
        for rows, r, up, down in plans[i]:
            impl.run_routed(x.out[i][rows], x.hidden[i][rows], w1, w2,
                            x.topk_weights[i][rows], r, ws, up, down, *fp8)
        return x.out[i]

    return fn


def check_same(fn, call, dtype: torch.dtype) -> None:
    """One-time guard: the align-excluded path computes what the public call computes."""
    want = call(0).clone()
    got = fn(0)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol,
                               msg="align-excluded fused_moe differs from the public call")


# ---- providers -----------------------------------------------------------------------------


def _build_align(backend: str):
    def build(case: Case, n: int, device: str):
        align, sh = _api().align, case.shape
        ids = []
        for i in range(n):
            logits = torch.randn(sh["tokens"], sh["num_experts"], device=device,
                                 generator=torch.Generator(device).manual_seed(SEED + i))
            ids.append(logits.topk(sh["topk"], dim=-1).indices.int())
        e, b = sh["num_experts"], sh["block_size"]
        return lambda i: align(ids[i], e, b, backend=backend)

    return build


def _build_fused(backend: str):
    def build(case: Case, n: int, device: str):
        if case.kernel == "moe_align":
            return _build_align(backend)(case, n, device)
        api = _api()
        x = make_inputs(case, n, device)
        extra = {k: v for k, v in x.w.items() if k not in ("w1", "w2")}

        def call(i):
            return api.fused_moe(x.hidden[i], x.w["w1"], x.w["w2"], x.topk_weights[i],
                                 x.topk_ids[i], out=x.out[i], backend=backend, **extra)

        # The torch backend is a per-expert loop with no align step: its call is its time.
        if case.kernel == "fused_moe_e2e" or backend == "torch":
            return call
        fn = routed_call(api, x, n)
        check_same(fn, call, x.hidden[0].dtype)
        return fn

    return build


def _available(module: str, backend: str):
    def available(device: str) -> str | None:
        if device == "cpu" and backend == "triton" and not envs.TRITON_INTERPRET:
            return "runs on the CPU only under the Triton interpreter (set TRITON_INTERPRET=1)"
        mod = cli.module_or_reason(module)
        if isinstance(mod, str):
            return mod
        backends = getattr(mod, "backends", None)
        return backends().get(backend) if callable(backends) else None

    return available


PROVIDERS = (
    Provider("triton", _build_fused("triton"),
             available=_available("pykernels.moe.fused_moe", "triton"), cpu=True),
    # The reference: a per-expert loop that syncs (no graph), with no align step to exclude.
    Provider("torch", _build_fused("torch"),
             available=_available("pykernels.moe.fused_moe", "torch"), cpu=True, graph=False,
             kernels=("fused_moe", "moe_align")),
    Provider("cuda", _build_align("cuda"), available=_available("pykernels.moe.align", "cuda"),
             kernels=("moe_align",)),
)


def reference_note(outcome) -> str:
    """'stored ref 203 us (vLLM Triton, H200; ANCHORS.md) -> 0.95x' for a timed bf16 fused_moe
    row of Mixtral or Qwen3, else ''."""
    case = outcome.case
    ref = REFERENCE_US.get(case.model, {}).get(case.shape.get("tokens"))
    if case.kernel != "fused_moe" or case.dtype != torch.bfloat16 or ref is None:
        return ""
    if outcome.timing is None:
        return ""
    speed = ref / outcome.timing.median_us
    return f"stored ref {ref:g} us (vLLM Triton, H200; ANCHORS.md) -> {speed:.2f}x"


FAMILY = Family(
    name="moe",
    description="Fused MoE (align excluded and included) and moe_align_block_size: ours "
                "(triton, cuda align, torch reference); stored vLLM reference times in the notes.",
    providers=PROVIDERS,
    cases=make_cases,
    presets=("models",),
    add_arguments=add_arguments,
)


def main(argv: list[str] | None = None) -> int:
    """cli.main(FAMILY), with each fused_moe row's stored reference time added to its note.

    The shared harness has no per-row note hook, so cli.run_cases is wrapped for the call."""
    real = cli.run_cases

    def run_cases(*a, **kw):
        outcomes = real(*a, **kw)
        for o in outcomes:
            note = reference_note(o)
            o.note = f"{o.note}; {note}" if o.note and note else o.note or note
        return outcomes

    cli.run_cases = run_cases
    try:
        return cli.main(FAMILY, argv)
    finally:
        cli.run_cases = real


if __name__ == "__main__":
    raise SystemExit(main())
