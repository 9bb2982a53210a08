// FP8 weight-only GEMM (W8A16), Marlin's ideas rewritten for our layout: out[m, n] =
// sum_k x[m, k] * q[n, k] * scale[n (, k / 128)], x bf16/fp16, q e4m3. Torch-free.
//
// Swap-AB: the weight is the mma A operand (m16 = 16 output channels) and the tokens are its n8
// side, so M = 1 wastes 7/8 of an mma instead of 15/16. A CTA (4 warps) owns BN = 64 MI channels
// x BM tokens and a range of 128-wide K panels (split-K); warp w owns channels
// [16 MI w, 16 MI (w + 1)): with MI = 2 each activation fragment read from shared memory feeds two
// mma (at BM = 32, MI = 1 reads 2x the weight bytes in activations per panel).
//
// Per K panel one pipeline stage holds (cp.async, XOR-swizzled 16-byte chunks):
//   W: BN rows x 128 fp8 (one contiguous run of the packed [KT, N, 128] tensor),
//   X: BM rows x 128 activations (BM x 256 B), and for group scales BN fp32.
// A fragments come from ldmatrix on the fp8 bytes: lane (g, t) gets bytes 4t..4t+3 of rows g and
// g + 8 per 16-k step, which the packed layout 2 (docs/quant.md) fills with k 2t, 2t+1, 2t+8,
// 2t+9: the mma's own A-fragment k's, so the activations stay in k order (B fragments by
// ldmatrix here, the wgmma path's B straight from shared memory).
// FP8 -> 16-bit by bit tricks, 2 integer-ALU and 2 FMA-pipe instructions per 2 weights (the ALU
// pipe issues every other cycle, so at M <= 16 the dequant's ALU share sets the speed): a byte
// permute (ALU) puts two e4m3 bytes in the low bytes of two 16-bit lanes, a multiply by 2^4
// (bf16) or 2^7 (fp16) moves exponent and mantissa into place (IMAD), a LOP3 (ALU) picks the sign
// bits that landed at bit 11 (14) and one IMAD moves them to bit 15 (t + 15 s = t - s + 16 s).
// The result is the weight times 2^-(bias difference) (2^-120 for bf16, 2^-8 for fp16). With
// per-channel scales that factor is undone once per output in the fp32 epilogue (as Marlin folds
// it into its scales); with group scales one HMUL2 by scale x 2^(bias difference) per pair
// rebases it. Tiny bf16 products land in fp32's subnormal range, which the mma keeps:
// `test_tiny_activations` checks activations down to 1e-7.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "../common/arrival.cuh"
#include "../common/async_copy.cuh"
#include "../common/mma.cuh"
#include "../common/vec.cuh"
#include "../common/wgmma.cuh"

