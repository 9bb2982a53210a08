// Helpers of the paged decode kernel (decode.cuh): parameters, tile geometry, the tile loader,
// fp8 conversion and the result/merge steps. Torch-free.
//
// Design of the kernel:
// One CTA (4 warps) per (split, kv head x head chunk, request) handles up to 16 q heads that share a
// kv head, so each K/V row is read once for the whole GQA group. K/V tiles of 64 tokens stream into
// shared memory through a STAGES-deep cp.async pipeline (16-byte copies gathered through the page
// table, rows padded by 16 bytes so ldmatrix is bank-conflict free). Each warp takes 16 keys of a
// tile and computes on tensor cores (mma.sync m16n8k16): S = Q K^T with the q heads as the 16 rows
// (padded), an fp32 online softmax in the log2 domain on the accumulator fragment, then O += P V
// with P re-packed from the accumulator as the A operand. The 4 warps' states are merged in shared
// memory, then the splits: the last CTA of a request's splits to finish merges them (a counter per
// (request, head chunk) counts arrivals and is reset to 0), so no second kernel is launched.
// An fp8 cache lands raw in shared memory and is widened to q's type in a conversion pass per tile.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>

#include "../common/vec.cuh"
#include "../common/arrival.cuh"
#include "../common/async_copy.cuh"
#include "../common/mma.cuh"

namespace pykernels {
namespace attention {

constexpr int kMaxSplits = 64;  // the merge keeps one weight per (head, split) in shared memory

struct DecodeParams {
  void* out;
  const void* q;
  const void* cache;
  float* partial_o;    // [batch, num_q_heads, num_splits, HEAD_DIM] (num_splits > 1)
  float* partial_lse;  // [batch, num_q_heads, num_splits], log2 domain
  int* counters;       // [batch, gridDim.y], zero between launches
  const int* kv_indptr;
  const int* kv_indices;
  const int* kv_last_page_len;
  int64_t q_stride_b, q_stride_h, o_stride_b, o_stride_h;
  // Cache strides in bytes. A page and a token fit 32 bits (the launcher checks), so a row's
  // address is one 32 x 32 -> 64-bit multiply-add; the K -> V and head offsets may not.
  int64_t kv_bytes, head_bytes;
  uint32_t page_bytes, tok_bytes;
  int num_q_heads, group, head_chunks, page_size, page_shift, num_splits, window_left;
  int q_aligned;    // q rows start 16-byte aligned: loaded with cp.async
  float qk_scale;   // log2e * sm_scale * k_scale (no cap) or sm_scale * k_scale / cap
  float cap_scale;  // cap * log2e, 0 without a soft cap
  float v_scale;
};

// Default pipeline depth: 16-bit cache, head_dim 128: 34 KB per stage, 3 stages + 4 KB of q =
// 106 KB, so 2 CTAs share an SM (228 KB); 2 stages (72 KB) fit 3 CTAs. head_dim 256: 2 stages
// (140 KB, 1 CTA per SM). The launcher also takes 2 or 3 explicitly (a tuning knob).
template <int HEAD_DIM>
constexpr int default_stages() {
  return HEAD_DIM >= 256 ? 2 : 3;
}

// Tile geometry. A stage holds kTile rows of K then kTile rows of V as stored in the cache (16-bit
// rows padded, fp8 rows raw).
template <int HEAD_DIM, int KV_BYTES, int STAGES>
struct DecodeShape {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kRows = 16;          // q heads per CTA: the mma M dimension
  static constexpr int kKeysPerWarp = 16;   // the k dimension of P V
  static constexpr int kTile = kWarps * kKeysPerWarp;
  static constexpr int kStages = STAGES;
  static constexpr int kRowBytes = HEAD_DIM * KV_BYTES;  // a cache row as stored
  static constexpr int kChunks = kRowBytes / 16;
  static constexpr int kPerThread = kTile * kChunks / kThreads;  // 16-byte copies per thread
  static_assert(kTile * kChunks % kThreads == 0, "a tile splits evenly over the threads");
  // 16-bit rows sit 16 bytes apart beyond their length in shared memory (row stride 272 bytes at
  // d=128): the 8 rows an ldmatrix reads then start in 8 different bank groups, without the XOR
  // swizzle the tiles had. Why not the swizzle: ncu (H200, 64x4096) counted 2 L2 sectors per 32
  // bytes that the swizzled cp.async copies brought in (67.2M for 33.6M, a 50% L2 "hit" rate, L2
  // 87% busy) and 1.5x with padded rows (50.4M); the large decode rows ran 6-8% faster (64x4096
  // 290 -> 271 us, 32x32768 1125 -> 1056), 3 stages still fit 2 CTAs an SM. fp8 rows land raw.
  static constexpr int kPadRowBytes = KV_BYTES == 2 ? kRowBytes + 16 : kRowBytes;
  static constexpr int kStageBytes = 2 * kTile * kPadRowBytes;
  static constexpr int kWideRowBytes = HEAD_DIM * 2;  // a row widened to 16 bits
  static constexpr int kWideChunks = kWideRowBytes / 16;  // >= 8: the swizzle permutes 8 chunks
  static constexpr int kQBytes = kRows * kWideRowBytes;
  static constexpr int kConvBytes = KV_BYTES == 1 ? 2 * kTile * kWideRowBytes : 0;
  static constexpr int kPipeBytes = kStages * kStageBytes + kConvBytes;
  static constexpr int kMergeBytes = (kWarps * kRows * (HEAD_DIM + 2) + kRows * kMaxSplits) * 4;
  static constexpr int kSmemBytes = kQBytes + (kPipeBytes > kMergeBytes ? kPipeBytes : kMergeBytes);
};

// Byte offset of 16-byte chunk `chunk` of row `row` in a swizzled 16-bit tile: XOR-ing the chunk
// with row % 8 puts the 8 rows an ldmatrix reads in 8 different bank groups.
template <int ROW_BYTES>
__device__ __forceinline__ int swizzle(int row, int chunk) {
  return row * ROW_BYTES + ((chunk ^ (row & 7)) << 4);
}

// 8 fp8 values as 8 16-bit T values (one 16-byte chunk).
template <typename T>
__device__ __forceinline__ uint4 widen_fp8x8(uint2 raw);

template <>
__device__ __forceinline__ uint4 widen_fp8x8<__half>(uint2 raw) {
  const __nv_fp8x2_storage_t* p = reinterpret_cast<const __nv_fp8x2_storage_t*>(&raw);
  uint4 out;
  uint32_t* o = reinterpret_cast<uint32_t*>(&out);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(p[i], __NV_E4M3);
    o[i] = *reinterpret_cast<const uint32_t*>(&h);
  }
  return out;
}

template <>
__device__ __forceinline__ uint4 widen_fp8x8<__nv_bfloat16>(uint2 raw) {
  const __nv_fp8x2_storage_t* p = reinterpret_cast<const __nv_fp8x2_storage_t*>(&raw);
  uint4 out;
  uint32_t* o = reinterpret_cast<uint32_t*>(&out);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    // e4m3 -> half -> float -> bf16 is exact: e4m3 has 3 mantissa bits and exponents in -9..8.
    const float2 f = __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(p[i], __NV_E4M3)));
    const __nv_bfloat162 b = __floats2bfloat162_rn(f.x, f.y);
    o[i] = *reinterpret_cast<const uint32_t*>(&b);
  }
  return out;
}

