// Launcher of fp8_marlin_gemm: input checks, split-K choice, workspace; kernel in fp8_gemm.cuh.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <atomic>

#include "../common/checks.h"
#include "../common/device.h"
#include "fp8_gemm.cuh"

namespace pykernels {
namespace fp8_gemm {
namespace {

constexpr int kMaxStages = 8;
constexpr int kMaxSmem = 226 * 1024;  // of 227 KB per block on sm_90, less the static flag
constexpr int kMinPanelsPerSplit = 2;  // fewer and the split's prologue is all it does

template <int MI, int BM, bool kGrouped, bool kWg>
int smem_bytes(int stages) {  // kWg: + the slack to a 1 KB boundary (fp8_gemm_kernel)
  return stages * Tile<MI, BM, kGrouped, kWg>::kStageBytes + (kWg ? 1024 : 0);
}

// Opts the kernel in to `smem` bytes of dynamic shared memory (once per new maximum: a call
// with fewer stages must not lower the limit a deeper one set).
template <typename T, int MI, int BM, bool kGrouped, bool kWg>
void opt_in(int smem) {
  static std::atomic<int> opted{0};
  if (smem > opted.load(std::memory_order_relaxed)) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(fp8_gemm_kernel<T, MI, BM, kGrouped, kWg>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    opted.store(smem, std::memory_order_relaxed);
  }
}

// CTAs per SM for one instantiation and depth, asked once (no driver call on the hot path).
template <typename T, int MI, int BM, bool kGrouped, bool kWg>
int ctas_per_sm(int stages) {
  static std::atomic<int> cache[kMaxStages + 1] = {};
  int n = cache[stages].load(std::memory_order_relaxed);
  if (n == 0) {
    const int smem = smem_bytes<MI, BM, kGrouped, kWg>(stages);
    opt_in<T, MI, BM, kGrouped, kWg>(smem);
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &n, fp8_gemm_kernel<T, MI, BM, kGrouped, kWg>, kThreads, smem));
    n = std::max(n, 1);
    cache[stages].store(n, std::memory_order_relaxed);
  }
  return n;
}

// Splits of K that fill the CTA slots of the GPU in one wave (the weight stream needs all SMs busy at
// small M: 4096 x 4096 has 64 tiles for 132 SMs x 4 slots), keeping >= 2 panels per split.
int choose_splits(int tiles, int kt, int slots) {
  if (tiles >= slots) return 1;
  return std::max(1, std::min(slots / tiles, kt / kMinPanelsPerSplit));
}

template <typename T, int MI, int BM, bool kGrouped, bool kWg>
void launch(Params& p, int splits, at::Tensor& locks, const at::Tensor& x) {
  using Tl = Tile<MI, BM, kGrouped, kWg>;
  const int m_tiles = (p.m + BM - 1) / BM, n_tiles = p.n / Tl::kBN;
  const int tiles = m_tiles * n_tiles;
  const int smem = smem_bytes<MI, BM, kGrouped, kWg>(p.stages);
  TORCH_CHECK_VALUE(smem <= kMaxSmem, "fp8_marlin_gemm: block_m=", BM, " with num_stages=",
                    p.stages, " needs ", smem, " bytes of shared memory (> 226 KB)");
  if (splits <= 0) {
    const int slots = ctas_per_sm<T, MI, BM, kGrouped, kWg>(p.stages) * sm_count();
    splits = choose_splits(tiles, p.kt, slots);
  }
  splits = std::min(splits, p.kt);
  if (splits > 1 && tiles > locks.numel()) splits = 1;  // more tiles than counters: no split
  p.splits = splits;
  at::Tensor partial;
  if (splits > 1) {
    const int64_t per_tile = (int64_t)MI * Tl::kNB * kThreads * 4;
    partial = p.atomic ? at::zeros({tiles * per_tile}, x.options().dtype(at::kFloat))
                       : at::empty({tiles * splits * per_tile}, x.options().dtype(at::kFloat));
    p.partial = partial.data_ptr<float>();
    p.locks = locks.data_ptr<int>();
  }
  opt_in<T, MI, BM, kGrouped, kWg>(smem);
  const dim3 grid(m_tiles, n_tiles, splits);
  fp8_gemm_kernel<T, MI, BM, kGrouped, kWg>
      <<<grid, kThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int MI, bool kGrouped, bool kWg>
void dispatch_bm(Params& p, int block_m, int splits, at::Tensor& locks, const at::Tensor& x) {
  switch (block_m) {
    case 8: return launch<T, MI, 8, kGrouped, kWg>(p, splits, locks, x);
    case 16: return launch<T, MI, 16, kGrouped, kWg>(p, splits, locks, x);
    case 32: return launch<T, MI, 32, kGrouped, kWg>(p, splits, locks, x);
    case 64: return launch<T, MI, 64, kGrouped, kWg>(p, splits, locks, x);
    default: TORCH_CHECK_VALUE(false, "block_m must be 8, 16, 32 or 64, got ", block_m);
  }
}

template <typename T, bool kGrouped, bool kWg>
void dispatch_bn(Params& p, int block_n, int block_m, int splits, at::Tensor& locks,
                 const at::Tensor& x) {
  TORCH_CHECK_VALUE(block_n == 64 || block_n == 128, "block_n must be 64 or 128, got ", block_n);
  // 128-channel CTAs need N % 128 == 0; otherwise the 64-channel kernel runs.
  if (block_n == 128 && p.n % 128 == 0) {
    return dispatch_bm<T, 2, kGrouped, kWg>(p, block_m, splits, locks, x);
  }
  dispatch_bm<T, 1, kGrouped, kWg>(p, block_m, splits, locks, x);
}

template <typename T, bool kGrouped>
void dispatch(Params& p, int block_n, int block_m, int splits, bool wgmma, at::Tensor& locks,
              const at::Tensor& x) {
  if (wgmma) return dispatch_bn<T, kGrouped, true>(p, block_n, block_m, splits, locks, x);
  dispatch_bn<T, kGrouped, false>(p, block_n, block_m, splits, locks, x);
}

void check_inputs(const at::Tensor& out, const at::Tensor& x, const at::Tensor& qweight,
                  const at::Tensor& scales, const at::Tensor& locks) {
  PK_CHECK_CUDA(x);
  PK_CHECK_DIM(x, 2);
  PK_CHECK_DIM(out, 2);
  PK_CHECK_DIM(qweight, 3);
  PK_CHECK_SAME_DEVICE(out, x);
  PK_CHECK_SAME_DEVICE(qweight, x);
  PK_CHECK_SAME_DEVICE(scales, x);
  PK_CHECK_SAME_DEVICE(locks, x);
  TORCH_CHECK_TYPE(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
                   "x must be bfloat16 or float16, got ", x.scalar_type());
  PK_CHECK_SAME_DTYPE(out, x);
  TORCH_CHECK_TYPE(qweight.scalar_type() == at::kFloat8_e4m3fn,
                   "qweight must be float8_e4m3fn, got ", qweight.scalar_type());
  TORCH_CHECK_TYPE(scales.scalar_type() == at::kFloat, "scales must be float32, got ",
                   scales.scalar_type());
  TORCH_CHECK_TYPE(locks.scalar_type() == at::kInt, "locks must be int32, got ",
                   locks.scalar_type());
  PK_CHECK_CONTIGUOUS(qweight);
  PK_CHECK_CONTIGUOUS(scales);
  PK_CHECK_CONTIGUOUS(locks);
  PK_CHECK_LAST_DIM_CONTIGUOUS(x);
  PK_CHECK_LAST_DIM_CONTIGUOUS(out);
  const int64_t k = x.size(1), n = qweight.size(1), kt = qweight.size(0);
  PK_CHECK_SHAPE(qweight.size(2) == kBlockK && (k + kBlockK - 1) / kBlockK == kt && k % 64 == 0,
                 "x's K=", k, " (a multiple of 64) must match qweight [ceil(K/128), N, 128], got ",
                 qweight.sizes());
  PK_CHECK_SHAPE(n % 64 == 0, "qweight's N must be a multiple of 64, got ", n);
  PK_CHECK_SHAPE(out.size(0) == x.size(0) && out.size(1) == n, "out must have shape [",
                 x.size(0), ", ", n, "], got ", out.sizes());
  PK_CHECK_SHAPE((scales.dim() == 1 && scales.size(0) == n) ||
                     (scales.dim() == 2 && scales.size(0) == kt && scales.size(1) == n),
                 "scales must have shape [N] or [ceil(K/128), N], got ", scales.sizes());
}

// cp.async moves 16-byte pieces of x: every row must start 16-byte aligned.
bool rows_aligned(const at::Tensor& x) {
  return reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 &&
         (x.size(0) <= 1 || x.stride(0) % 8 == 0);
}

}  // namespace
}  // namespace fp8_gemm
}  // namespace pykernels