namespace pykernels {
namespace fp8_gemm {

constexpr int kThreads = 128;  // 4 warps
constexpr int kBlockK = 128;   // one packed K panel (and one scale group)

struct Params {
  const void* x;        // [M, K] with row stride x_stride (elements), 16-byte aligned rows
  const uint8_t* w;     // [KT, N, 128] e4m3
  const float* scales;  // [N] or [KT, N]
  void* out;            // [M, N] with row stride out_stride
  float* partial;       // split-K: [tiles, splits, BM / 8, 128 threads] float4 (lock mode) or
                        // [tiles, BM / 8, 128] float4 zeroed (atomic mode)
  int* locks;           // [tiles] zeroed; each tile's counter is reset by its last CTA
  int64_t x_stride, out_stride;
  int m, n, k, kt;      // kt = ceil(k / 128)
  int splits, stages;
  bool atomic;
};

template <typename T>
struct Fp8Traits;

template <>
struct Fp8Traits<__nv_bfloat16> {
  // Exponent field at bits 14..7 (8 bits): e4m3's eeee.mmm (bits 6..0) move up by 4 (into
  // bits 10..4); the sign then sits at bit 11.
  static constexpr uint32_t kShiftMul = 1u << 4;
  static constexpr uint32_t kSignBits = 0x08000800u;
  static constexpr uint32_t kSignMul = 15u;  // bit 11 -> bit 15
  static __device__ __forceinline__ float bias() { return 0x1p120f; }  // 2^(127 - 7)
};

template <>
struct Fp8Traits<__half> {
  // Exponent field at bits 14..10 (5 bits): eeee.mmm move up by 7 (into bits 13..7); the sign
  // then sits at bit 14.
  static constexpr uint32_t kShiftMul = 1u << 7;
  static constexpr uint32_t kSignBits = 0x40004000u;
  static constexpr uint32_t kSignMul = 1u;  // bit 14 -> bit 15
  static __device__ __forceinline__ float bias() { return 256.0f; }  // 2^(15 - 7)
};

// a * b + c on the FMA pipe (IMAD): ptxas keeps mad.lo there, where a shift or an add would take
// an ALU slot.
__device__ __forceinline__ uint32_t imad(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("mad.lo.u32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

template <typename T>
__device__ __forceinline__ uint32_t mul2(uint32_t a, uint32_t b);

template <>
__device__ __forceinline__ uint32_t mul2<__nv_bfloat16>(uint32_t a, uint32_t b) {
  __nv_bfloat162 r = __hmul2(*reinterpret_cast<__nv_bfloat162*>(&a),
                             *reinterpret_cast<__nv_bfloat162*>(&b));
  return *reinterpret_cast<uint32_t*>(&r);
}

template <>
__device__ __forceinline__ uint32_t mul2<__half>(uint32_t a, uint32_t b) {
  __half2 r = __hmul2(*reinterpret_cast<__half2*>(&a), *reinterpret_cast<__half2*>(&b));
  return *reinterpret_cast<uint32_t*>(&r);
}

// Two e4m3 bytes of `word` (selected by `perm`: 0x4140 the low two, 0x4342 the high two) as two
// 16-bit values times 2^-(bias difference), then times `scale2` (both lanes) when kScaled; the
// lower byte lands in the low lane.
template <typename T, uint32_t kPerm, bool kScaled>
__device__ __forceinline__ uint32_t dequant2(uint32_t word, uint32_t scale2) {
  using Tr = Fp8Traits<T>;
  const uint32_t v = __byte_perm(word, 0u, kPerm);  // bytes at bits 7..0 and 23..16
  const uint32_t t = imad(v, Tr::kShiftMul, 0u);    // exponent and mantissa in place
  const uint32_t bits = imad(t & Tr::kSignBits, Tr::kSignMul, t);  // sign to bit 15 (and 31)
  if constexpr (kScaled) return mul2<T>(bits, scale2);
  return bits;
}

// The mma A fragment of 16-k step h of an ldmatrix.x4 on the fp8 bytes (w4: rows g, g + 8 of
// both steps), dequantized by dequant2 in the mma's k order; sc: those rows' group scales.
template <typename T, bool kGrouped>
__device__ __forceinline__ void dequant_frag(uint32_t (&a)[4], const uint32_t (&w4)[4], int h,
                                             const uint32_t (&sc)[2]) {
  const uint32_t lo = w4[2 * h], hi = w4[2 * h + 1];  // rows g, g + 8
  a[0] = dequant2<T, 0x4140, kGrouped>(lo, sc[0]);
  a[1] = dequant2<T, 0x4140, kGrouped>(hi, sc[1]);
  a[2] = dequant2<T, 0x4342, kGrouped>(lo, sc[0]);
  a[3] = dequant2<T, 0x4342, kGrouped>(hi, sc[1]);
}

template <typename T>
__device__ __forceinline__ uint32_t splat2(float s) {
  return pack2<T>(s, s);
}

// Shared-memory byte offset of 16-byte chunk c of row r (rows of `row_bytes`): XOR swizzle so
// that 8 rows read at one logical column hit 8 different bank groups.
__device__ __forceinline__ int swz(int r, int c, int row_bytes) {
  return r * row_bytes + ((c ^ (r & 7)) << 4);
}

// One instantiation's tile: MI m16 weight tiles per warp (BN = 64 MI channels per CTA), BM
// tokens (BM / 8 mma n-blocks). kWg: the wgmma path (below): stages start on 1 KB boundaries, so
// every stage's X tile sits where the 128-byte swizzle expects it.
template <int MI, int BM, bool kGrouped, bool kWg = false>
struct Tile {
  static constexpr int kBN = 4 * 16 * MI;
  static constexpr int kNB = BM / 8;
  static constexpr int kWBytes = kBN * kBlockK;
  static constexpr int kXBytes = BM * kBlockK * 2;
  static constexpr int kSBytes = kGrouped ? kBN * 4 : 0;
  static constexpr int kStageBytes = kWg ? (kWBytes + kXBytes + kSBytes + 1023) / 1024 * 1024
                                         : kWBytes + kXBytes + kSBytes;
  static constexpr int kWChunks = kWBytes / 16 / kThreads;  // per thread per stage
  static constexpr int kXChunks = BM * 16 / kThreads;       // BM >= 8: >= 1
};

// The cp.async copies of one K panel, with every per-thread address computed once: a stage is
// W (BN rows x 128 B, one contiguous run of the packed weight), X (BM rows x 256 B; rows >= m
// and, in a K % 128 == 64 tail, columns >= k zero-filled) and the group scales.
template <typename T, int MI, int BM, bool kGrouped, bool kWg = false>
struct Loader {
  using Tl = Tile<MI, BM, kGrouped, kWg>;
  const uint8_t* w;  // this thread's first W chunk in panel 0
  const T* x;        // this thread's first X chunk in panel 0
  const T* x_any;    // a valid address for the zero-filled copies (nothing is read from it)
  const float* s;
  int64_t w_panel, x_row8;  // bytes between panels; elements between rows r and r + 8
  int w_dst, x_dst, x_rows, x_col;  // shared offsets; valid X chunks; this thread's column

  __device__ __forceinline__ Loader(const Params& p, int n0, int m0) {
    const int tid = threadIdx.x;
    const int wr = tid >> 3, xr = tid >> 4, xc = tid & 15;
    w = p.w + (int64_t)n0 * kBlockK + tid * 16;
    w_panel = (int64_t)p.n * kBlockK;
    w_dst = swz(wr, tid & 7, kBlockK);
    x_any = static_cast<const T*>(p.x);
    s = p.scales + n0 + tid * 4;
    x_col = xc * 8;
    x_row8 = 8 * p.x_stride;
    x = x_any + (int64_t)(m0 + xr) * p.x_stride + x_col;
    // kWg: the wgmma B tile, two 128-byte-swizzled K-major halves (k 0..63, 64..127) of BM rows
    // of 128 bytes (wgmma.cuh); else rows of 256 bytes, XOR-swizzled over 8 rows.
    x_dst = Tl::kWBytes + (kWg ? (xc >> 3) * BM * 128 + xr * 128 + (((xc & 7) ^ (xr & 7)) << 4)
                               : swz(xr, xc, kBlockK * 2));
    const int rows_left = p.m - m0 - xr;  // chunk i is row xr + 8 i: valid while 8 i < rows_left
    x_rows = rows_left <= 0 ? 0 : min(Tl::kXChunks, (rows_left + 7) / 8);
  }

  __device__ __forceinline__ void load(const Params& p, uint8_t* stage, int kt) const {
    const uint8_t* wsrc = w + kt * w_panel;
#pragma unroll
    for (int i = 0; i < Tl::kWChunks; ++i) {
      cp_async_16(stage + w_dst + i * 16 * kBlockK, wsrc + i * 16 * kThreads, true);
    }
    const bool col_ok = kt * kBlockK + x_col < p.k;
    const T* xsrc = x + kt * kBlockK;
    constexpr int kRow8 = kWg ? 8 * 128 : 8 * kBlockK * 2;  // shared bytes between rows r, r + 8
#pragma unroll
    for (int i = 0; i < Tl::kXChunks; ++i) {
      const bool ok = i < x_rows && col_ok;
      cp_async_16(stage + x_dst + i * kRow8, ok ? xsrc + i * x_row8 : x_any, ok);
    }
    if constexpr (kGrouped) {
      if (threadIdx.x < Tl::kBN / 4) {
        cp_async_16(stage + Tl::kWBytes + Tl::kXBytes + threadIdx.x * 16, s + kt * p.n, true);
      }
    }
  }
};

// acc[mi][j] += W(m16 tile mi of this warp) x X(tokens 8j..8j+7)^T over one K panel in shared
// memory; without group scales acc carries the 2^-(bias difference) of the raw dequant (store_tile
// undoes it).
template <typename T, int MI, int BM, bool kGrouped>
__device__ __forceinline__ void compute_stage(const uint8_t* stage,
                                              float (&acc)[MI][BM / 8][4]) {
  using Tl = Tile<MI, BM, kGrouped>;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2;
  uint32_t sc[MI][2] = {};  // group scale x 2^(bias difference), rows g and g + 8 of each m16 tile
  if constexpr (kGrouped) {
    const float* s = reinterpret_cast<const float*>(stage + Tl::kWBytes + Tl::kXBytes);
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) {
      const int row = warp * 16 * MI + mi * 16 + g;
      sc[mi][0] = splat2<T>(s[row] * Fp8Traits<T>::bias());
      sc[mi][1] = splat2<T>(s[row + 8] * Fp8Traits<T>::bias());
    }
  }
  // ldmatrix.x4 row addresses: lanes 8q..8q+7 give matrix q = (rows +8 if q odd, chunk +1 if
  // q > 1). The swizzle XOR is the same for every chunk pair: only the pair index varies.
  const int lrow = warp * 16 * MI + (lane & 7) + ((lane >> 3) & 1) * 8;
  const int lx = (lane >> 4) ^ (lrow & 7);
  const uint8_t* wbase = stage + lrow * kBlockK;
  // X (B fragments, k order): per 32 k and n-block j one ldmatrix.x4 over token rows
  // 8j..8j+7, matrix q = chunk 4 kp + q (lanes 8q..8q+7 address it): lane (g, t) gets k 2t, 2t+1
  // and k 2t+8, 2t+9 of token 8j + g for both 16-k steps (b[0], b[1]: the first; b[2], b[3]:
  // the second). Half an instruction per n-block and 16-k step (layout 1 needed one LDS.64; an
  // ldmatrix per 16-k step, x4 over two n-blocks or x2 for a lone one, ran M = 1 16% slower on
  // 28672 x 4096, H200).
  const uint8_t* xbase = stage + Tl::kWBytes + (lane & 7) * kBlockK * 2;
  const int xq = lane >> 3;
#pragma unroll
  for (int kp = 0; kp < kBlockK / 32; ++kp) {
    uint32_t w4[MI][4];
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) {
      ldmatrix_x4(w4[mi], wbase + mi * 16 * kBlockK + (((2 * kp) ^ lx) << 4));
    }
    uint32_t b[BM / 8][4];
#pragma unroll
    for (int j = 0; j < BM / 8; ++j) {
      ldmatrix_x4(b[j], xbase + j * 8 * kBlockK * 2 + (((4 * kp + xq) ^ (lane & 7)) << 4));
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // the two 16-k steps of this ldmatrix
      uint32_t a[MI][4];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) dequant_frag<T, kGrouped>(a[mi], w4[mi], h, sc[mi]);
#pragma unroll
      for (int j = 0; j < BM / 8; ++j) {
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) {
          mma_16816<T>(acc[mi][j], a[mi], b[j][2 * h], b[j][2 * h + 1]);
        }
      }
    }
  }
}