__device__ __forceinline__ float safe_max(float m) { return m == -INFINITY ? 0.0f : m; }

// Merges softmax state (m2, l2, o2) into (m, l, o); m = -inf means empty.
template <int N>
__device__ __forceinline__ void merge_state(float& m, float& l, float (&o)[N], float m2,
                                            float l2, const float (&o2)[N]) {
  const float mn = fmaxf(m, m2);
  const float a = exp2f(m - safe_max(mn));
  const float b = exp2f(m2 - safe_max(mn));
  l = l * a + l2 * b;
#pragma unroll
  for (int i = 0; i < N; ++i) o[i] = o[i] * a + o2[i] * b;
  m = mn;
}

// Page of each tile row this thread copies (-1: past hi). Fetched one tile ahead of its copies,
// so the index loads' latency hides behind a tile of compute instead of stalling the warp.
template <typename S>
struct TileRows {
  int page[S::kPerThread];
};

// Page number and slot of this thread's rows t, t + step, t + 2 step, ... POW2 (page size
// 2^page_shift, the usual case): a shift and a mask a row. Otherwise one division, then a carry
// (a division a row made the loader's instructions ~half the loop's).
template <bool POW2>
struct RowCursor {
  int t, page_no, slot;
  __device__ __forceinline__ RowCursor(const DecodeParams& p, int t0) : t(t0) {
    if constexpr (!POW2) {
      page_no = t0 / p.page_size;
      slot = t0 - page_no * p.page_size;
    }
  }
  __device__ __forceinline__ int page(const DecodeParams& p, int i, int step) const {
    if constexpr (POW2) return (t + i * step) >> p.page_shift;
    return page_no;
  }
  __device__ __forceinline__ int slot_at(const DecodeParams& p, int i, int step) const {
    if constexpr (POW2) return (t + i * step) & (p.page_size - 1);
    return slot;
  }
  __device__ __forceinline__ void advance(const DecodeParams& p, int step) {
    if constexpr (!POW2) {
      slot += step;
      while (slot >= p.page_size) {  // once at most for pages >= step (8 rows at d=128)
        slot -= p.page_size;
        ++page_no;
      }
    }
  }
};

