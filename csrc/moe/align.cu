// Launcher of moe_align_block_size: input checks, path choice, grid sizes; kernels in align.cuh.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <atomic>
#include <limits>
#include <optional>

#include "../common/checks.h"
#include "../common/device.h"
#include "align.cuh"

namespace pykernels {
namespace {

using namespace moe_align;

// Large path: CTAs of the count and scatter passes, and the slots each takes. ~2048 slots per CTA
// (4 per thread at 512 threads) spreads 16384 x top-8 over 64 SMs; CTAs x E stays <= 32768 since
// every scatter CTA reads all the counts (<= 64 per thread, 128 KB from L2).
constexpr int kLargeThreads = 512;
constexpr int kSlotsPerCta = 2048;
constexpr int kMaxCountsRead = 32768;
constexpr int kFillPerThread = 8;  // small path: sentinel slots per thread of a fill CTA
constexpr int kMaxFillCtas = 256;

void check_int32_out(const at::Tensor& t, const char* name, const at::Tensor& ids, int64_t size) {
  TORCH_CHECK_VALUE(t.device() == ids.device(), name, " must be on topk_ids' device ",
                    ids.device(), ", got ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == size, name, " must have shape [", size,
                    "], got ", t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous, got strides ", t.strides());
}

template <typename IdT>
void launch_small(const IdT* ids, int numel, int num_experts, int block_size,
                  const int32_t* expert_map, int32_t* sorted, int32_t* expert_ids,
                  int32_t* total, int cap, int num_blocks, cudaStream_t stream) {
  // Ranks are taken one id at a time per thread (serial shared atomics): 256 threads x 8 ids took
  // 9.6 us at 2048 slots against 4.2 us at 8 slots on the H200, so threads grow with numel up to
  // <= 2 ids each (all of kSmallMaxSlots = 2048 at 1024 threads).
  int threads = 256;
  while (threads < kSmallThreads && threads * 2 < numel) threads *= 2;
  const int64_t bound64 = (int64_t)numel +
                          (int64_t)std::min(num_experts, numel) * (block_size - 1);
  const int bound = (int)std::min<int64_t>(bound64, cap);
  const int64_t per_cta = (int64_t)threads * kFillPerThread;
  const int fill_ctas = (int)std::min<int64_t>((cap - bound + per_cta - 1) / per_cta,
                                               kMaxFillCtas);
  const size_t smem = (2 * (size_t)num_experts + 1) * sizeof(int);
  align_small_kernel<IdT><<<1 + fill_ctas, threads, smem, stream>>>(
      ids, numel, num_experts, block_size, expert_map, sorted, expert_ids, total, cap,
      num_blocks, bound);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename IdT>
void launch_large(const at::Tensor& topk_ids, int numel, int num_experts, int block_size,
                  const int32_t* expert_map, int32_t* sorted, int32_t* expert_ids,
                  int32_t* total, int cap, int num_blocks, cudaStream_t stream) {
  const int sms = sm_count();
  int ctas = (numel + kSlotsPerCta - 1) / kSlotsPerCta;
  ctas = std::max(1, std::min({ctas, sms, std::max(1, kMaxCountsRead / num_experts)}));
  const int chunk = (numel + ctas - 1) / ctas;
  ctas = (numel + chunk - 1) / chunk;
  // counts[ctas * E] (per-CTA histograms); every entry is written by the count pass.
  at::Tensor work = at::empty({(int64_t)ctas * num_experts}, topk_ids.options().dtype(at::kInt));
  int* counts = work.data_ptr<int>();
  const IdT* ids = reinterpret_cast<const IdT*>(topk_ids.data_ptr());
  const size_t smem_e = (size_t)num_experts * sizeof(int);

  align_count_kernel<IdT><<<ctas, kLargeThreads, smem_e, stream>>>(
      ids, numel, num_experts, chunk, counts, sorted, cap);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // s_off[E + 1] + s_base[E]: 32 KB at E = 4096, under the 48 KB default (no opt-in needed).
  align_scatter_kernel<IdT><<<ctas, kLargeThreads, 2 * smem_e + sizeof(int), stream>>>(
      ids, numel, num_experts, block_size, chunk, counts, expert_map, sorted, expert_ids,
      num_blocks, total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename IdT>
void launch(const at::Tensor& topk_ids, int numel, int num_experts, int block_size,
            const int32_t* expert_map, at::Tensor& sorted, at::Tensor& expert_ids,
            at::Tensor& total, int cap, int num_blocks, cudaStream_t stream) {
  int32_t* s = sorted.data_ptr<int32_t>();
  int32_t* b = expert_ids.data_ptr<int32_t>();
  int32_t* t = total.data_ptr<int32_t>();
  if (numel <= kSmallMaxSlots) {
    launch_small<IdT>(reinterpret_cast<const IdT*>(topk_ids.data_ptr()), numel, num_experts,
                      block_size, expert_map, s, b, t, cap, num_blocks, stream);
  } else {
    launch_large<IdT>(topk_ids, numel, num_experts, block_size, expert_map, s, b, t, cap,
                      num_blocks, stream);
  }
}

}  // namespace
}  // namespace pykernels

void moe_align_block_size(at::Tensor& sorted_token_ids, at::Tensor& expert_ids,
                          at::Tensor& num_tokens_post_padded, const at::Tensor& topk_ids,
                          int64_t num_experts, int64_t block_size,
                          const std::optional<at::Tensor>& expert_map) {
  using namespace pykernels;
  PK_CHECK_CUDA(topk_ids);
  TORCH_CHECK_TYPE(topk_ids.scalar_type() == at::kInt || topk_ids.scalar_type() == at::kLong,
                   "topk_ids must be int32 or int64, got ", topk_ids.scalar_type());
  PK_CHECK_DIM(topk_ids, 2);
  PK_CHECK_CONTIGUOUS(topk_ids);
  TORCH_CHECK_VALUE(num_experts >= 1 && num_experts <= moe_align::kMaxExperts,
                    "num_experts must be in [1, ", moe_align::kMaxExperts, "], got ", num_experts);
  TORCH_CHECK_VALUE(block_size >= 1, "block_size must be >= 1, got ", block_size);
  const int64_t numel = topk_ids.numel();
  const int64_t cap = numel + num_experts * (block_size - 1);
  // Positions, block starts and loop indices stay in int32 with room to spare.
  TORCH_CHECK_VALUE(cap + block_size + 65536 <= std::numeric_limits<int32_t>::max(),
                    "topk_ids too large: ", numel, " slots padded for ", num_experts,
                    " experts of block_size ", block_size, " overflow int32 positions");
  const int64_t num_blocks = (cap + block_size - 1) / block_size;
  check_int32_out(sorted_token_ids, "sorted_token_ids", topk_ids, cap);
  check_int32_out(expert_ids, "expert_ids", topk_ids, num_blocks);
  check_int32_out(num_tokens_post_padded, "num_tokens_post_padded", topk_ids, 1);
  const int32_t* map = nullptr;
  if (expert_map.has_value()) {
    const at::Tensor& m = *expert_map;
    TORCH_CHECK_VALUE(m.device() == topk_ids.device(), "expert_map must be on topk_ids' device ",
                      topk_ids.device(), ", got ", m.device());
    TORCH_CHECK_TYPE(m.scalar_type() == at::kInt, "expert_map must be int32, got ",
                     m.scalar_type());
    TORCH_CHECK_VALUE(m.dim() == 1 && m.size(0) == num_experts, "expert_map must have shape [",
                      num_experts, "], got ", m.sizes());
    TORCH_CHECK_VALUE(m.is_contiguous(), "expert_map must be contiguous, got strides ",
                      m.strides());
    map = m.data_ptr<int32_t>();
  }
  const c10::cuda::OptionalCUDAGuard guard(topk_ids.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (topk_ids.scalar_type() == at::kInt) {
    launch<int32_t>(topk_ids, (int)numel, (int)num_experts, (int)block_size, map,
                    sorted_token_ids, expert_ids, num_tokens_post_padded, (int)cap,
                    (int)num_blocks, stream);
  } else {
    launch<int64_t>(topk_ids, (int)numel, (int)num_experts, (int)block_size, map,
                    sorted_token_ids, expert_ids, num_tokens_post_padded, (int)cap,
                    (int)num_blocks, stream);
  }
}
