// dtype dispatch: maps a torch dtype to the CUDA element type the torch-free kernels take.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <ATen/core/Tensor.h>

#define PK_DISPATCH_CASE(ENUM, TYPE, ...) \
  case ENUM: {                            \
    using scalar_t = TYPE;                \
    __VA_ARGS__();                        \
    break;                                \
  }

// Runs the lambda in __VA_ARGS__ with scalar_t = float, __half or __nv_bfloat16.
#define PK_DISPATCH_FLOAT(DTYPE, NAME, ...)                                            \
  switch (DTYPE) {                                                                    \
    PK_DISPATCH_CASE(at::kFloat, float, __VA_ARGS__)                                  \
    PK_DISPATCH_CASE(at::kHalf, __half, __VA_ARGS__)                                  \
    PK_DISPATCH_CASE(at::kBFloat16, __nv_bfloat16, __VA_ARGS__)                       \
    default:                                                                          \
      TORCH_CHECK_TYPE(false, NAME " does not support dtype ", DTYPE);                \
  }

namespace pykernels {

// The widest vector (elements per access, at most 16 bytes) that divides `n` and keeps every
// pointer and row stride 16-byte aligned; 1 when nothing wider fits (odd hidden sizes).
inline int pick_vec(int elem_size, int64_t n, std::initializer_list<const void*> ptrs,
                    std::initializer_list<int64_t> strides) {
  for (int vec = 16 / elem_size; vec > 1; vec /= 2) {
    const int64_t bytes = (int64_t)vec * elem_size;
    bool ok = n % vec == 0;
    for (const void* p : ptrs) ok = ok && reinterpret_cast<uintptr_t>(p) % bytes == 0;
    for (int64_t s : strides) ok = ok && s % vec == 0;
    if (ok) return vec;
  }
  return 1;
}

}  // namespace pykernels
