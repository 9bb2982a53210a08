"""Interim model runner over HF transformers: a model, ``--quantization``, greedy decoding timed.

The engine (paged KV cache, scheduler, our attention kernels) will replace the HF forward; what it
keeps from here is :func:`apply_quantization`, the one place a ``--quantization`` name becomes
modules (``fp8``: every aligned bf16/fp16 ``nn.Linear`` but the LM head becomes an
``FP8WeightOnlyLinear``, pykernels.quant). Until then this runner shows what the option does to
a real decode step: the HF forward with a static KV cache, one step captured in a CUDA graph and
replayed (an eager HF step at bs=1 is host-bound, ~43 ms on an H200 for Qwen3-0.6B: ANCHORS'
23 tok/s, which hides any GEMM).

Models are a preset shape with seeded random weights (as ANCHORS' serving rows are measured) or
a local checkpoint directory (``from_pretrained(local_files_only=True)``; no download).
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from pathlib import Path

import torch

QUANTIZATIONS = ("none", "fp8")

_QWEN3 = {"model_type": "qwen3", "head_dim": 128, "vocab_size": 151936, "rms_norm_eps": 1e-6,
          "rope_theta": 1_000_000.0, "max_position_embeddings": 40960}
# Shapes of the public configs (hidden, MLP width, layers, q / kv heads); "tiny" is for tests.
PRESETS = {
    "qwen3-0.6b": {**_QWEN3, "hidden_size": 1024, "intermediate_size": 3072,
                   "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
                   "tie_word_embeddings": True},
    "qwen3-8b": {**_QWEN3, "hidden_size": 4096, "intermediate_size": 12288,
                 "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
                 "tie_word_embeddings": False},
    "llama-3-8b": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                   "vocab_size": 128256, "rope_theta": 500_000.0, "rms_norm_eps": 1e-5,
                   "max_position_embeddings": 8192, "tie_word_embeddings": False},
    "tiny": {**_QWEN3, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
             "vocab_size": 512, "tie_word_embeddings": True},
}


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError("the HF model runner needs transformers: "
                          "pip install -e '.[serve]'") from e
    return transformers


def _dtype_kw(dtype: torch.dtype) -> dict:
    # transformers renamed torch_dtype to dtype in 4.56 (the GPU machines may have an older one).
    major, minor = (int(v) for v in _transformers().__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": dtype}


def load_model(model: str, *, dtype: torch.dtype = torch.bfloat16, device="cuda",
               num_layers: int | None = None, seed: int = 0) -> torch.nn.Module:
    """A preset name (random weights from ``seed``) or a local checkpoint directory."""
    tf = _transformers()
    if model in PRESETS:
        fields = dict(PRESETS[model])
        config = tf.AutoConfig.for_model(fields.pop("model_type"), **fields)
        if num_layers is not None:
            config.num_hidden_layers = num_layers
        torch.manual_seed(seed)
        with torch.device(device):
            m = tf.AutoModelForCausalLM.from_config(config, **_dtype_kw(dtype))
    elif Path(model).is_dir():
        kw = {"num_hidden_layers": num_layers} if num_layers is not None else {}
        m = tf.AutoModelForCausalLM.from_pretrained(model, local_files_only=True,
                                                    **_dtype_kw(dtype), **kw).to(device)
    else:
        raise ValueError(f"model must be one of {', '.join(PRESETS)} or a local checkpoint "
                         f"directory, got {model!r}")
    return m.eval()


def apply_quantization(model: torch.nn.Module, quantization: str, *,
                       group_size: int = -1) -> torch.nn.Module:
    """``--quantization``: "none" leaves the model; "fp8" swaps its linears for FP8 weight-only
    ones in place (``quantize_model_fp8``: the LM head stays in the model's dtype)."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, "
                         f"got {quantization!r}")
    if quantization == "fp8":
        from pykernels.quant import quantize_model_fp8

        quantize_model_fp8(model, group_size=group_size)
    return model


