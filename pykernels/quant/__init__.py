"""FP8 weight-only (W8A16) GEMM: Marlin-style CUDA kernel, its Triton twin and a torch reference.

- ``fp8_weight_pack`` / ``fp8_weight_unpack`` (pack.py): bf16/fp16 ``[N, K]`` <-> ``Fp8Weight``
  (e4m3 ``qweight [ceil(K/128), N, 128]`` + fp32 scales per channel or per 128-group).
- ``fp8_marlin_gemm`` (gemm.py): ``x [..., K] @ dequant(w).T`` through ``backend="auto"|"cuda"|
  "triton"|"torch"``.
- ``FP8WeightOnlyLinear`` (linear.py): the ``nn.Linear`` the serving layer uses for
  ``--quantization fp8``; ``quantize_model_fp8`` swaps a model's linears for it.

The packed format is documented in docs/quant.md. Names are imported lazily so that importing
this package loads neither Triton nor the CUDA op library.
"""

from __future__ import annotations

from pykernels import _lazy

_LAZY = {
    "Fp8Weight": "pykernels.quant.pack",
    "fp8_weight_pack": "pykernels.quant.pack",
    "fp8_weight_unpack": "pykernels.quant.pack",
    "fp8_marlin_gemm": "pykernels.quant.gemm",
    "FP8WeightOnlyLinear": "pykernels.quant.linear",
    "quantize_model_fp8": "pykernels.quant.linear",
    "select_fp8_linear_method": "pykernels.quant.linear",
}

__all__ = list(_LAZY)


__getattr__, __dir__ = _lazy.exports(__name__, _LAZY, globals())
