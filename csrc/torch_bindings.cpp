// One schema per op in the `pykernels` namespace; arguments the op writes are marked Tensor!.
// The fake (meta) implementations live beside the Python wrappers (pykernels/_ops.py).
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(pykernels, m) {
  m.def("silu_and_mul(Tensor! out, Tensor input) -> ()");
  m.def("rms_norm(Tensor! out, Tensor input, Tensor weight, float eps) -> ()");
  m.def("fused_add_rms_norm(Tensor! input, Tensor! residual, Tensor weight, float eps) -> ()");
  m.def("paged_decode(Tensor! out, Tensor q, Tensor kv_cache, Tensor kv_indptr, "
        "Tensor kv_indices, Tensor kv_last_page_len, Tensor! partial_o, Tensor! partial_lse, "
        "Tensor! counters, int num_splits, int num_stages, float sm_scale, "
        "float logits_soft_cap, int window_left, float k_scale, float v_scale) -> ()");
  m.def("append_paged_kv(Tensor k, Tensor v, Tensor! kv_cache, Tensor slot_mapping, "
        "float k_scale, float v_scale) -> ()");
  m.def("moe_align_block_size(Tensor! sorted_token_ids, Tensor! expert_ids, "
        "Tensor! num_tokens_post_padded, Tensor topk_ids, int num_experts, int block_size, "
        "Tensor? expert_map) -> ()");
  m.def("fp8_marlin_gemm(Tensor! out, Tensor x, Tensor qweight, Tensor scales, Tensor! locks, "
        "int block_n, int block_m, int splits, int num_stages, bool use_atomic_add, "
        "bool wgmma=False) -> ()");
}

TORCH_LIBRARY_IMPL(pykernels, CUDA, m) {
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("rms_norm", &rms_norm);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm);
  m.impl("paged_decode", &paged_decode);
  m.impl("append_paged_kv", &append_paged_kv);
  m.impl("moe_align_block_size", &moe_align_block_size);
  m.impl("fp8_marlin_gemm", &fp8_marlin_gemm);
}

// Lets `import pykernels._C` load the prebuilt library (the ops register at load time).
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, 0, nullptr};
  return PyModule_Create(&module);
}
