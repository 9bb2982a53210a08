// KV append: writes new keys/values into their paged-cache slots, quantizing to fp8 e4m3 (with a
// per-tensor scale, saturating) when the cache holds fp8. Torch-free; launcher in append.cu.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>

#include "../common/vec.cuh"

namespace pykernels {
namespace attention {

struct AppendParams {
  const void* k;
  const void* v;
  void* cache;
  const int64_t* slots;  // page * page_size + offset; < 0: skip the token
  int64_t k_stride_t, k_stride_h, v_stride_t, v_stride_h;
  int64_t stride_page, stride_kv, stride_tok, stride_head;  // cache strides, elements
  int num_kv_heads, head_dim, page_size;
  float inv_k_scale, inv_v_scale;
};

template <typename KV>
__device__ __forceinline__ KV to_cache(float x);
template <>
__device__ __forceinline__ __half to_cache<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 to_cache<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __nv_fp8_e4m3 to_cache<__nv_fp8_e4m3>(float x) {
  __nv_fp8_e4m3 r;
  r.__x = __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3);  // +-448 past the range, no NaN
  return r;
}

// VEC elements (16 bytes of T) per thread: load k and v, scale, convert, store.
template <typename T, typename KV, int VEC>
__device__ __forceinline__ void append_vec(const T* src, KV* dst, float inv_scale) {
  const Vec<T, VEC> x = load_vec<T, VEC>(src);
  Vec<KV, VEC> y;
#pragma unroll
  for (int i = 0; i < VEC; ++i) y.v[i] = to_cache<KV>(to_float(x.v[i]) * inv_scale);
  store_vec<KV, VEC>(dst, y);
}

// grid: one block per token; threads cover num_kv_heads * head_dim in VEC-wide pieces.
template <typename T, typename KV, int VEC>
__global__ void append_paged_kv_kernel(const AppendParams p) {
  const int64_t t = blockIdx.x;
  const int64_t slot = p.slots[t];
  if (slot < 0) return;
  const int64_t page = slot / p.page_size;
  const int64_t offset = slot % p.page_size;
  KV* dst = static_cast<KV*>(p.cache) + page * p.stride_page + offset * p.stride_tok;
  const T* k = static_cast<const T*>(p.k) + t * p.k_stride_t;
  const T* v = static_cast<const T*>(p.v) + t * p.v_stride_t;
  const int per_head = p.head_dim / VEC;
  for (int i = threadIdx.x; i < p.num_kv_heads * per_head; i += blockDim.x) {
    const int h = i / per_head;
    const int d = (i % per_head) * VEC;
    KV* out = dst + h * p.stride_head + d;
    append_vec<T, KV, VEC>(k + h * p.k_stride_h + d, out, p.inv_k_scale);
    append_vec<T, KV, VEC>(v + h * p.v_stride_h + d, out + p.stride_kv, p.inv_v_scale);
  }
}

}  // namespace attention
}  // namespace pykernels
