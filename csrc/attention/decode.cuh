// Paged decode attention, split-KV, on CUDA cores (design notes in decode_utils.cuh). Torch-free:
// the launcher in decode.cu checks inputs and picks T (q/out type), KV (cache type), HEAD_DIM
// and HEADS (q heads per CTA).
#pragma once

#include "decode_utils.cuh"

namespace pykernels {
namespace attention {

// Scores of one tile slice of this warp, the online-softmax update, then p.V.
template <typename KV, int HEAD_DIM, int HEADS>
__device__ __forceinline__ void compute_tile(const DecodeParams& p, const char* stage, int t0,
                                             int hi, const float (&q)[HEADS][8],
                                             float (&m)[HEADS], float (&l)[HEADS],
                                             float (&o)[HEADS][8], int warp, int rg, int dim0) {
  using S = DecodeShape<HEAD_DIM, HEADS, sizeof(KV)>;
  constexpr int kLpr = S::kLanesPerRow;
  const int first_row = warp * S::kRowsPerStep * S::kSteps + rg;
  const char* k_tile = stage + dim0 * (int)sizeof(KV);
  const char* v_tile = k_tile + S::kTile * S::kRowBytes;
  float s[S::kSteps][HEADS];
#pragma unroll
  for (int j = 0; j < S::kSteps; ++j) {
    const int row = first_row + j * S::kRowsPerStep;
    float kf[8];
    load8<KV>(k_tile + row * S::kRowBytes, kf);
#pragma unroll
    for (int h = 0; h < HEADS; ++h) {
      float acc = 0.0f;
#pragma unroll
      for (int e = 0; e < 8; ++e) acc = fmaf(q[h][e], kf[e], acc);
      s[j][h] = acc;
    }
#pragma unroll
    for (int h = 0; h < HEADS; ++h) {
#pragma unroll
      for (int off = kLpr / 2; off > 0; off >>= 1) {
        s[j][h] += __shfl_xor_sync(0xffffffffu, s[j][h], off);
      }
    }
    const bool valid = t0 + row < hi;
#pragma unroll
    for (int h = 0; h < HEADS; ++h) {
      const float x = p.cap_scale > 0.0f ? p.cap_scale * tanhf(s[j][h]) : s[j][h];
      s[j][h] = valid ? x : -INFINITY;
    }
  }
#pragma unroll
  for (int h = 0; h < HEADS; ++h) {
    float mx = m[h];
#pragma unroll
    for (int j = 0; j < S::kSteps; ++j) mx = fmaxf(mx, s[j][h]);
    const float mu = safe_max(mx);
    const float alpha = exp2f(m[h] - mu);
    float sum = 0.0f;
#pragma unroll
    for (int j = 0; j < S::kSteps; ++j) {
      s[j][h] = exp2f(s[j][h] - mu);
      sum += s[j][h];
    }
    l[h] = l[h] * alpha + sum;
#pragma unroll
    for (int e = 0; e < 8; ++e) o[h][e] *= alpha;
    m[h] = mx;
  }
#pragma unroll
  for (int j = 0; j < S::kSteps; ++j) {
    float vf[8];
    load8<KV>(v_tile + (first_row + j * S::kRowsPerStep) * S::kRowBytes, vf);
#pragma unroll
    for (int h = 0; h < HEADS; ++h) {
#pragma unroll
      for (int e = 0; e < 8; ++e) o[h][e] = fmaf(s[j][h], vf[e], o[h][e]);
    }
  }
}

// Row groups of a warp hold states over different tokens: merge them across lanes.
template <int HEADS, int LPR>
__device__ __forceinline__ void merge_row_groups(float (&m)[HEADS], float (&l)[HEADS],
                                                 float (&o)[HEADS][8]) {
#pragma unroll
  for (int off = LPR; off < 32; off <<= 1) {
#pragma unroll
    for (int h = 0; h < HEADS; ++h) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m[h], off);
      const float l2 = __shfl_xor_sync(0xffffffffu, l[h], off);
      float o2[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) o2[e] = __shfl_xor_sync(0xffffffffu, o[h][e], off);
      merge_state<8>(m[h], l[h], o[h], m2, l2, o2);
    }
  }
}

template <typename T, typename KV, int HEAD_DIM, int HEADS>
__global__ void __launch_bounds__(128, 2) paged_decode_kernel(const DecodeParams p) {
  using S = DecodeShape<HEAD_DIM, HEADS, sizeof(KV)>;
  static_assert(S::kThreads == 128, "launch bounds assume 4 warps");
  extern __shared__ __align__(16) char smem[];
  __shared__ int is_last;
  const int split = blockIdx.x;
  const int kvh = blockIdx.y / p.head_chunks;
  const int per_chunk = (p.group + p.head_chunks - 1) / p.head_chunks;
  const int qh0 = kvh * p.group + (blockIdx.y % p.head_chunks) * per_chunk;
  const int heads = min(per_chunk, kvh * p.group + p.group - qh0);
  const int b = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int rg = lane / S::kLanesPerRow;
  const int dim0 = (lane % S::kLanesPerRow) * S::kVec;

  float q[HEADS][8];
  const T* qb = static_cast<const T*>(p.q) + b * p.q_stride_b + dim0;
#pragma unroll
  for (int h = 0; h < HEADS; ++h) {
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      q[h][e] = h < heads ? to_float(qb[(qh0 + h) * p.q_stride_h + e]) * p.qk_scale : 0.0f;
    }
  }

  const int page_lo = p.kv_indptr[b];
  const int n_pages = p.kv_indptr[b + 1] - page_lo;
  const int kv_len = n_pages > 0 ? (n_pages - 1) * p.page_size + p.kv_last_page_len[b] : 0;
  const int start = p.window_left >= 0 ? max(kv_len - 1 - p.window_left, 0) : 0;
  int per_split = (kv_len - start + p.num_splits - 1) / p.num_splits;
  per_split = (per_split + S::kTile - 1) / S::kTile * S::kTile;  // whole tiles per split
  const int lo = start + split * per_split;
  const int hi = min(lo + per_split, kv_len);
  const int num_tiles = hi > lo ? (hi - lo + S::kTile - 1) / S::kTile : 0;
  const int* pages = p.kv_indices + page_lo;

  float m[HEADS], l[HEADS], o[HEADS][8];
