// Launcher of append_paged_kv: input checks, vector width, dtype dispatch.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../common/checks.h"
#include "../common/dispatch.h"
#include "append.cuh"

namespace pykernels {
namespace attention {

void check_kv_input(const at::Tensor& x, const char* name, const at::Tensor& k) {
  PK_CHECK_SAME_DEVICE(x, k);
  TORCH_CHECK_TYPE(x.scalar_type() == k.scalar_type(), name, " must have k's dtype ",
                   k.scalar_type(), ", got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.sizes() == k.sizes(), name, " must have k's shape ", k.sizes(), ", got ",
                    x.sizes());
  TORCH_CHECK_VALUE(x.stride(2) == 1, name, " must have a contiguous last dimension, got strides ",
                    x.strides());
}

template <typename T, typename KV>
void launch_append(const AppendParams& p, int64_t tokens, int vec, cudaStream_t stream) {
  const int pieces = p.num_kv_heads * p.head_dim / vec;
  const int threads = std::min(256, std::max(32, (pieces + 31) / 32 * 32));
  switch (vec) {
    case 8: append_paged_kv_kernel<T, KV, 8><<<(unsigned)tokens, threads, 0, stream>>>(p); break;
    case 4: append_paged_kv_kernel<T, KV, 4><<<(unsigned)tokens, threads, 0, stream>>>(p); break;
    case 2: append_paged_kv_kernel<T, KV, 2><<<(unsigned)tokens, threads, 0, stream>>>(p); break;
    default: append_paged_kv_kernel<T, KV, 1><<<(unsigned)tokens, threads, 0, stream>>>(p);
  }
}

}  // namespace attention
}  // namespace pykernels

void append_paged_kv(const at::Tensor& k, const at::Tensor& v, at::Tensor& kv_cache,
                     const at::Tensor& slot_mapping, double k_scale, double v_scale) {
  using namespace pykernels::attention;
  PK_CHECK_CUDA(k);
  PK_CHECK_DIM(k, 3);
  TORCH_CHECK_TYPE(k.scalar_type() == at::kHalf || k.scalar_type() == at::kBFloat16,
                   "k must be bfloat16 or float16, got ", k.scalar_type());
  TORCH_CHECK_VALUE(k.stride(2) == 1, "k must have a contiguous last dimension, got strides ",
                    k.strides());
  check_kv_input(v, "v", k);
  PK_CHECK_SAME_DEVICE(kv_cache, k);
  const bool fp8 = kv_cache.scalar_type() == at::kFloat8_e4m3fn;
  TORCH_CHECK_TYPE(fp8 || kv_cache.scalar_type() == k.scalar_type(),
                   "kv_cache must have k's dtype or float8_e4m3fn, got ", kv_cache.scalar_type());
  TORCH_CHECK_VALUE(kv_cache.dim() == 5 && kv_cache.size(1) == 2 &&
                        kv_cache.size(3) == k.size(1) && kv_cache.size(4) == k.size(2),
                    "kv_cache must have layout [num_pages, 2, page_size, ", k.size(1), ", ",
                    k.size(2), "], got ", kv_cache.sizes());
  TORCH_CHECK_VALUE(kv_cache.stride(4) == 1, "kv_cache must have a contiguous last dimension");
  PK_CHECK_SAME_DEVICE(slot_mapping, k);
  TORCH_CHECK_TYPE(slot_mapping.scalar_type() == at::kLong, "slot_mapping must be int64, got ",
                   slot_mapping.scalar_type());
  TORCH_CHECK_VALUE(slot_mapping.dim() == 1 && slot_mapping.is_contiguous() &&
                        slot_mapping.size(0) == k.size(0),
                    "slot_mapping must be contiguous with shape [", k.size(0), "], got ",
                    slot_mapping.sizes());
  const int64_t tokens = k.size(0);
  if (tokens == 0) return;
  TORCH_CHECK_VALUE(tokens <= INT32_MAX, "too many tokens: ", tokens);
  AppendParams p{};
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.cache = kv_cache.data_ptr();
  p.slots = slot_mapping.data_ptr<int64_t>();
  p.k_stride_t = k.stride(0);
  p.k_stride_h = k.stride(1);
  p.v_stride_t = v.stride(0);
  p.v_stride_h = v.stride(1);
  p.stride_page = kv_cache.stride(0);
  p.stride_kv = kv_cache.stride(1);
  p.stride_tok = kv_cache.stride(2);
  p.stride_head = kv_cache.stride(3);
  p.num_kv_heads = (int)k.size(1);
  p.head_dim = (int)k.size(2);
  p.page_size = (int)kv_cache.size(2);
  p.inv_k_scale = (float)(1.0 / k_scale);
  p.inv_v_scale = (float)(1.0 / v_scale);
  // The vector must divide head_dim and keep every k/v row and cache row aligned; 16 bytes of
  // k/v per access (8 elements), 8 bytes of an fp8 cache.
  const int cache_elem = (int)kv_cache.element_size();
  int vec = pykernels::pick_vec((int)k.element_size(), k.size(2), {k.data_ptr(), v.data_ptr()},
                                {k.stride(0), k.stride(1), v.stride(0), v.stride(1)});
  while (vec > 1) {
    bool ok = reinterpret_cast<uintptr_t>(kv_cache.data_ptr()) % (vec * cache_elem) == 0;
    for (int i = 0; i < 4; ++i) ok = ok && kv_cache.stride(i) % vec == 0;
    if (ok) break;
    vec /= 2;
  }
  const c10::cuda::OptionalCUDAGuard guard(k.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (k.scalar_type() == at::kHalf) {
    if (fp8) launch_append<__half, __nv_fp8_e4m3>(p, tokens, vec, stream);
    else launch_append<__half, __half>(p, tokens, vec, stream);
  } else {
    if (fp8) launch_append<__nv_bfloat16, __nv_fp8_e4m3>(p, tokens, vec, stream);
    else launch_append<__nv_bfloat16, __nv_bfloat16>(p, tokens, vec, stream);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
