// Launchers of rms_norm and fused_add_rms_norm: input checks, vector width, row caching depth.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "../common/checks.h"
#include "../common/dispatch.h"
#include "norm.cuh"

namespace pykernels {

// Items (16-byte vectors) per thread, kept in registers so the row is read once; 0 = read the
// row twice (the second read hits L1). Measured over 32768 rows of bf16 with bench/norm_sweep.cu
// (2026-11-21), TB/s and % of copy:
//   4096 wide, 256 threads x 2 items: H200 3.97 (93%), H100 2.89 (96%)
//   8192 wide, 512 threads x 2 items: H200 3.78 (89%), H100 2.97 (99%)
//              256 threads re-reading: H200 3.91 (92%), H100 2.17 (72%): not portable
//              512 threads re-reading: H200 3.84 (90%), H100 2.97 (99%): used past 8192
// Four or more items per thread, and 1024-thread blocks, lost on both.
inline int pick_items(int64_t nvec) {
  if (nvec <= 256) return 1;
  if (nvec <= 1024) return 2;
  return 0;
}

inline int pick_threads(int64_t nvec, int items) {
  if (items == 0) return 512;
  const int64_t per_thread = (nvec + items - 1) / items;
  return (int)std::max<int64_t>(32, (per_thread + 31) / 32 * 32);
}

// Runs __VA_ARGS__ with constexpr V (vector width) and I (items per thread) set from run-time values.
#define PK_DISPATCH_ITEMS(ITEMS, ...)                                    \
  switch (ITEMS) {                                                       \
    case 1: { constexpr int I = 1; __VA_ARGS__; break; }                 \
    case 2: { constexpr int I = 2; __VA_ARGS__; break; }                 \
    default: { constexpr int I = 0; __VA_ARGS__; }                       \
  }
#define PK_DISPATCH_VEC_ITEMS(VEC, ITEMS, ...)                                       \
  switch (VEC) {                                                                     \
    case 8: { constexpr int V = 8; PK_DISPATCH_ITEMS(ITEMS, __VA_ARGS__); break; }   \
    case 4: { constexpr int V = 4; PK_DISPATCH_ITEMS(ITEMS, __VA_ARGS__); break; }   \
    case 2: { constexpr int V = 2; PK_DISPATCH_ITEMS(ITEMS, __VA_ARGS__); break; }   \
    default: { constexpr int V = 1; PK_DISPATCH_ITEMS(ITEMS, __VA_ARGS__); }         \
  }

void check_norm_args(const at::Tensor& x, const char* x_name, const at::Tensor& weight) {
  TORCH_CHECK_VALUE(x.is_cuda(), x_name, " must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK_VALUE(weight.device() == x.device(), "weight and ", x_name,
                    " must be on the same device, got ", weight.device(), " and ", x.device());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf ||
                       x.scalar_type() == at::kFloat,
                   x_name, " must be bfloat16, float16 or float32, got ", x.scalar_type());
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type(), "weight and ", x_name,
                   " must have the same dtype, got ", weight.scalar_type(), " and ",
                   x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.stride(-1) == 1, x_name,
                    " must have a contiguous last dimension (stride 1), got strides ", x.strides());
  PK_CHECK_DIM(weight, 1);
  PK_CHECK_CONTIGUOUS(weight);
  PK_CHECK_SHAPE(weight.size(0) == x.size(-1), "weight must have shape [", x.size(-1),
                 "] (the hidden size of ", x_name, "), got ", weight.sizes());
}

}  // namespace pykernels

void rms_norm(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight, double eps) {
  using namespace pykernels;
  check_norm_args(input, "input", weight);
  PK_CHECK_SAME_DEVICE(out, input);
  PK_CHECK_SAME_DTYPE(out, input);
  PK_CHECK_LAST_DIM_CONTIGUOUS(out);
  PK_CHECK_SHAPE(out.sizes() == input.sizes(), "out must have the shape of input ", input.sizes(),
                 ", got ", out.sizes());
  if (input.numel() == 0) return;
  const int64_t hidden = input.size(-1);
  const int64_t rows = input.numel() / hidden;
  const int64_t in_stride = row_stride(input, "input");
  const int64_t out_stride = row_stride(out, "out");
  const c10::cuda::OptionalCUDAGuard guard(input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  PK_DISPATCH_FLOAT(input.scalar_type(), "rms_norm", [&] {
    const int vec = pick_vec(sizeof(scalar_t), hidden,
                             {input.data_ptr(), out.data_ptr(), weight.data_ptr()},
                             {in_stride, out_stride});
    const int items = pick_items(hidden / vec);
    const int threads = pick_threads(hidden / vec, items);
    PK_DISPATCH_VEC_ITEMS(vec, items, {
      rms_norm_kernel<scalar_t, V, I><<<(unsigned)rows, threads, 0, stream>>>(
          reinterpret_cast<scalar_t*>(out.data_ptr()),
          reinterpret_cast<const scalar_t*>(input.data_ptr()),
          reinterpret_cast<const scalar_t*>(weight.data_ptr()), hidden, in_stride, out_stride,
          (float)eps);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void fused_add_rms_norm(at::Tensor& input, at::Tensor& residual, const at::Tensor& weight,
                        double eps) {
  using namespace pykernels;
  check_norm_args(input, "input", weight);
  PK_CHECK_SAME_DEVICE(residual, input);
  PK_CHECK_SAME_DTYPE(residual, input);
  PK_CHECK_LAST_DIM_CONTIGUOUS(residual);
  PK_CHECK_SHAPE(residual.sizes() == input.sizes(), "residual must have the shape of input ",
                 input.sizes(), ", got ", residual.sizes());
  if (input.numel() == 0) return;
  const int64_t hidden = input.size(-1);
  const int64_t rows = input.numel() / hidden;
  const int64_t x_stride = row_stride(input, "input");
  const int64_t r_stride = row_stride(residual, "residual");
  const c10::cuda::OptionalCUDAGuard guard(input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  PK_DISPATCH_FLOAT(input.scalar_type(), "fused_add_rms_norm", [&] {
    const int vec = pick_vec(sizeof(scalar_t), hidden,
                             {input.data_ptr(), residual.data_ptr(), weight.data_ptr()},
                             {x_stride, r_stride});
    const int items = pick_items(hidden / vec);
    const int threads = pick_threads(hidden / vec, items);
    PK_DISPATCH_VEC_ITEMS(vec, items, {
      fused_add_rms_norm_kernel<scalar_t, V, I><<<(unsigned)rows, threads, 0, stream>>>(
          reinterpret_cast<scalar_t*>(input.data_ptr()),
          reinterpret_cast<scalar_t*>(residual.data_ptr()),
          reinterpret_cast<const scalar_t*>(weight.data_ptr()), hidden, x_stride, r_stride,
          (float)eps);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