// The wgmma path (kWg, sm_90a): the same K panel as compute_stage, but one warpgroup MMA
// (m64 x BM x k16, A = 64 channels from registers, B = the BM tokens from shared memory by
// descriptor) where compute_stage issues 4 warps x BM / 8 mma.sync, each reading its activation
// fragment from shared memory: the tensor core reads B once for the warpgroup. Warp w holds
// channels 64 mi + 16 w .. + 15 of wgmma mi (compute_stage: 16 (MI w + mi) ..); the A fragments
// come from ldmatrix on the fp8 bytes and dequant2 as there (k order: packed layout 2), B is
// the activations in k order. Two fragment buffers: step s + 1 is dequantized while step s's
// wgmma runs.
template <typename T, int MI, int BM, bool kGrouped>
__device__ __forceinline__ void compute_stage_wg(const uint8_t* stage,
                                                 float (&acc)[MI][BM / 8][4]) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Tl = Tile<MI, BM, kGrouped, true>;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2;
  uint32_t sc[MI][2] = {};
  if constexpr (kGrouped) {
    const float* s = reinterpret_cast<const float*>(stage + Tl::kWBytes + Tl::kXBytes);
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) {
      const int row = mi * 64 + warp * 16 + g;
      sc[mi][0] = splat2<T>(s[row] * Fp8Traits<T>::bias());
      sc[mi][1] = splat2<T>(s[row + 8] * Fp8Traits<T>::bias());
    }
  }
  // ldmatrix.x4 rows as in compute_stage; the row's swizzle XOR (row % 8) is lane % 8 for
  // every mi.
  const uint8_t* wbase = stage + (warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * kBlockK;
  const int lx = (lane >> 4) ^ (lane & 7);
  const uint8_t* xs = stage + Tl::kWBytes;
  uint32_t a[2][MI][4];
  // the accumulator in place before the MMAs
#pragma unroll
  for (int mi = 0; mi < MI; ++mi) keep_live(reinterpret_cast<float(&)[BM / 2]>(acc[mi]));
#pragma unroll
  for (int kp = 0; kp < kBlockK / 32; ++kp) {
    uint32_t w4[MI][4];
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) {
      ldmatrix_x4(w4[mi], wbase + mi * 64 * kBlockK + (((2 * kp) ^ lx) << 4));
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // k16 step 2 kp + h, fragment buffer h
      if (kp > 0) {  // buffer h was read by step 2 kp + h - 2: retire it (one group may stay)
        wgmma_wait<1>();
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) keep_live(a[h][mi]);
      }
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) dequant_frag<T, kGrouped>(a[h][mi], w4[mi], h, sc[mi]);
      const int step = 2 * kp + h;  // B's 16 k: half step / 4 of the tile, 32 bytes a step in it
      const uint64_t desc = wgmma_desc_sw128(xs + (step >> 2) * BM * 128 + (step & 3) * 32);
      wgmma_fence();
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) {
        WgmmaRS<T, BM>::mma(reinterpret_cast<float(&)[BM / 2]>(acc[mi]), a[h][mi], desc);
      }
      wgmma_commit();
    }
  }
  wgmma_wait<0>();  // before the stage is refilled and the accumulator read
