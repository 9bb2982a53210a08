// Host entry points of every op, bound in torch_bindings.cpp.
#pragma once

#include <ATen/core/Tensor.h>

void silu_and_mul(at::Tensor& out, const at::Tensor& input);
void rms_norm(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight, double eps);
void fused_add_rms_norm(at::Tensor& input, at::Tensor& residual, const at::Tensor& weight,
                        double eps);
void paged_decode(at::Tensor& out, const at::Tensor& q, const at::Tensor& kv_cache,
                  const at::Tensor& kv_indptr, const at::Tensor& kv_indices,
                  const at::Tensor& kv_last_page_len, at::Tensor& partial_o,
                  at::Tensor& partial_lse, at::Tensor& counters, int64_t num_splits,
                  int64_t num_stages, double sm_scale, double logits_soft_cap,
                  int64_t window_left, double k_scale, double v_scale);
void append_paged_kv(const at::Tensor& k, const at::Tensor& v, at::Tensor& kv_cache,
                     const at::Tensor& slot_mapping, double k_scale, double v_scale);
void moe_align_block_size(at::Tensor& sorted_token_ids, at::Tensor& expert_ids,
                          at::Tensor& num_tokens_post_padded, const at::Tensor& topk_ids,
                          int64_t num_experts, int64_t block_size,
                          const std::optional<at::Tensor>& expert_map);
void fp8_marlin_gemm(at::Tensor& out, const at::Tensor& x, const at::Tensor& qweight,
                     const at::Tensor& scales, at::Tensor& locks, int64_t block_n,
                     int64_t block_m, int64_t splits, int64_t num_stages, bool use_atomic_add,
                     bool wgmma);
