// Launcher of silu_and_mul: input checks, vector width, grid; the kernel is in activation.cuh.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "../common/checks.h"
#include "../common/dispatch.h"
#include "activation.cuh"

namespace pykernels {

template <typename T, int VEC>
void launch_silu_and_mul(at::Tensor& out, const at::Tensor& input, int64_t rows, int64_t d,
                         int64_t in_stride, int64_t out_stride) {
  const int64_t nvec = d / VEC;
  // 256 threads x 16 B: with 8 resident blocks per SM every SM keeps ~64 KB of loads in flight,
  // above the ~30 KB per SM that 4.3 TB/s at ~800 ns latency needs.
  const int threads = (int)std::min<int64_t>(256, (nvec + 31) / 32 * 32);
  const int64_t tiles = (nvec + threads - 1) / threads;
  const int64_t blocks = rows * tiles;
  PK_CHECK_SHAPE(blocks < (1ll << 31), "silu_and_mul: input too large (", rows, " rows of ", d,
                 " outputs needs ", blocks, " blocks)");
  silu_and_mul_kernel<T, VEC><<<(unsigned)blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<T*>(out.data_ptr()), reinterpret_cast<const T*>(input.data_ptr()), d,
      in_stride, out_stride, tiles);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace pykernels

void silu_and_mul(at::Tensor& out, const at::Tensor& input) {
  using namespace pykernels;
  PK_CHECK_CUDA(input);
  PK_CHECK_SAME_DEVICE(out, input);
  PK_CHECK_FLOAT_DTYPE(input);
  PK_CHECK_SAME_DTYPE(out, input);
  PK_CHECK_LAST_DIM_CONTIGUOUS(input);
  PK_CHECK_LAST_DIM_CONTIGUOUS(out);
  const int64_t width = input.size(-1);
  PK_CHECK_SHAPE(width % 2 == 0, "input's last dimension holds gate and up halves and must be ",
                 "even, got ", width);
  const int64_t d = width / 2;
  bool shape_ok = out.dim() == input.dim() && out.size(-1) == d;
  for (int64_t i = 0; shape_ok && i + 1 < input.dim(); ++i) shape_ok = out.size(i) == input.size(i);
  PK_CHECK_SHAPE(shape_ok, "out must have shape ", input.sizes(), " with the last dimension ",
                 "halved to ", d, ", got ", out.sizes());
  if (input.numel() == 0) return;
  const int64_t rows = input.numel() / width;
  const int64_t in_stride = row_stride(input, "input");
  const int64_t out_stride = row_stride(out, "out");
  const c10::cuda::OptionalCUDAGuard guard(input.device());
  PK_DISPATCH_FLOAT(input.scalar_type(), "silu_and_mul", [&] {
    const int vec = pick_vec(sizeof(scalar_t), d, {input.data_ptr(), out.data_ptr()},
                             {in_stride, out_stride, d});
    switch (vec) {
      case 8: launch_silu_and_mul<scalar_t, 8>(out, input, rows, d, in_stride, out_stride); break;
      case 4: launch_silu_and_mul<scalar_t, 4>(out, input, rows, d, in_stride, out_stride); break;
      case 2: launch_silu_and_mul<scalar_t, 2>(out, input, rows, d, in_stride, out_stride); break;
      default: launch_silu_and_mul<scalar_t, 1>(out, input, rows, d, in_stride, out_stride);
    }
  });
}