#pragma unroll
  for (int mi = 0; mi < MI; ++mi) {
    keep_live(a[0][mi]);
    keep_live(a[1][mi]);
    keep_live(reinterpret_cast<float(&)[BM / 2]>(acc[mi]));
  }
#else
  __trap();  // built without sm_90a: the host refuses wgmma configs on other GPUs
#endif
}

// Scales (per channel) and stores one CTA's tile: acc[mi][j] = (channel g / g + 8 of m16 tile
// mi, tokens 8j + 2t, + 1).
template <typename T, int MI, int BM, bool kGrouped, bool kWg>
__device__ __forceinline__ void store_tile(const Params& p, const float (&acc)[MI][BM / 8][4],
                                           int n0, int m0) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int mi = 0; mi < MI; ++mi) {
    const int n_lo = n0 + (kWg ? mi * 64 + warp * 16 : warp * 16 * MI + mi * 16) + g;
    const int n_hi = n_lo + 8;
    // Without group scales: 2^(bias difference) first (exact), then the channel scale, so the
    // product of the two (up to 2^128 for bf16) is never formed.
    const float bias = kGrouped ? 1.f : Fp8Traits<T>::bias();
    const float sc_lo = kGrouped ? 1.f : __ldg(p.scales + n_lo);
    const float sc_hi = kGrouped ? 1.f : __ldg(p.scales + n_hi);
#pragma unroll
    for (int j = 0; j < BM / 8; ++j) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int m = m0 + j * 8 + 2 * t + c;
        if (m < p.m) {
          out[(int64_t)m * p.out_stride + n_lo] = from_float<T>(acc[mi][j][c] * bias * sc_lo);
          out[(int64_t)m * p.out_stride + n_hi] =
              from_float<T>(acc[mi][j][2 + c] * bias * sc_hi);
        }
      }
    }
  }
}

