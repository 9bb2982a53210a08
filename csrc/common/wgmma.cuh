// Hopper warpgroup MMA (wgmma, sm_90a) helpers: the A operand in registers, B in shared memory
// through a matrix descriptor, fp32 accumulation. Torch-free.
//
// Fragment layouts (PTX ISA, "Asynchronous Warpgroup Level Matrix Multiply-Accumulate"):
//   A 64x16 in registers: warp w of the warpgroup holds rows 16w..16w+15 in the layout of
//     mma.m16n8k16's A (mma.cuh): a0 (row g, k 2t..2t+1), a1 (row g + 8), a2 (k + 8), a3 (both).
//   D 64xN fp32: warp w's rows 16w + g (d[4j], d[4j + 1]: cols 8j + 2t, + 1) and 16w + g + 8
//     (d[4j + 2], d[4j + 3]), j = 0..N/8-1: mma.m16n8k16's C, one per n8 block.
//   B Nx16 (K-major: each of the N rows holds its 16 k contiguous) in shared memory, 128-byte
//     swizzle: rows of 128 B (64 16-bit k), 8-row groups of 1 KB (1 KB aligned), 16-byte chunk
//     c of row r stored at chunk c ^ (r % 8). A k16 step at element offset 16 s of a 64-wide
//     row starts at byte 32 s of the group (the hardware applies the swizzle to the address).
//
// Rules the kernels follow: wgmma_fence() after writing A fragments or the accumulator and before
// the wgmma that reads them; an A fragment stays untouched (and live: keep_live) until a
// wgmma_wait retired its group; fence_proxy_async() between cp.async writes to shared memory and
// the wgmma that reads them; wgmma_wait<0>() before the shared tile is refilled.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "mma.cuh"

namespace pykernels {

// Matrix descriptor of a K-major, 128-byte-swizzled tile at `p` (see above): start address,
// leading offset 1 (unused with this swizzle), stride 1 KB between 8-row groups, swizzle mode 1.
__device__ __forceinline__ uint64_t wgmma_desc_sw128(const void* p) {
  const uint64_t addr = smem_addr(p);
  return ((addr & 0x3FFFF) >> 4) | (1ull << 16) | ((1024ull >> 4) << 32) | (1ull << 62);
}

__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}

__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}

// Waits until at most N committed wgmma groups are pending.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// cp.async (generic proxy) writes -> wgmma (async proxy) reads of shared memory.
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// Keeps registers alive (and their values where they are) up to this point: an A fragment a
// pending wgmma still reads must not be reallocated, and accumulator reads must not move above
// the wait that makes them valid.
__device__ __forceinline__ void keep_live(uint32_t (&r)[4]) {
  asm volatile("" : "+r"(r[0]), "+r"(r[1]), "+r"(r[2]), "+r"(r[3])::"memory");
}

template <int N>
__device__ __forceinline__ void keep_live(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

// d (64 x N) += A (registers, 64 x 16) x B (descriptor, N x 16 K-major); T the 16-bit type.
template <typename T, int N>
struct WgmmaRS;

// The specializations for one 16-bit type T (PTX type TY): n8 / n16 / n32 / n64, N / 2 fp32
// accumulators a thread. One macro, instantiated for bf16 and f16 below: the asm operand lists
// are string literals, so the type cannot be a template parameter of the text.
#define PK_WGMMA_RS_FOR(T, TY)                                                                     \
  template <>                                                                                      \
  struct WgmmaRS<T, 8> {                                                                           \
    static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4],              \
                                               uint64_t desc) {                                    \
      asm volatile(                                                                                \
          "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"                                               \
          "wgmma.mma_async.sync.aligned.m64n8k16.f32." TY "." TY " "                               \
          "{%0, %1, %2, %3}, "                                                                     \
          "{%4, %5, %6, %7}, %8, p, 1, 1, 0;\n}\n"                                                 \
          : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                         \
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));                                \
    }                                                                                              \
  };                                                                                               \
                                                                                                   \
  template <>                                                                                      \
  struct WgmmaRS<T, 16> {                                                                          \
    static __device__ __forceinline__ void mma(float (&d)[8], const uint32_t (&a)[4],              \
                                               uint64_t desc) {                                    \
      asm volatile(                                                                                \
          "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"                                               \
          "wgmma.mma_async.sync.aligned.m64n16k16.f32." TY "." TY " "                              \
          "{%0, %1, %2, %3, %4, %5, %6, %7}, "                                                     \
          "{%8, %9, %10, %11}, %12, p, 1, 1, 0;\n}\n"                                              \
          : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),    \
            "+f"(d[7])                                                                             \
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));                                \
    }                                                                                              \
  };                                                                                               \
                                                                                                   \
  template <>                                                                                      \
  struct WgmmaRS<T, 32> {                                                                          \
    static __device__ __forceinline__ void mma(float (&d)[16], const uint32_t (&a)[4],             \
                                               uint64_t desc) {                                    \
      asm volatile(                                                                                \
          "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"                                               \
          "wgmma.mma_async.sync.aligned.m64n32k16.f32." TY "." TY " "                              \
          "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, "               \
          "{%16, %17, %18, %19}, %20, p, 1, 1, 0;\n}\n"                                            \
          : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),    \
            "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]),             \
            "+f"(d[13]), "+f"(d[14]), "+f"(d[15])                                                  \
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));                                \
    }                                                                                              \
  };                                                                                               \
                                                                                                   \
  template <>                                                                                      \
  struct WgmmaRS<T, 64> {                                                                          \
    static __device__ __forceinline__ void mma(float (&d)[32], const uint32_t (&a)[4],             \
                                               uint64_t desc) {                                    \
      asm volatile(                                                                                \
          "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"                                               \
          "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " "                              \
          "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                \
          "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "      \
          "{%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"                                            \
          : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),    \
            "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]),             \
            "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]),          \
            "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),          \
            "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]),          \
            "+f"(d[31])                                                                            \
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));                                \
    }                                                                                              \
  };

PK_WGMMA_RS_FOR(__nv_bfloat16, "bf16")
PK_WGMMA_RS_FOR(__half, "f16")
#undef PK_WGMMA_RS_FOR

}  // namespace pykernels
