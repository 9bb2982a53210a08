// Launcher of paged_decode: input checks, template dispatch, shared-memory opt-in.
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../common/checks.h"
#include "decode.cuh"

namespace pykernels {
namespace attention {

// Runs __VA_ARGS__ with scalar_t = __half or __nv_bfloat16 (q, out and a 16-bit cache).
#define PK_DISPATCH_HALF(DTYPE, ...)                                                      \
  switch (DTYPE) {                                                                       \
    case at::kHalf: { using scalar_t = __half; __VA_ARGS__; break; }                      \
    case at::kBFloat16: { using scalar_t = __nv_bfloat16; __VA_ARGS__; break; }           \
    default: TORCH_CHECK_TYPE(false, "q must be bfloat16 or float16, got ", DTYPE);       \
  }
#define PK_DISPATCH_HEAD_DIM(D, ...)                                                     \
  switch (D) {                                                                           \
    case 64: { constexpr int kD = 64; __VA_ARGS__; break; }                              \
    case 128: { constexpr int kD = 128; __VA_ARGS__; break; }                            \
    case 256: { constexpr int kD = 256; __VA_ARGS__; break; }                            \
    default: TORCH_CHECK_VALUE(false, "head_dim must be 64, 128 or 256, got ", D);        \
  }
template <typename T, typename KV, int D, int STAGES>
void launch_decode(const DecodeParams& p, dim3 grid, cudaStream_t stream) {
  using S = DecodeShape<D, sizeof(KV), STAGES>;
  auto kernel = paged_decode_kernel<T, KV, D, STAGES>;
  // Every configuration needs >= 48 KB of dynamic shared memory (plus the static arrival flag):
  // opt in once per device. 48 KB exactly without the opt-in failed to launch ("invalid argument").
  static bool opted_in[64] = {};
  const int dev = c10::cuda::current_device();
  TORCH_CHECK(dev < 64, "paged_decode supports device ordinals < 64, got ", dev);
  if (!opted_in[dev]) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        S::kSmemBytes));
    opted_in[dev] = true;
  }
  kernel<<<grid, S::kThreads, S::kSmemBytes, stream>>>(p);
}

void check_index(const at::Tensor& t, const char* name, int64_t n, const at::Tensor& q) {
  TORCH_CHECK_VALUE(t.device() == q.device(), name, " must be on q's device ", q.device(),
                    ", got ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.is_contiguous(), name,
                    " must be a contiguous 1-D tensor, got shape ", t.sizes());
  TORCH_CHECK_VALUE(n < 0 || t.size(0) == n, name, " must have ", n, " entries, got ",
                    t.size(0));
}

void check_cache(const at::Tensor& cache, const at::Tensor& q) {
  TORCH_CHECK_VALUE(cache.device() == q.device(), "kv_cache must be on q's device ", q.device(),
                    ", got ", cache.device());
  TORCH_CHECK_TYPE(cache.scalar_type() == q.scalar_type() ||
                       cache.scalar_type() == at::kFloat8_e4m3fn,
                   "kv_cache must have q's dtype or float8_e4m3fn, got ", cache.scalar_type());
  TORCH_CHECK_VALUE(cache.dim() == 5 && cache.size(1) == 2 && cache.size(4) == q.size(2),
                    "kv_cache must have layout [num_pages, 2, page_size, num_kv_heads, ",
                    q.size(2), "], got ", cache.sizes());
  TORCH_CHECK_VALUE(cache.stride(4) == 1 && cache.stride(3) == cache.size(4),
                    "kv_cache must be contiguous within a token, got strides ", cache.strides());
  // cp.async moves 16-byte pieces: every row start must be 16-byte aligned.
  const int64_t e = cache.element_size();
  // The loader's row address is page * page stride + slot * token stride in 32-bit factors:
  // the page stride and a page's token span must stay below 4 GiB.
  const int64_t k4g = int64_t{1} << 32;
  TORCH_CHECK_VALUE(cache.stride(0) >= 0 && cache.stride(0) * e < k4g && cache.stride(2) >= 0 &&
                        cache.size(2) * cache.stride(2) * e < k4g,
                    "kv_cache page stride and page_size x token stride must be below 4 GiB, "
                    "got strides ", cache.strides());
  bool aligned = reinterpret_cast<uintptr_t>(cache.data_ptr()) % 16 == 0;
  for (int i = 0; i < 3; ++i) aligned = aligned && (cache.stride(i) * e) % 16 == 0;
  TORCH_CHECK_VALUE(aligned, "kv_cache pages, K/V halves and tokens must start at 16-byte "
                    "aligned addresses, got strides ", cache.strides());
}

void check_workspace(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t n,
                     const at::Tensor& q) {
  TORCH_CHECK_VALUE(t.device() == q.device(), name, " must be on q's device");
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, " must be ", dtype, ", got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.is_contiguous() && t.numel() >= n, name, " must be contiguous with >= ", n,
                    " elements, got ", t.numel());
}

}  // namespace attention
}  // namespace pykernels