// Split-K: every CTA of a tile leaves its partial sums, the last to arrive adds them up in split
// order (so the lock mode is deterministic) and stores. Returns false in the CTAs that are not
// last. Partials are float4 per thread and fragment, [tile][split][fragment][thread]: coalesced.
template <int NF>
__device__ __forceinline__ bool reduce_splits(const Params& p, float (&acc)[NF][4], int tile,
                                              int split) {
  const int tid = threadIdx.x;
  float4* base = reinterpret_cast<float4*>(p.partial);
  if (p.atomic) {
    float4* mine = base + (int64_t)tile * NF * kThreads;
#pragma unroll
    for (int f = 0; f < NF; ++f) {
      atomicAdd(mine + f * kThreads + tid, make_float4(acc[f][0], acc[f][1], acc[f][2], acc[f][3]));
    }
  } else {
    float4* mine = base + ((int64_t)tile * p.splits + split) * NF * kThreads;
#pragma unroll
    for (int f = 0; f < NF; ++f) {
      __stcg(mine + f * kThreads + tid, make_float4(acc[f][0], acc[f][1], acc[f][2], acc[f][3]));
    }
  }
  if (!arrive_last(p.locks + tile, p.splits)) return false;
  const int parts = p.atomic ? 1 : p.splits;
  const float4* src = base + (int64_t)tile * parts * NF * kThreads;
#pragma unroll
  for (int f = 0; f < NF; ++f) acc[f][0] = acc[f][1] = acc[f][2] = acc[f][3] = 0.f;
  for (int s = 0; s < parts; ++s) {
#pragma unroll
    for (int f = 0; f < NF; ++f) {
      const float4 v = __ldcg(src + (s * NF + f) * kThreads + tid);
      acc[f][0] += v.x, acc[f][1] += v.y, acc[f][2] += v.z, acc[f][3] += v.w;
    }
  }
  if (tid == 0) p.locks[tile] = 0;  // ready for the next launch (and CUDA-graph replay)
  return true;
}

