// Paged decode attention, split-KV, on tensor cores (design notes in decode_utils.cuh). Torch-free:
// the launcher in decode.cu checks inputs and picks T (q/out type), KV (cache type) and HEAD_DIM.
#pragma once

#include "decode_utils.cuh"

namespace pykernels {
namespace attention {

// q heads [qh0, qh0 + heads) as the 16 swizzled rows of q_s (rows past `heads` zero). With 16-byte
// aligned rows (the launcher checks) through cp.async, so q arrives with the first K/V tile instead
// of stalling the threads before the page-table loads; else element by element.
template <typename T, typename S>
__device__ __forceinline__ void load_q(char* q_s, const DecodeParams& p, int b, int qh0,
                                       int heads) {
  constexpr int kD = S::kWideRowBytes / 2;
  const T* qb = static_cast<const T*>(p.q) + b * p.q_stride_b;
  if (p.q_aligned) {
    for (int c = threadIdx.x; c < S::kRows * S::kWideChunks; c += S::kThreads) {
      const int r = c / S::kWideChunks, col = c % S::kWideChunks;
      const T* src = r < heads ? qb + (qh0 + r) * p.q_stride_h + col * 8 : qb;
      cp_async_16(q_s + swizzle<S::kWideRowBytes>(r, col), src, r < heads);
    }
    return;
  }
  for (int i = threadIdx.x; i < S::kRows * kD; i += S::kThreads) {
    const int r = i / kD, d = i % kD;
    const T x = r < heads ? qb[(qh0 + r) * p.q_stride_h + d] : from_float<T>(0.0f);
    *reinterpret_cast<T*>(q_s + swizzle<S::kWideRowBytes>(r, d / 8) + (d % 8) * 2) = x;
  }
}

// One warp's 16 keys [key0, key0 + 16) of a tile: S = Q K^T, the online-softmax update of the two
// rows this lane holds (g and g + 8), then O += P V. Keys >= hi are masked.
// K and V rows are padded (a 16-bit cache, as loaded) or swizzled (an fp8 tile widened).
template <typename T, typename S, int HEAD_DIM, bool PADDED>
__device__ __forceinline__ void attend_keys(const DecodeParams& p, const char* q_s,
                                            const char* k_s, const char* v_s, int row0, int key0,
                                            int hi, float (&m)[2], float (&l)[2],
                                            float (&o)[HEAD_DIM / 8][4]) {
  constexpr int kRB = S::kWideRowBytes;
  auto kv_at = [](int row, int chunk) {
    return PADDED ? row * S::kPadRowBytes + chunk * 16 : swizzle<kRB>(row, chunk);
  };
  const int lane = threadIdx.x % 32;
  const int j = lane / 8, r8 = lane % 8, t = lane % 4;
  float s[2][4] = {};
#pragma unroll
  for (int ks = 0; ks < HEAD_DIM / 16; ++ks) {
    uint32_t a[4], kb[4];
    ldmatrix_x4(a, q_s + swizzle<kRB>((j % 2) * 8 + r8, ks * 2 + j / 2));
    ldmatrix_x4(kb, k_s + kv_at(row0 + (j / 2) * 8 + r8, ks * 2 + j % 2));
    mma_16816<T>(s[0], a, kb[0], kb[1]);
    mma_16816<T>(s[1], a, kb[2], kb[3]);
  }
  if (p.cap_scale > 0.0f) {  // a uniform branch: the tanh is never evaluated without a cap
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = p.cap_scale * tanhf(s[nt][e] * p.qk_scale);
    }
  } else {
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] *= p.qk_scale;
    }
  }
  if (key0 + 16 > hi) {  // warp-uniform: only a split's last tile has keys to mask
    const int first = key0 + 2 * t;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        if (first + nt * 8 + (e & 1) >= hi) s[nt][e] = -INFINITY;
      }
    }
  }
  float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) mx[e >> 1] = fmaxf(mx[e >> 1], s[nt][e]);
  }
  float base[2], alpha[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {  // the row's max over the quad of lanes that share it
    mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
    mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
    const float m_new = fmaxf(m[i], mx[i]);
    base[i] = safe_max(m_new);
    alpha[i] = exp2f(m[i] - base[i]);
    m[i] = m_new;
    l[i] *= alpha[i];
  }
#pragma unroll
  for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      s[nt][e] = exp2f(s[nt][e] - base[e >> 1]);
      l[e >> 1] += s[nt][e];  // this lane's share; the quad is summed once at the end
    }
  }
  // Once the running max settles (after a few tiles on real data) alpha is exactly 1: skipping the
  // HEAD_DIM / 2 multiplies then saves a third of this function's instructions.
  if (__any_sync(0xffffffffu, alpha[0] != 1.0f || alpha[1] != 1.0f)) {
#pragma unroll
    for (int dt = 0; dt < HEAD_DIM / 8; ++dt) {
      o[dt][0] *= alpha[0];
      o[dt][1] *= alpha[0];
      o[dt][2] *= alpha[1];
      o[dt][3] *= alpha[1];
    }
  }
  // The accumulator layout of S is the A-operand layout of P (rows g, g + 8; keys 2t.. of each
  // 8-key half), so P is only rounded to T and packed.
  const uint32_t pa[4] = {pack2<T>(s[0][0], s[0][1]), pack2<T>(s[0][2], s[0][3]),
                          pack2<T>(s[1][0], s[1][1]), pack2<T>(s[1][2], s[1][3])};
