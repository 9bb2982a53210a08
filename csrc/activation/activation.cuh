// silu_and_mul: out[r, j] = silu(in[r, j]) * in[r, d + j], the gate/up activation of a gated MLP.
// Torch-free: the launcher in activation.cu picks the dtype and the vector width.
#pragma once

#include "../common/vec.cuh"

namespace pykernels {

__device__ __forceinline__ float silu(float x) { return x / (1.0f + __expf(-x)); }

// One thread handles VEC consecutive outputs of one row; the grid is rows x tiles flattened into
// blockIdx.x (grid.y would cap rows at 65535). A block covers a tile of blockDim.x * VEC columns,
// so short rows (d = 384 for Qwen3-30B-A3B experts) waste at most one partial tile per row.
template <typename T, int VEC>
__global__ void silu_and_mul_kernel(T* __restrict__ out, const T* __restrict__ in, int64_t d,
                                    int64_t in_row_stride, int64_t out_row_stride,
                                    int64_t tiles_per_row) {
  const int64_t row = blockIdx.x / tiles_per_row;
  const int64_t tile = blockIdx.x - row * tiles_per_row;
  const int64_t col = (tile * blockDim.x + threadIdx.x) * VEC;
  if (col >= d) return;
  const T* gate = in + row * in_row_stride + col;
  const T* up = gate + d;
  T* dst = out + row * out_row_stride + col;
  // d % VEC == 0 and 16-byte alignment are checked by the launcher before VEC > 1 is chosen.
  const Vec<T, VEC> g = load_vec<T, VEC>(gate);
  const Vec<T, VEC> u = load_vec<T, VEC>(up);
  Vec<T, VEC> r;
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    r.v[i] = from_float<T>(silu(to_float(g.v[i])) * to_float(u.v[i]));
  }
  store_vec<T, VEC>(dst, r);
}

}  // namespace pykernels