@dataclass
class Decoded:
    tokens: torch.Tensor  # [batch, new_tokens] int64
    prefill_s: float
    step_s: float  # mean time of one decode step (all rows)
    prompt_logits: torch.Tensor  # fp32 [batch, vocab]: the prefill's last position
    step_logits: torch.Tensor | None = None  # fp32 [batch, new_tokens - 1, vocab] if asked


def _static_cache(model, batch: int, length: int):
    tf = _transformers()
    params = inspect.signature(tf.StaticCache.__init__).parameters
    if "max_batch_size" in params:  # transformers 4.x
        return tf.StaticCache(config=model.config, max_batch_size=batch, max_cache_len=length,
                              device=model.device, dtype=model.dtype)
    return tf.StaticCache(config=model.config, max_cache_len=length)


def _rewind(cache, length: int) -> None:
    """Puts a static cache back to ``length`` cached tokens. transformers 5 writes K/V at a
    position counter of its own (``cumulative_length`` per layer; the ``cache_position`` we pass
    only sets the mask and RoPE), which a warm-up step advances; 4.x writes at cache_position."""
    for layer in getattr(cache, "layers", ()):
        counter = getattr(layer, "cumulative_length", None)
        if isinstance(counter, torch.Tensor):
            counter.fill_(length)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def greedy_decode(model, prompt: torch.Tensor, new_tokens: int, *, graph: bool = True,
                  keep_logits: bool = False, warm_up: bool | None = None) -> Decoded:
    """Greedy decoding of ``new_tokens`` after ``prompt`` [batch, length] with a static cache.
    graph=True (CUDA): one step is captured and replayed, so the step time is the GPU's.
    keep_logits: also return every decode step's logits (tests; batch x steps x vocab fp32).
    warm_up (default: with a graph): run the first step once and rewind the cache before the
    timed steps (a graph needs it: kernels compile on first use, outside the capture)."""
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    batch, length = prompt.shape
    dev = prompt.device
    cache = _static_cache(model, batch, length + new_tokens)
    t0 = time.perf_counter()
    logits = model(input_ids=prompt, past_key_values=cache, use_cache=True,
                   cache_position=torch.arange(length, device=dev)).logits[:, -1]
    _sync(dev)
    prefill_s = time.perf_counter() - t0
    tok = logits.argmax(-1, keepdim=True)
    pos = torch.full((1,), length, dtype=torch.long, device=dev)
    out = torch.empty(batch, new_tokens, dtype=torch.long, device=dev)
    out[:, :1] = tok
    kept = last = None
    if keep_logits:
        kept = torch.empty(batch, new_tokens - 1, logits.shape[-1], device=dev)
        last = torch.empty_like(logits, dtype=torch.float32)

    def step():  # reads tok/pos; leaves the next token in tok (and its logits in last)
        step_logits = model(input_ids=tok, past_key_values=cache, cache_position=pos,
                            use_cache=True).logits[:, -1]
        if last is not None:
            last.copy_(step_logits)
        tok.copy_(step_logits.argmax(-1, keepdim=True))
        pos.add_(1)

    run = step
    graph = graph and dev.type == "cuda" and new_tokens > 1
    if graph or (warm_up and new_tokens > 1):
        first = tok.clone()
        stream = torch.cuda.Stream(dev) if dev.type == "cuda" else None
        if stream is not None:  # warm-up (compiles, tunes) on a side stream, as capture wants
            stream.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(stream):
                step()
            torch.cuda.current_stream(dev).wait_stream(stream)
        else:
            step()
        if graph:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                step()
            run = g.replay
        tok.copy_(first)  # the warm-up step is redone by the first timed one (same position)
        pos.fill_(length)
        _rewind(cache, length)
    _sync(dev)
    t0 = time.perf_counter()
    for i in range(1, new_tokens):
        run()
        out[:, i:i + 1] = tok
        if kept is not None:
            kept[:, i - 1] = last
    _sync(dev)
    step_s = (time.perf_counter() - t0) / max(new_tokens - 1, 1)
    return Decoded(out, prefill_s, step_s, logits.float(), kept)