#pragma unroll
  for (int dp = 0; dp < HEAD_DIM / 16; ++dp) {
    uint32_t vb[4];
    ldmatrix_x4_trans(vb, v_s + kv_at(row0 + (j % 2) * 8 + r8, dp * 2 + j / 2));
    mma_16816<T>(o[2 * dp], pa, vb[0], vb[1]);
    mma_16816<T>(o[2 * dp + 1], pa, vb[2], vb[3]);
  }
}

// 2 stages at head_dim <= 128 leave room for 3 CTAs per SM (<= 170 registers a thread).
template <typename T, typename KV, int HEAD_DIM, int STAGES>
__global__ void __launch_bounds__(128, STAGES == 2 && HEAD_DIM <= 128 ? 3 : 2)
    paged_decode_kernel(const DecodeParams p) {
  using S = DecodeShape<HEAD_DIM, sizeof(KV), STAGES>;
  constexpr bool kFp8 = sizeof(KV) == 1;
  static_assert(S::kThreads == 128, "launch bounds assume 4 warps");
  extern __shared__ __align__(16) char smem[];
  char* q_s = smem;
  char* pipe = smem + S::kQBytes;
  char* wide = pipe + S::kStages * S::kStageBytes;  // fp8: the current tile widened
  const int split = blockIdx.x;
  const int kvh = blockIdx.y / p.head_chunks;
  const int per_chunk = (p.group + p.head_chunks - 1) / p.head_chunks;
  const int qh0 = kvh * p.group + (blockIdx.y % p.head_chunks) * per_chunk;
  const int heads = min(per_chunk, kvh * p.group + p.group - qh0);
  const int b = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
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
  // This CTA's kv head in page 0, at the thread's 16-byte column of a row.
  const char* head = static_cast<const char*>(p.cache) + kvh * p.head_bytes +
                     (threadIdx.x % S::kChunks) * 16;
  load_q<T, S>(q_s, p, b, qh0, heads);  // joins the first cp.async group below

  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  float o[HEAD_DIM / 8][4];
#pragma unroll
  for (int dt = 0; dt < HEAD_DIM / 8; ++dt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) o[dt][e] = 0.0f;
  }

  // Prologue: the first kStages - 1 tiles in flight (their page indices fetched together first),
  // and the page indices of the tile after them.
  TileRows<S> rows[S::kStages - 1];
#pragma unroll
  for (int st = 0; st < S::kStages - 1; ++st) {
    if (st < num_tiles) fetch_pages<S>(rows[st], p, pages, lo + st * S::kTile, hi);
  }
