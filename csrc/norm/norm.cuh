// RMSNorm and fused residual-add + RMSNorm, one block per row, fp32 statistics.
// Torch-free: the launcher in norm.cu picks dtype, vector width VEC and items per thread ITEMS.
#pragma once

#include "../common/vec.cuh"

namespace pykernels {

// Each thread keeps ITEMS vectors of VEC elements of its row in registers, so the row is read
// from memory once: one pass of loads, one block reduction, one pass of stores. ITEMS = 0 reads
// the row a second time (from L1) instead; the launcher picks by measured speed (norm.cu).
template <typename T, int VEC, int ITEMS>
struct RowCache {
  Vec<T, VEC> items[ITEMS > 0 ? ITEMS : 1];
};

template <typename T, int VEC>
__device__ __forceinline__ void scale_and_store(T* dst, const Vec<T, VEC>& x, const T* weight,
                                                float inv_rms) {
  const Vec<T, VEC> w = load_vec<T, VEC>(weight);
  Vec<T, VEC> r;
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    r.v[i] = from_float<T>(to_float(x.v[i]) * inv_rms * to_float(w.v[i]));
  }
  store_vec<T, VEC>(dst, r);
}

template <typename T, int VEC>
__device__ __forceinline__ float sum_squares(const Vec<T, VEC>& x) {
  float s = 0.0f;
#pragma unroll
  for (int i = 0; i < VEC; ++i) s += to_float(x.v[i]) * to_float(x.v[i]);
  return s;
}

// out[r] = in[r] / sqrt(mean(in[r]^2) + eps) * weight
template <typename T, int VEC, int ITEMS>
__global__ void rms_norm_kernel(T* __restrict__ out, const T* __restrict__ in,
                                const T* __restrict__ weight, int64_t hidden,
                                int64_t in_row_stride, int64_t out_row_stride, float eps) {
  const T* src = in + blockIdx.x * in_row_stride;
  T* dst = out + blockIdx.x * out_row_stride;
  const int64_t nvec = hidden / VEC;
  float ss = 0.0f;
  RowCache<T, VEC, ITEMS> cache;
  if constexpr (ITEMS > 0) {
#pragma unroll
    for (int k = 0; k < ITEMS; ++k) {
      const int64_t v = threadIdx.x + (int64_t)k * blockDim.x;
      if (v < nvec) {
        cache.items[k] = load_vec<T, VEC>(src + v * VEC);
        ss += sum_squares<T, VEC>(cache.items[k]);
      }
    }
  } else {
    for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
      ss += sum_squares<T, VEC>(load_vec<T, VEC>(src + v * VEC));
    }
  }
  const float inv_rms = rsqrtf(block_reduce_sum(ss) / (float)hidden + eps);
  if constexpr (ITEMS > 0) {
#pragma unroll
    for (int k = 0; k < ITEMS; ++k) {
      const int64_t v = threadIdx.x + (int64_t)k * blockDim.x;
      if (v < nvec) scale_and_store<T, VEC>(dst + v * VEC, cache.items[k], weight + v * VEC, inv_rms);
    }
  } else {
    for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
      scale_and_store<T, VEC>(dst + v * VEC, load_vec<T, VEC>(src + v * VEC), weight + v * VEC,
                              inv_rms);
    }
  }
}

// residual[r] = round(x[r] + residual[r]);  x[r] = rms_norm(residual[r]) * weight   (in place)
// The statistics use the rounded sum, the value the next layer will read back from residual.
template <typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> add_and_store(T* x, T* residual) {
  const Vec<T, VEC> a = load_vec<T, VEC>(x);
  const Vec<T, VEC> b = load_vec<T, VEC>(residual);
  Vec<T, VEC> s;
#pragma unroll
  for (int i = 0; i < VEC; ++i) s.v[i] = from_float<T>(to_float(a.v[i]) + to_float(b.v[i]));
  store_vec<T, VEC>(residual, s);
  return s;
}

template <typename T, int VEC, int ITEMS>
__global__ void fused_add_rms_norm_kernel(T* __restrict__ x, T* __restrict__ residual,
                                          const T* __restrict__ weight, int64_t hidden,
                                          int64_t x_row_stride, int64_t res_row_stride,
                                          float eps) {
  T* xr = x + blockIdx.x * x_row_stride;
  T* rr = residual + blockIdx.x * res_row_stride;
  const int64_t nvec = hidden / VEC;
  float ss = 0.0f;
  RowCache<T, VEC, ITEMS> cache;
  if constexpr (ITEMS > 0) {
#pragma unroll
    for (int k = 0; k < ITEMS; ++k) {
      const int64_t v = threadIdx.x + (int64_t)k * blockDim.x;
      if (v < nvec) {
        cache.items[k] = add_and_store<T, VEC>(xr + v * VEC, rr + v * VEC);
        ss += sum_squares<T, VEC>(cache.items[k]);
      }
    }
  } else {
    for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
      ss += sum_squares<T, VEC>(add_and_store<T, VEC>(xr + v * VEC, rr + v * VEC));
    }
  }
  const float inv_rms = rsqrtf(block_reduce_sum(ss) / (float)hidden + eps);
  if constexpr (ITEMS > 0) {
#pragma unroll
    for (int k = 0; k < ITEMS; ++k) {
      const int64_t v = threadIdx.x + (int64_t)k * blockDim.x;
      if (v < nvec) scale_and_store<T, VEC>(xr + v * VEC, cache.items[k], weight + v * VEC, inv_rms);
    }
  } else {
    // Each thread re-reads only the residual vectors it wrote itself: no barrier needed.
    for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
      scale_and_store<T, VEC>(xr + v * VEC, load_vec<T, VEC>(rr + v * VEC), weight + v * VEC,
                              inv_rms);
    }
  }
}

}  // namespace pykernels