// This thread's rows are r0, r0 + kRowStep, ... of the tile (r0 = threadIdx.x / kChunks).
template <typename S, bool POW2>
__device__ __forceinline__ void fetch_rows(TileRows<S>& rows, const DecodeParams& p,
                                           const int* pages, int t0, int hi) {
  constexpr int kRowStep = S::kThreads / S::kChunks;
  const int t = t0 + threadIdx.x / S::kChunks;
  RowCursor<POW2> cur(p, t);
#pragma unroll
  for (int i = 0; i < S::kPerThread; ++i) {
    rows.page[i] = t + i * kRowStep < hi ? __ldg(pages + cur.page(p, i, kRowStep)) : -1;
    cur.advance(p, kRowStep);
  }
}

template <typename S>
__device__ __forceinline__ void fetch_pages(TileRows<S>& rows, const DecodeParams& p,
                                            const int* pages, int t0, int hi) {
  if (p.page_shift >= 0) {  // uniform
    fetch_rows<S, true>(rows, p, pages, t0, hi);
  } else {
    fetch_rows<S, false>(rows, p, pages, t0, hi);
  }
}

// Issues the cp.async copies of a tile's K and V rows (rows past hi are zero-filled, so P V never
// meets garbage). 16-bit rows land padded for ldmatrix; fp8 rows land raw for the widening pass.
// `head` is this CTA's kv head in page 0 plus the thread's 16-byte column. The address math is
// 32-bit but for one wide multiply-add a row: with int64 strides each row took ~18 instructions
// (sign extensions, 64 x 64-bit products, selects). The main loop of the bf16 d=128 kernel went
// from ~870 to ~500 instructions a warp and tile (SASS); on an H200 that moved the small rows by
// 1-3% (1x4096 13.6 -> 13.45 us, 4x4096 27.8 -> 27.2) and the large rows not at all.
template <typename S, int KV_BYTES, bool POW2>
__device__ __forceinline__ void issue_rows(char* stage, const TileRows<S>& rows,
                                           const DecodeParams& p, const char* head, int t0) {
  constexpr int kRowStep = S::kThreads / S::kChunks;
  static_assert(S::kThreads % S::kChunks == 0, "a thread copies one column of its rows");
  const int r0 = threadIdx.x / S::kChunks;
  const int col = threadIdx.x % S::kChunks;
  RowCursor<POW2> cur(p, t0 + r0);
#pragma unroll
  for (int i = 0; i < S::kPerThread; ++i) {
    const int r = r0 + i * kRowStep;
    // A row past hi (page -1) reads nothing but still gets a legal address: page 0's.
    const unsigned skip = (unsigned)rows.page[i] >> 31;
    const uint32_t page = max(rows.page[i], 0);
    const uint32_t slot = cur.slot_at(p, i, kRowStep);
    cur.advance(p, kRowStep);
    const char* src = head + (uint64_t)page * p.page_bytes + slot * p.tok_bytes;
    char* dst = stage + r * S::kPadRowBytes + col * 16;
    cp_async_16_unless(dst, src, skip);
    cp_async_16_unless(dst + S::kTile * S::kPadRowBytes, src + p.kv_bytes, skip);
  }
}

template <typename S, int KV_BYTES>
__device__ __forceinline__ void issue_tile(char* stage, const TileRows<S>& rows,
                                           const DecodeParams& p, const char* head, int t0) {
  if (p.page_shift >= 0) {  // uniform
    issue_rows<S, KV_BYTES, true>(stage, rows, p, head, t0);
  } else {
    issue_rows<S, KV_BYTES, false>(stage, rows, p, head, t0);
  }
}