void paged_decode(at::Tensor& out, const at::Tensor& q, const at::Tensor& kv_cache,
                  const at::Tensor& kv_indptr, const at::Tensor& kv_indices,
                  const at::Tensor& kv_last_page_len, at::Tensor& partial_o,
                  at::Tensor& partial_lse, at::Tensor& counters, int64_t num_splits,
                  int64_t num_stages, double sm_scale, double logits_soft_cap,
                  int64_t window_left, double k_scale, double v_scale) {
  using namespace pykernels::attention;
  PK_CHECK_CUDA(q);
  PK_CHECK_DIM(q, 3);
  PK_CHECK_LAST_DIM_CONTIGUOUS(q);
  PK_CHECK_SAME_DEVICE(out, q);
  PK_CHECK_SAME_DTYPE(out, q);
  PK_CHECK_LAST_DIM_CONTIGUOUS(out);
  PK_CHECK_SHAPE(out.sizes() == q.sizes(), "out must have q's shape ", q.sizes(), ", got ",
                 out.sizes());
  check_cache(kv_cache, q);
  const int64_t batch = q.size(0), hq = q.size(1), hkv = kv_cache.size(3);
  PK_CHECK_SHAPE(hkv > 0 && hq % hkv == 0, "num_q_heads (", hq,
                 ") must be a multiple of num_kv_heads (", hkv, ")");
  check_index(kv_indptr, "kv_indptr", batch + 1, q);
  check_index(kv_indices, "kv_indices", -1, q);
  check_index(kv_last_page_len, "kv_last_page_len", batch, q);
  TORCH_CHECK_VALUE(num_splits >= 1 && num_splits <= kMaxSplits, "num_splits must be in 1..",
                    kMaxSplits, ", got ", num_splits);
  TORCH_CHECK_VALUE(num_stages == 0 || num_stages == 2 || num_stages == 3,
                    "num_stages must be 0 (default), 2 or 3, got ", num_stages);
  const int group = (int)(hq / hkv);
  const int chunks = (group + 15) / 16;  // 16 q heads per CTA (the mma's rows)
  if (num_splits > 1) {
    check_workspace(partial_o, "partial_o", at::kFloat, batch * hq * num_splits * q.size(2), q);
    check_workspace(partial_lse, "partial_lse", at::kFloat, batch * hq * num_splits, q);
    check_workspace(counters, "counters", at::kInt, batch * hkv * chunks, q);
  }
  if (batch == 0) return;
  const int64_t ps = kv_cache.size(2);
  DecodeParams p{};
  p.out = out.data_ptr();
  p.q = q.data_ptr();
  p.cache = kv_cache.data_ptr();
  p.partial_o = num_splits > 1 ? partial_o.data_ptr<float>() : nullptr;
  p.partial_lse = num_splits > 1 ? partial_lse.data_ptr<float>() : nullptr;
  p.counters = num_splits > 1 ? counters.data_ptr<int>() : nullptr;
  p.kv_indptr = kv_indptr.data_ptr<int>();
  p.kv_indices = kv_indices.data_ptr<int>();
  p.kv_last_page_len = kv_last_page_len.data_ptr<int>();
  const int64_t qe = q.element_size();
  p.q_aligned = reinterpret_cast<uintptr_t>(q.data_ptr()) % 16 == 0 &&
                (q.stride(0) * qe) % 16 == 0 && (q.stride(1) * qe) % 16 == 0;
  p.q_stride_b = q.stride(0);
  p.q_stride_h = q.stride(1);
  p.o_stride_b = out.stride(0);
  p.o_stride_h = out.stride(1);
  const int64_t ce = kv_cache.element_size();
  p.kv_bytes = kv_cache.stride(1) * ce;
  p.head_bytes = kv_cache.stride(3) * ce;
  p.page_bytes = (uint32_t)(kv_cache.stride(0) * ce);
  p.tok_bytes = (uint32_t)(kv_cache.stride(2) * ce);
  p.num_q_heads = (int)hq;
  p.group = group;
  p.head_chunks = chunks;
  p.page_size = (int)ps;
  p.page_shift = (ps & (ps - 1)) == 0 ? __builtin_ctzll(ps) : -1;
  p.num_splits = (int)num_splits;
  p.window_left = (int)window_left;
  const double log2e = 1.4426950408889634;
  const double base = sm_scale * k_scale;
  p.qk_scale = (float)(logits_soft_cap > 0 ? base / logits_soft_cap : base * log2e);
  p.cap_scale = (float)(logits_soft_cap > 0 ? logits_soft_cap * log2e : 0.0);
  p.v_scale = (float)v_scale;
  TORCH_CHECK_VALUE(batch <= 65535, "batch must be <= 65535 (grid z), got ", batch);
  const dim3 grid((unsigned)num_splits, (unsigned)(hkv * chunks), (unsigned)batch);
  const c10::cuda::OptionalCUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool fp8 = kv_cache.scalar_type() == at::kFloat8_e4m3fn;
  PK_DISPATCH_HALF(q.scalar_type(), {
    PK_DISPATCH_HEAD_DIM(q.size(2), {
      const int stages = num_stages > 0 ? (int)num_stages : default_stages<kD>();
      if (fp8) {
        if (stages == 2) launch_decode<scalar_t, __nv_fp8_e4m3, kD, 2>(p, grid, stream);
        else launch_decode<scalar_t, __nv_fp8_e4m3, kD, 3>(p, grid, stream);
      } else {
        if (stages == 2) launch_decode<scalar_t, scalar_t, kD, 2>(p, grid, stream);
        else launch_decode<scalar_t, scalar_t, kD, 3>(p, grid, stream);
      }
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
