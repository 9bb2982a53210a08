// cp.async (sm_80+): 16-byte global -> shared copies that bypass registers, so a CTA can keep
// several tiles of loads in flight while it computes on an earlier one. Torch-free.
#pragma once

#include <cstdint>

namespace pykernels {

// Copies 16 bytes, or zero-fills them when !valid (src-size 0: nothing is read from src).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_size = valid ? 16 : 0;
  // .cg: cache in L2 only; K/V rows are read once, so L1 would only evict useful lines.
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem),
               "r"(src_size));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Waits until at most N committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

}  // namespace pykernels