#pragma unroll
  for (int h = 0; h < HEADS; ++h) {
    m[h] = -INFINITY;
    l[h] = 0.0f;
#pragma unroll
    for (int e = 0; e < 8; ++e) o[h][e] = 0.0f;
  }

  // Prologue: the first kStages - 1 tiles in flight (their page indices fetched together first).
  TileRows<S> ahead[S::kStages - 1];
#pragma unroll
  for (int st = 0; st < S::kStages - 1; ++st) {
    if (st < num_tiles) fetch_pages<S>(ahead[st], p, pages, lo + st * S::kTile, hi);
  }
#pragma unroll
  for (int st = 0; st < S::kStages - 1; ++st) {
    if (st < num_tiles) {
      issue_tile<S, sizeof(KV)>(smem + st * S::kStageBytes, ahead[st], p, kvh,
                                lo + st * S::kTile);
    }
    cp_async_commit();
  }
  for (int i = 0; i < num_tiles; ++i) {
    cp_async_wait<S::kStages - 2>();
    __syncthreads();  // tile i landed for all threads; tile i - 1's stage is free again
    const int next = i + S::kStages - 1;
    TileRows<S> rows;
    if (next < num_tiles) fetch_pages<S>(rows, p, pages, lo + next * S::kTile, hi);
    compute_tile<KV, HEAD_DIM, HEADS>(p, smem + (i % S::kStages) * S::kStageBytes,
                                      lo + i * S::kTile, hi, q, m, l, o, warp, rg, dim0);
    if (next < num_tiles) {
      issue_tile<S, sizeof(KV)>(smem + (next % S::kStages) * S::kStageBytes, rows, p, kvh,
                                lo + next * S::kTile);
    }
    cp_async_commit();
  }
  cp_async_wait<0>();
  merge_row_groups<HEADS, S::kLanesPerRow>(m, l, o);
  __syncthreads();  // the pipeline's shared memory becomes the merge area

  float* sm_m = reinterpret_cast<float*>(smem);  // [warps][HEADS]
  float* sm_l = sm_m + S::kWarps * HEADS;        // [warps][HEADS]
  float* sm_o = sm_l + S::kWarps * HEADS;        // [warps][HEADS][HEAD_DIM]
  float* weights = sm_o + S::kWarps * HEADS * HEAD_DIM;  // [HEADS][kMaxSplits]
  if (lane < S::kLanesPerRow) {
#pragma unroll
    for (int h = 0; h < HEADS; ++h) {
#pragma unroll
      for (int e = 0; e < 8; ++e) sm_o[(warp * HEADS + h) * HEAD_DIM + dim0 + e] = o[h][e];
    }
  }
  if (lane == 0) {
#pragma unroll
    for (int h = 0; h < HEADS; ++h) {
      sm_m[warp * HEADS + h] = m[h];
      sm_l[warp * HEADS + h] = l[h];
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < heads * HEAD_DIM; i += S::kThreads) {
    const int h = i / HEAD_DIM, d = i % HEAD_DIM;
    float mm = -INFINITY, ll = 0.0f, oo = 0.0f;
#pragma unroll
    for (int w = 0; w < S::kWarps; ++w) {
      const float m2 = sm_m[w * HEADS + h];
      const float l2 = sm_l[w * HEADS + h];
      const float o2[1] = {sm_o[(w * HEADS + h) * HEAD_DIM + d]};
      float o1[1] = {oo};
      merge_state<1>(mm, ll, o1, m2, l2, o2);
      oo = o1[0];
    }
    write_result<T, HEAD_DIM, HEADS>(p, b, qh0, split, h, d, mm, ll, oo);
  }
  if (p.num_splits == 1) return;

  // Split merge: publish this CTA's partials, count arrivals; the last arrival merges.
  __threadfence();
  __syncthreads();
  const int counter = b * gridDim.y + blockIdx.y;
  if (threadIdx.x == 0) is_last = atomicAdd(p.counters + counter, 1) == p.num_splits - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  merge_splits<T, HEAD_DIM, HEADS, S::kThreads>(p, weights, b, qh0, heads);
  if (threadIdx.x == 0) p.counters[counter] = 0;  // ready for the next launch (graph replays)
}

}  // namespace attention
}  // namespace pykernels
