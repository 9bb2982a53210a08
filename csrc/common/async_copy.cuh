// cp.async (sm_80+): 16-byte global -> shared copies that bypass registers, so a CTA can keep
// several tiles of loads in flight while it computes on an earlier one. Torch-free.
#pragma once

#include <cstdint>

namespace pykernels {

// Copies 16 bytes, or zero-fills them when `skip` is nonzero (ignore-src: nothing is read from
// src, which must still be a legal address). The operand maps onto LDGSTS's zero-fill predicate;
// a src-size register cost 4 integer instructions a copy to build (SASS of the decode kernel).
__device__ __forceinline__ void cp_async_16_unless(void* smem, const void* gmem, unsigned skip) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  // .cg: cache in L2 only; K/V rows are read once, so L1 would only evict useful lines.
  asm volatile(
      "{\n .reg .pred ignore;\n setp.ne.u32 ignore, %2, 0;\n"
      " cp.async.cg.shared.global [%0], [%1], 16, ignore;\n}\n" ::"r"(dst),
      "l"(gmem), "r"(skip));
}

// Copies 16 bytes, or zero-fills them when !valid.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  cp_async_16_unless(smem, gmem, valid ? 0u : 1u);
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Waits until at most N committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

}  // namespace pykernels