void fp8_marlin_gemm(at::Tensor& out, const at::Tensor& x_in, const at::Tensor& qweight,
                     const at::Tensor& scales, at::Tensor& locks, int64_t block_n,
                     int64_t block_m, int64_t splits, int64_t num_stages, bool use_atomic_add,
                     bool wgmma) {
  using namespace pykernels::fp8_gemm;
  check_inputs(out, x_in, qweight, scales, locks);
  // A row-strided view whose rows are not 16-byte aligned is copied once (cp.async needs them).
  const at::Tensor x = rows_aligned(x_in) ? x_in : x_in.contiguous();
  TORCH_CHECK_VALUE(num_stages >= 1 && num_stages <= kMaxStages, "num_stages must be in [1, ",
                    kMaxStages, "], got ", num_stages);
  if (x.size(0) == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  if (wgmma) {  // sm_90a instructions: the kernel is built for 9.0a (TORCH_CUDA_ARCH_LIST)
    const int cc = pykernels::compute_capability();
    TORCH_CHECK_VALUE(cc == 90, "fp8_marlin_gemm: wgmma=True needs an sm_90 GPU (H100/H200), "
                      "got sm_", cc);
  }
  Params p{};
  p.x = x.data_ptr();
  p.w = reinterpret_cast<const uint8_t*>(qweight.data_ptr());
  p.scales = scales.data_ptr<float>();
  p.out = out.data_ptr();
  p.x_stride = x.size(0) > 1 ? x.stride(0) : x.size(1);
  p.out_stride = out.size(0) > 1 ? out.stride(0) : out.size(1);
  p.m = (int)x.size(0), p.n = (int)qweight.size(1), p.k = (int)x.size(1);
  p.kt = (int)qweight.size(0), p.stages = (int)num_stages, p.atomic = use_atomic_add;
  const bool grouped = scales.dim() == 2;
  const int bn = (int)block_n, bm = (int)block_m, sp = (int)splits;
  if (x.scalar_type() == at::kBFloat16) {
    grouped ? dispatch<__nv_bfloat16, true>(p, bn, bm, sp, wgmma, locks, x)
            : dispatch<__nv_bfloat16, false>(p, bn, bm, sp, wgmma, locks, x);
  } else {
    grouped ? dispatch<__half, true>(p, bn, bm, sp, wgmma, locks, x)
            : dispatch<__half, false>(p, bn, bm, sp, wgmma, locks, x);
  }
}
