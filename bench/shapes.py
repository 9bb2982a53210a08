"""Real model shapes and the benchmark grids, so no module hard-codes a shape.

Sources: each model's config.json on the Hugging Face hub (hidden_size, intermediate_size,
num_attention_heads, num_key_value_heads, head_dim, num_hidden_layers, vocab_size, MoE fields).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    intermediate: int  # dense MLP width (per projection, i.e. gate and up are each this wide)
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    num_layers: int
    vocab: int
    num_experts: int = 0
    topk: int = 0
    moe_intermediate: int = 0  # per-expert MLP width
    n_group: int = 0  # grouped top-k (DeepSeek): expert groups and groups kept
    topk_group: int = 0

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def as_dict(self) -> dict:
        return asdict(self)


MODELS: dict[str, ModelShape] = {
    m.name: m
    for m in [
        ModelShape("llama-3-8b", 4096, 14336, 32, 8, 128, 32, 128256),
        ModelShape("llama-3-70b", 8192, 28672, 64, 8, 128, 80, 128256),
        ModelShape("qwen3-0.6b", 1024, 3072, 16, 8, 128, 28, 151936),
        ModelShape("qwen3-8b", 4096, 12288, 32, 8, 128, 36, 151936),
        ModelShape("qwen3-30b-a3b", 2048, 6144, 32, 4, 128, 48, 151936,
                   num_experts=128, topk=8, moe_intermediate=768),
        ModelShape("mixtral-8x7b", 4096, 14336, 32, 8, 128, 32, 32000,
                   num_experts=8, topk=2, moe_intermediate=14336),
        # DeepSeek-V3's attention is MLA (128 heads, kv_lora_rank 512, rope dim 64); the head
        # fields here are its MLA q heads with the 128-wide nope part, for reference only.
        ModelShape("deepseek-v3", 7168, 18432, 128, 128, 128, 61, 129280,
                   num_experts=256, topk=8, moe_intermediate=2048, n_group=8, topk_group=4),
    ]
}

ALIASES = {
    "llama3-8b": "llama-3-8b", "llama-8b": "llama-3-8b",
    "llama3-70b": "llama-3-70b", "llama-70b": "llama-3-70b",
    "qwen3-0.6b": "qwen3-0.6b", "qwen3-30b": "qwen3-30b-a3b", "qwen3-moe": "qwen3-30b-a3b",
    "mixtral": "mixtral-8x7b", "deepseek": "deepseek-v3", "deepseek-v3-moe": "deepseek-v3",
}


def get(name: str) -> ModelShape:
    """A model by name or alias, case-insensitive; ValueError listing the choices otherwise."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in MODELS:
        choices = ", ".join(sorted(MODELS))
        raise ValueError(f"unknown model {name!r}; choose one of {choices} (or an alias)")
    return MODELS[key]


# ---- grids measured side by side with the peers (../shared/ANCHORS.md) ---------------------------
# Paged decode: (batch, kv_len) with 32 q / 8 kv heads, head_dim 128, page 16.
DECODE_GRID = [(1, 4096), (1, 32768), (4, 4096), (16, 4096), (64, 4096), (256, 4096),
               (64, 16384), (32, 32768), (512, 1024)]
# Paged causal prefill: (batch, q_len = kv_len).
PREFILL_GRID = [(1, 8192), (8, 2048), (32, 512)]
# Token counts of the fused-MoE grid.
MOE_M = [1, 16, 64, 256, 1024, 4096]
# Weight-only GEMM: (N, K) and the M grid.
GEMM_NK = [(4096, 4096), (8192, 8192), (28672, 4096), (4096, 14336)]
GEMM_M = [1, 16, 64, 256, 1024]
# Token counts of the elementwise/norm ops at decode and prefill sizes.
TOKENS = [1, 16, 64, 256, 1024, 4096, 16384]
# The M grid of bench.gemm / autotune.gemm: GEMM_M plus a prefill-sized 4096.
GEMM_M_FULL = [1, 16, 64, 256, 1024, 4096]
# Dense models whose linear layers bench.gemm adds to the ANCHORS shapes (GEMM_NK).
GEMM_MODELS = ("llama-3-8b", "llama-3-70b", "qwen3-8b", "qwen3-0.6b")


def linear_shapes(name: str) -> list[tuple[str, int, int]]:
    """(layer, N, K) of a model's linear layers, fused as a serving engine runs them: qkv_proj
    (q heads + 2 x kv heads), o_proj, and for a dense MLP gate_up_proj (2 x intermediate) and
    down_proj. MoE models list the attention projections only (their MLPs are experts)."""
    m = get(name)
    q, kv = m.num_q_heads * m.head_dim, m.num_kv_heads * m.head_dim
    out = [("qkv_proj", q + 2 * kv, m.hidden), ("o_proj", m.hidden, q)]
    if not m.is_moe:
        out += [("gate_up_proj", 2 * m.intermediate, m.hidden),
                ("down_proj", m.hidden, m.intermediate)]
    return out