// Widens a landed fp8 stage (K rows then V rows, raw) into the swizzled 16-bit layout at `wide`.
template <typename T, typename S>
__device__ __forceinline__ void widen_tile(char* wide, const char* stage) {
  constexpr int kUnits = 2 * S::kTile * S::kWideChunks;  // 16-byte output chunks
#pragma unroll 4
  for (int u = threadIdx.x; u < kUnits; u += S::kThreads) {
    const int r = u / S::kWideChunks;  // rows 0..kTile-1 are K, kTile.. are V
    const int c = u % S::kWideChunks;
    const uint2 raw = *reinterpret_cast<const uint2*>(stage + r * S::kRowBytes + c * 8);
    *reinterpret_cast<uint4*>(wide + swizzle<S::kWideRowBytes>(r, c)) = widen_fp8x8<T>(raw);
  }
}

// Final normalization of one (head, dim) output of this CTA, then either the output itself (one
// split) or the split's partial (normalized output + log2-sum-exp).
template <typename T, int HEAD_DIM>
__device__ __forceinline__ void write_result(const DecodeParams& p, int b, int qh0, int split,
                                             int h, int d, float m, float l, float o) {
  const float r = l > 0.0f ? o / l : 0.0f;
  const int qh = qh0 + h;
  if (p.num_splits == 1) {
    T* out = static_cast<T*>(p.out) + b * p.o_stride_b + qh * p.o_stride_h;
    out[d] = from_float<T>(r * p.v_scale);
    return;
  }
  const int64_t row = ((int64_t)b * p.num_q_heads + qh) * p.num_splits + split;
  p.partial_o[row * HEAD_DIM + d] = r;
  if (d == 0) p.partial_lse[row] = l > 0.0f ? m + log2f(l) : -INFINITY;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// The last CTA of a (request, head group) to finish merges every split's partial. Each step
// keeps many L2 loads in flight (a serial loop over splits would pay one L2 latency per split).
template <typename T, int HEAD_DIM, int THREADS>
__device__ void merge_splits(const DecodeParams& p, float* weights, int b, int qh0, int heads) {
  const int S = p.num_splits;
  const int64_t row0 = ((int64_t)b * p.num_q_heads + qh0) * S;  // head h, split s: row0 + h*S + s
  for (int i = threadIdx.x; i < heads * S; i += THREADS) {
    weights[(i / S) * kMaxSplits + i % S] = __ldcg(p.partial_lse + row0 + i);
  }
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int h = warp; h < heads; h += THREADS / 32) {  // a warp per head: lse -> weights
    float* w = weights + h * kMaxSplits;
    float m = -INFINITY;
    for (int s = lane; s < S; s += 32) m = fmaxf(m, w[s]);
    m = safe_max(warp_max(m));
    float total = 0.0f;
    for (int s = lane; s < S; s += 32) {
      w[s] = exp2f(w[s] - m);  // empty splits (lse -inf) weigh 0
      total += w[s];
    }
    total = warp_reduce_sum(total);
    const float inv = total > 0.0f ? 1.0f / total : 0.0f;
    for (int s = lane; s < S; s += 32) w[s] *= inv;
  }
  __syncthreads();
  constexpr int kCols = HEAD_DIM / 4;  // float4 columns of a partial row
  for (int i = threadIdx.x; i < heads * kCols; i += THREADS) {
    const int h = i / kCols, c = i % kCols;
    const float4* src = reinterpret_cast<const float4*>(p.partial_o + (row0 + h * S) * HEAD_DIM) + c;
    const float* w = weights + h * kMaxSplits;
    float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll 8
    for (int s = 0; s < S; ++s) {
      const float4 x = __ldcg(src + s * kCols);
      acc.x = fmaf(w[s], x.x, acc.x);
      acc.y = fmaf(w[s], x.y, acc.y);
      acc.z = fmaf(w[s], x.z, acc.z);
      acc.w = fmaf(w[s], x.w, acc.w);
    }
    T* out = static_cast<T*>(p.out) + b * p.o_stride_b + (qh0 + h) * p.o_stride_h + 4 * c;
    out[0] = from_float<T>(acc.x * p.v_scale);
    out[1] = from_float<T>(acc.y * p.v_scale);
    out[2] = from_float<T>(acc.z * p.v_scale);
    out[3] = from_float<T>(acc.w * p.v_scale);
  }
}

}  // namespace attention
}  // namespace pykernels