template <int N>
__device__ __forceinline__ void wait_upto(int pending) {
  // cp.async.wait_group takes an immediate: dispatch the run-time depth (0..N).
  if constexpr (N > 0) {
    if (pending >= N) return cp_async_wait<N>();
    return wait_upto<N - 1>(pending);
  } else {
    cp_async_wait<0>();
  }
}

// grid (m tiles, n tiles, splits): m tiles vary fastest so the CTAs that share a weight panel run
// together and all but the first read it from L2.
// kWg: the K panels on wgmma (compute_stage_wg), else mma.sync (compute_stage).
template <typename T, int MI, int BM, bool kGrouped, bool kWg>
__global__ void __launch_bounds__(kThreads) fp8_gemm_kernel(const Params p) {
  extern __shared__ __align__(128) uint8_t smem_raw[];
  // kWg: the stages from the next 1 KB boundary (the B tiles' swizzle atoms); the launcher adds
  // that slack to the dynamic shared memory. (An __align__(1024) declaration would reserve
  // 1 KB of static shared memory in every instantiation.)
  uint8_t* smem = smem_raw;
  if constexpr (kWg) smem += (1024 - (smem_addr(smem_raw) & 1023)) & 1023;
  using Tl = Tile<MI, BM, kGrouped, kWg>;
  constexpr int kStage = Tl::kStageBytes;
  const int m0 = blockIdx.x * BM, n0 = blockIdx.y * Tl::kBN, split = blockIdx.z;
  const int kt0 = (int)((int64_t)split * p.kt / p.splits);
  const int kt1 = (int)((int64_t)(split + 1) * p.kt / p.splits);
  const int steps = kt1 - kt0, stages = p.stages;
  const Loader<T, MI, BM, kGrouped, kWg> loader(p, n0, m0);
  // One K panel in shared memory. kWg: wgmma reads it through the async proxy, so each
  // thread's landed cp.async writes are fenced over to it before the barrier that publishes
  // them.
  auto compute = [&](const uint8_t* stage, float (&a)[MI][BM / 8][4]) {
    if constexpr (kWg) {
      compute_stage_wg<T, MI, BM, kGrouped>(stage, a);
    } else {
      compute_stage<T, MI, BM, kGrouped>(stage, a);
    }
  };

  float acc[MI][BM / 8][4];
#pragma unroll
  for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
    for (int j = 0; j < BM / 8; ++j) {
      acc[mi][j][0] = acc[mi][j][1] = acc[mi][j][2] = acc[mi][j][3] = 0.f;
    }
  }

  if (stages == 1) {  // prefetch off: load a panel, wait for it, compute, repeat
    for (int i = 0; i < steps; ++i) {
      loader.load(p, smem, kt0 + i);
      cp_async_commit();
      cp_async_wait<0>();
      if constexpr (kWg) fence_proxy_async();
      __syncthreads();
      compute(smem, acc);
      __syncthreads();
    }
  } else {
    for (int i = 0; i < stages - 1; ++i) {
      if (i < steps) loader.load(p, smem + i * kStage, kt0 + i);
      cp_async_commit();  // empty groups keep the count uniform
    }
    int read = 0, write = stages - 1;
    for (int i = 0; i < steps; ++i) {
      wait_upto<6>(stages - 2);  // panel i has landed; stages - 2 younger ones may be in flight
      if constexpr (kWg) fence_proxy_async();
      __syncthreads();           // ... for every thread, and all are done with panel i - 1
      if (i + stages - 1 < steps) loader.load(p, smem + write * kStage, kt0 + i + stages - 1);
      cp_async_commit();
      compute(smem + read * kStage, acc);
      read = read + 1 == stages ? 0 : read + 1;
      write = write + 1 == stages ? 0 : write + 1;
    }
    cp_async_wait<0>();
  }
  if (p.splits > 1) {
    const int tile = blockIdx.y * gridDim.x + blockIdx.x;
    if (!reduce_splits<MI * BM / 8>(p, reinterpret_cast<float(&)[MI * BM / 8][4]>(acc), tile,
                                    split)) {
      return;
    }
  }
  store_tile<T, MI, BM, kGrouped, kWg>(p, acc, n0, m0);
}

}  // namespace fp8_gemm
}  // namespace pykernels