#pragma unroll
  for (int st = 0; st < S::kStages - 1; ++st) {
    if (st < num_tiles) {
      issue_tile<S, sizeof(KV)>(pipe + st * S::kStageBytes, rows[st], p, head, lo + st * S::kTile);
    }
    cp_async_commit();
  }
  TileRows<S>& upcoming = rows[0];  // page indices of tile i + kStages - 1, one tile early
  if (S::kStages - 1 < num_tiles) {
    fetch_pages<S>(upcoming, p, pages, lo + (S::kStages - 1) * S::kTile, hi);
  }
  constexpr int kTileRowBytes = kFp8 ? S::kWideRowBytes : S::kPadRowBytes;
  for (int i = 0; i < num_tiles; ++i) {
    cp_async_wait<S::kStages - 2>();
    __syncthreads();  // tile i landed for all threads; tile i - 1's stage is free again
    // Refill the freed stage before computing, so kStages - 1 tiles stay in flight meanwhile.
    const int next = i + S::kStages - 1;
    if (next < num_tiles) {
      issue_tile<S, sizeof(KV)>(pipe + (next % S::kStages) * S::kStageBytes, upcoming, p, head,
                                lo + next * S::kTile);
    }
    cp_async_commit();
    if (next + 1 < num_tiles) fetch_pages<S>(upcoming, p, pages, lo + (next + 1) * S::kTile, hi);
    const char* tile = pipe + (i % S::kStages) * S::kStageBytes;
    if constexpr (kFp8) {
      widen_tile<T, S>(wide, tile);
      __syncthreads();
      tile = wide;
    }
    attend_keys<T, S, HEAD_DIM, !kFp8>(p, q_s, tile, tile + S::kTile * kTileRowBytes,
                                       warp * S::kKeysPerWarp,
                                       lo + i * S::kTile + warp * S::kKeysPerWarp, hi, m, l, o);
  }
  cp_async_wait<0>();
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
  }
  __syncthreads();  // the pipeline's shared memory becomes the merge area

  float* sm_m = reinterpret_cast<float*>(pipe);  // [warps][kRows]
  float* sm_l = sm_m + S::kWarps * S::kRows;     // [warps][kRows]
  float* sm_o = sm_l + S::kWarps * S::kRows;     // [warps][kRows][HEAD_DIM]
  float* weights = sm_o + S::kWarps * S::kRows * HEAD_DIM;  // [kRows][kMaxSplits]
  const int g = lane / 4, t = lane % 4;
  if (t == 0) {
    sm_m[warp * S::kRows + g] = m[0];
    sm_m[warp * S::kRows + g + 8] = m[1];
    sm_l[warp * S::kRows + g] = l[0];
    sm_l[warp * S::kRows + g + 8] = l[1];
  }
#pragma unroll
  for (int dt = 0; dt < HEAD_DIM / 8; ++dt) {
    float* row = sm_o + (warp * S::kRows + g) * HEAD_DIM + dt * 8 + 2 * t;
    *reinterpret_cast<float2*>(row) = make_float2(o[dt][0], o[dt][1]);
    *reinterpret_cast<float2*>(row + 8 * HEAD_DIM) = make_float2(o[dt][2], o[dt][3]);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < heads * HEAD_DIM; i += S::kThreads) {
    const int h = i / HEAD_DIM, d = i % HEAD_DIM;
    float mm = -INFINITY, ll = 0.0f, oo = 0.0f;
#pragma unroll
    for (int w = 0; w < S::kWarps; ++w) {
      const float m2 = sm_m[w * S::kRows + h];
      const float l2 = sm_l[w * S::kRows + h];
      const float o2[1] = {sm_o[(w * S::kRows + h) * HEAD_DIM + d]};
      float o1[1] = {oo};
      merge_state<1>(mm, ll, o1, m2, l2, o2);
      oo = o1[0];
    }
    write_result<T, HEAD_DIM>(p, b, qh0, split, h, d, mm, ll, oo);
  }
  if (p.num_splits == 1) return;

  // Split merge: publish this CTA's partials, count arrivals; the last arrival merges.
  const int counter = b * gridDim.y + blockIdx.y;
  if (!arrive_last(p.counters + counter, p.num_splits)) return;
  merge_splits<T, HEAD_DIM, S::kThreads>(p, weights, b, qh0, heads);
  if (threadIdx.x == 0) p.counters[counter] = 0;  // ready for the next launch (graph replays)
}

}  // namespace attention
}  // namespace pykernels
