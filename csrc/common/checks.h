// Named input checks for the launchers. Each raises the Python exception a user expects:
// TORCH_CHECK_TYPE -> TypeError, TORCH_CHECK_VALUE -> ValueError, and names the argument.
#pragma once

#include <ATen/core/Tensor.h>

#define PK_CHECK_CUDA(x) \
  TORCH_CHECK_VALUE((x).is_cuda(), #x " must be a CUDA tensor, got device ", (x).device())

#define PK_CHECK_SAME_DEVICE(x, y)                                                     \
  TORCH_CHECK_VALUE((x).device() == (y).device(), #x " and " #y                        \
                    " must be on the same device, got ", (x).device(), " and ", (y).device())

#define PK_CHECK_FLOAT_DTYPE(x)                                                       \
  TORCH_CHECK_TYPE((x).scalar_type() == at::kBFloat16 || (x).scalar_type() == at::kHalf || \
                       (x).scalar_type() == at::kFloat,                                 \
                   #x " must be bfloat16, float16 or float32, got ", (x).scalar_type())

#define PK_CHECK_SAME_DTYPE(x, y)                                                       \
  TORCH_CHECK_TYPE((x).scalar_type() == (y).scalar_type(), #x " and " #y                \
                   " must have the same dtype, got ", (x).scalar_type(), " and ",       \
                   (y).scalar_type())

#define PK_CHECK_LAST_DIM_CONTIGUOUS(x)                                                   \
  TORCH_CHECK_VALUE((x).dim() >= 1 && (x).stride(-1) == 1,                                \
                    #x " must have a contiguous last dimension (stride 1), got strides ", \
                    (x).strides())

#define PK_CHECK_CONTIGUOUS(x) \
  TORCH_CHECK_VALUE((x).is_contiguous(), #x " must be contiguous, got strides ", (x).strides())

#define PK_CHECK_DIM(x, n) \
  TORCH_CHECK_VALUE((x).dim() == (n), #x " must have ", n, " dimensions, got shape ", (x).sizes())

#define PK_CHECK_SHAPE(cond, ...) TORCH_CHECK_VALUE(cond, __VA_ARGS__)

namespace pykernels {

// The stride between rows when all dimensions but the last are flattened into rows, checking that
// they collapse into one stride (true for contiguous tensors and for row slices such as x[:, :k]).
inline int64_t row_stride(const at::Tensor& t, const char* name) {
  const int64_t n = t.dim();
  if (n <= 1) return t.numel();
  int64_t stride = t.stride(n - 2);
  int64_t expected = stride;
  for (int64_t i = n - 2; i >= 0; --i) {
    if (t.size(i) == 1) continue;
    TORCH_CHECK_VALUE(t.stride(i) == expected, name,
                      "'s leading dimensions must flatten into rows of one stride, got shape ",
                      t.sizes(), " and strides ", t.strides());
    expected = t.stride(i) * t.size(i);
  }
  // A tensor whose leading sizes are all 1 has a single row: any stride works.
  return stride;
}

}  // namespace pykernels
