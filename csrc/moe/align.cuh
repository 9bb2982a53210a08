// moe_align_block_size kernels: token slots grouped by expert, each group padded to a multiple of
// block_size with the sentinel numel, the expert id of every block, and the padded total.
// Torch-free; the launcher in align.cu checks the inputs and picks the path.
//
// Slot i is the flat index into topk_ids [M, topk]. Ids outside [0, E) are dropped: counted for no
// expert and written nowhere (as the torch reference does), so a bad id never writes out of
// bounds. Within an expert's group the slot order is unspecified (atomics decide it).
//
// Two paths:
//  - small (numel <= kSmallMaxSlots): one CTA holds every id in registers (<= 2 per thread up to
//    2048 slots), counts them in shared memory, scans, scatters, writes expert ids and padding in
//    one launch. Extra CTAs fill the part of the buffer that lies past any possible padded total.
//  - large, two launches (each costs ~2-3 us of fixed latency on the H200, so no separate scan
//    launch): count (G CTAs: per-CTA histograms + sentinel fill) -> scatter (G CTAs: each reads
//    all G x E histograms from L2 and scans them itself, so its range per expert is the group's
//    padded start plus what earlier CTAs counted: no global atomics; shared atomics rank inside).
#pragma once

#include <cstdint>

namespace pykernels {
namespace moe_align {

constexpr int kMaxExperts = 4096;        // shared memory: 2 ints per expert, 32 KB at 4096
constexpr int kSmallItems = 8;           // ids per thread held in registers on the small path
constexpr int kSmallThreads = 1024;
// One CTA holds up to kSmallThreads * kSmallItems = 8192 ids, but on the H200 (2026-11-21) it took
// 20 us for 1024 x top-8 over 128 experts (6 us at 64 x 8): past 2048 slots the multi-CTA path
// is used. Since then the small path's threads grow with numel and the large path lost its scan
// launch: the crossover is to be re-measured.
constexpr int kSmallMaxSlots = 2048;
static_assert(kSmallMaxSlots <= kSmallThreads * kSmallItems, "the small path holds every id");
constexpr int kUnroll = 4;               // loads in flight per thread on the large path
constexpr int kCountLoads = 8;           // loads of counts in flight per thread (scatter pass)
constexpr unsigned kFullMask = 0xffffffffu;

// The expert of slot i, or -1 when the id is outside [0, E) (dropped).
template <typename IdT>
__device__ __forceinline__ int expert_of(const IdT* ids, int i, int num_experts) {
  const IdT e = ids[i];
  return (e >= 0 && e < (IdT)num_experts) ? (int)e : -1;
}

// Adds one per lane to counters[key] with one shared atomic per distinct key in the warp (a warp
// routing all 32 slots to one expert would otherwise serialize 32 atomics on one address) and
// returns this lane's rank: the counter's old value plus its position among equal-keyed lanes.
// The whole warp must call it (converged); lanes with key < 0 add nothing.
__device__ __forceinline__ int warp_add_rank(int* counters, int key) {
  const unsigned peers = __match_any_sync(kFullMask, key);
  const int lane = threadIdx.x & 31;
  const int leader = __ffs(peers) - 1;
  int base = 0;
  if (key >= 0 && lane == leader) base = atomicAdd(&counters[key], __popc(peers));
  base = __shfl_sync(kFullMask, base, leader);
  return base + __popc(peers & ((1u << lane) - 1u));
}

// Counting only: the same aggregation without returning ranks.
__device__ __forceinline__ void warp_add(int* counters, int key) {
  const unsigned peers = __match_any_sync(kFullMask, key);
  if (key >= 0 && (threadIdx.x & 31) == __ffs(peers) - 1) atomicAdd(&counters[key], __popc(peers));
}

__device__ __forceinline__ int padded(int count, int block_size) {
  return (count + block_size - 1) / block_size * block_size;
}

// Exclusive prefix sum of one value per thread over the block (blockDim.x a multiple of 32);
// *total gets the sum of all. s_warp: 32 ints of shared memory. Starts and ends with a barrier so
// callers may reuse s_warp.
__device__ __forceinline__ int block_exclusive_scan(int v, int* s_warp, int* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  int incl = v;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const int t = __shfl_up_sync(kFullMask, incl, d);
    if (lane >= d) incl += t;
  }
  __syncthreads();
  if (lane == 31) s_warp[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    int w = lane < nwarps ? s_warp[lane] : 0;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int t = __shfl_up_sync(kFullMask, w, d);
      if (lane >= d) w += t;
    }
    s_warp[lane] = w;  // inclusive prefix over warps
  }
  __syncthreads();
  const int before = warp > 0 ? s_warp[warp - 1] : 0;
  *total = s_warp[nwarps - 1];
  __syncthreads();
  return before + incl - v;
}

// s_off[e] = padded start of expert e's group, s_off[E] = padded total, from s_count[0..E).
// Thread t owns the ceil(E / blockDim) consecutive experts starting at t * per (<= 16 at E = 4096
// and 256 threads). s_off may be s_count (scan in place): a thread reads only its own experts'
// counts, each before overwriting it.
__device__ __forceinline__ void scan_experts(const int* s_count, int* s_off, int num_experts,
                                             int block_size, int* s_warp) {
  const int per = (num_experts + blockDim.x - 1) / blockDim.x;
  const int first = threadIdx.x * per;
  const int last = min(first + per, num_experts);
  int sum = 0;
  for (int e = first; e < last; ++e) sum += padded(s_count[e], block_size);
  int total;
  int run = block_exclusive_scan(sum, s_warp, &total);
  for (int e = first; e < last; ++e) {
    const int size = padded(s_count[e], block_size);
    s_off[e] = run;
    run += size;
  }
  if (threadIdx.x == 0) s_off[num_experts] = total;
  __syncthreads();
}

// The expert whose padded range holds position p < s_off[E]: the last e with s_off[e] <= p
// (experts with no slot have empty ranges and are skipped by "last").
__device__ __forceinline__ int find_expert(const int* s_off, int num_experts, int p) {
  int lo = 0, hi = num_experts;  // s_off[lo] <= p < s_off[hi]
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (s_off[mid] <= p) lo = mid; else hi = mid;
  }
  return lo;
}

// expert_ids[b]: the (mapped) expert owning block b, -1 past the padded total; the blocks split
// over `parts` CTAs (this one is `part`), each of which holds the whole s_off.
__device__ __forceinline__ void write_expert_ids(const int* s_off, int num_experts,
                                                 int block_size, const int32_t* expert_map,
                                                 int32_t* expert_ids, int num_blocks, int part,
                                                 int parts) {
  const int total = s_off[num_experts];
  // Unsigned: a grid-wide step can exceed the 65536 of int32 room the launcher leaves past cap.
  for (unsigned b = part * blockDim.x + threadIdx.x; b < (unsigned)num_blocks;
       b += parts * blockDim.x) {
    const int p = (int)b * block_size;  // < cap + block_size < 2^31, checked by the launcher
    int id = -1;
    if (p < total) {
      const int e = find_expert(s_off, num_experts, p);
      id = expert_map != nullptr ? expert_map[e] : e;
    }
    expert_ids[b] = id;
  }
}

// value into dst[begin, end), the range split over `parts` CTAs (this one is `part`).
__device__ __forceinline__ void fill(int32_t* dst, int begin, int end, int32_t value, int part,
                                     int parts) {
  // Unsigned: a grid-wide step can exceed the 65536 of int32 room the launcher leaves past cap.
  for (unsigned p = begin + part * blockDim.x + threadIdx.x; p < (unsigned)end;
       p += parts * blockDim.x) {
    dst[p] = value;
  }
}

// ---- small path: one CTA does everything --------------------------------------------------------

// CTA 0: count (ranks kept in registers), scan, scatter, expert ids, padding, total, and the
// sentinel in [total, bound). CTAs 1.. fill [bound, cap): bound = numel + min(E, numel) *
// (block_size - 1) bounds the padded total (at most numel experts have a slot), so those
// positions are padding whatever the ids are and need no wait for CTA 0.
// Shared memory (dynamic): s_count[E], s_off[E + 1].
template <typename IdT>
__global__ void __launch_bounds__(kSmallThreads) align_small_kernel(
    const IdT* __restrict__ ids, int numel, int num_experts, int block_size,
    const int32_t* __restrict__ expert_map, int32_t* __restrict__ sorted,
    int32_t* __restrict__ expert_ids, int32_t* __restrict__ total_out, int cap, int num_blocks,
    int bound) {
  if (blockIdx.x > 0) {
    fill(sorted, bound, cap, numel, blockIdx.x - 1, gridDim.x - 1);
    return;
  }
  extern __shared__ int smem[];
  __shared__ int s_warp[32];
  int* s_count = smem;
  int* s_off = smem + num_experts;
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) s_count[e] = 0;
  __syncthreads();

  const int items = (numel + blockDim.x - 1) / blockDim.x;  // <= kSmallItems, same for all
  int expert[kSmallItems], rank[kSmallItems];
#pragma unroll
  for (int k = 0; k < kSmallItems; ++k) {
    const int i = threadIdx.x + k * blockDim.x;
    expert[k] = (k < items && i < numel) ? expert_of(ids, i, num_experts) : -1;
  }
#pragma unroll
  for (int k = 0; k < kSmallItems; ++k) {
    if (k < items) rank[k] = warp_add_rank(s_count, expert[k]);  // uniform branch
  }
  __syncthreads();
  scan_experts(s_count, s_off, num_experts, block_size, s_warp);

#pragma unroll
  for (int k = 0; k < kSmallItems; ++k) {
    if (k < items && expert[k] >= 0) {
      sorted[s_off[expert[k]] + rank[k]] = threadIdx.x + k * blockDim.x;
    }
  }
  write_expert_ids(s_off, num_experts, block_size, expert_map, expert_ids, num_blocks, 0, 1);
  // Padding of each expert's last block: one warp per expert, <= block_size - 1 slots each.
  const int lane = threadIdx.x & 31;
  for (int e = threadIdx.x >> 5; e < num_experts; e += blockDim.x >> 5) {
    for (int p = s_off[e] + s_count[e] + lane; p < s_off[e + 1]; p += 32) sorted[p] = numel;
  }
  const int total = s_off[num_experts];
  fill(sorted, total, bound, numel, 0, 1);
  if (threadIdx.x == 0) *total_out = total;
}

// ---- large path: count -> scatter --------------------------------------------------------------

// The experts of slots base + u * blockDim.x + threadIdx.x (u < kUnroll; -1 past end), all
// loads issued before any is used.
template <typename IdT>
__device__ __forceinline__ void load_experts(const IdT* __restrict__ ids, int base, int end,
                                             int num_experts, int (&e)[kUnroll]) {
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int i = base + u * blockDim.x + threadIdx.x;
    e[u] = i < end ? expert_of(ids, i, num_experts) : -1;
  }
}

// CTA c counts the slots [c * chunk, (c + 1) * chunk) per expert into counts[c * E + e] (every
// entry written: no zeroing launch), and all CTAs fill `sorted` with the sentinel; the scatter
// pass overwrites the real slots. Shared memory: s_count[E].
template <typename IdT>
__global__ void align_count_kernel(const IdT* __restrict__ ids, int numel, int num_experts,
                                   int chunk, int* __restrict__ counts,
                                   int32_t* __restrict__ sorted, int cap) {
  extern __shared__ int s_count[];
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) s_count[e] = 0;
  __syncthreads();
  const int begin = blockIdx.x * chunk;
  const int end = min(numel, begin + chunk);
  for (int base = begin; base < end; base += kUnroll * blockDim.x) {  // uniform trip count
    int e[kUnroll];
    load_experts(ids, base, end, num_experts, e);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) warp_add(s_count, e[u]);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
    counts[blockIdx.x * num_experts + e] = s_count[e];
  }
  fill(sorted, 0, cap, numel, blockIdx.x, gridDim.x);
}

// Every CTA reads all G x E counts (<= 32768 ints, 128 KB, written by the count pass and in L2)
// and derives for each expert e: the total (-> padded start of e's group, scanned in place) and
// what CTAs before this one counted; their sum is this CTA's base for e, so the ranges are fixed
// without a scan launch or global atomics. It then writes its chunk's slots at shared-memory ranks
// from those bases (the count pass already wrote the sentinel everywhere else, one launch
// earlier on the stream), its share of expert_ids, and CTA 0 the padded total.
// Shared memory (dynamic): s_off[E + 1] (totals, then starts), s_base[E].
template <typename IdT>
__global__ void __launch_bounds__(1024) align_scatter_kernel(
    const IdT* __restrict__ ids, int numel, int num_experts, int block_size, int chunk,
    const int* __restrict__ counts, const int32_t* __restrict__ expert_map,
    int32_t* __restrict__ sorted, int32_t* __restrict__ expert_ids, int num_blocks,
    int32_t* __restrict__ total_out) {
  extern __shared__ int smem[];
  __shared__ int s_warp[32];
  int* s_off = smem;
  int* s_base = smem + num_experts + 1;
  const int begin = blockIdx.x * chunk;
  const int end = min(numel, begin + chunk);
  int e[kUnroll];
  load_experts(ids, begin, end, num_experts, e);  // first ids in flight during the counts pass
  for (int x = threadIdx.x; x < num_experts; x += blockDim.x) {
    s_off[x] = 0;
    s_base[x] = 0;
  }
  __syncthreads();
  // Flat over counts[c * E + x]: idx steps by blockDim.x, so x = idx % E steps by blockDim.x % E
  // (no division per load); idx < blockIdx.x * E are the CTAs before this one. <= 64 loads per
  // thread at 512 threads, kCountLoads in flight.
  const int n = gridDim.x * num_experts;  // <= kMaxCountsRead (launcher)
  const int mine = blockIdx.x * num_experts;
  const int step = blockDim.x % num_experts;
  int x_next = threadIdx.x % num_experts;
  for (int base = threadIdx.x; base < n; base += kCountLoads * blockDim.x) {
    int v[kCountLoads], x[kCountLoads];
#pragma unroll
    for (int u = 0; u < kCountLoads; ++u) {
      const int idx = base + u * blockDim.x;
      v[u] = idx < n ? counts[idx] : 0;
      x[u] = x_next;
      x_next += step;
      if (x_next >= num_experts) x_next -= num_experts;
    }
#pragma unroll
    for (int u = 0; u < kCountLoads; ++u) {
      if (v[u] != 0) {
        atomicAdd(&s_off[x[u]], v[u]);
        if (base + u * (int)blockDim.x < mine) atomicAdd(&s_base[x[u]], v[u]);
      }
    }
  }
  __syncthreads();
  scan_experts(s_off, s_off, num_experts, block_size, s_warp);  // ends with a barrier
  for (int x = threadIdx.x; x < num_experts; x += blockDim.x) s_base[x] += s_off[x];
  __syncthreads();

  for (int base = begin;;) {  // uniform trip count; e: slots base + u * blockDim.x + thread
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int pos = warp_add_rank(s_base, e[u]);
      if (e[u] >= 0) sorted[pos] = base + u * blockDim.x + threadIdx.x;
    }
    base += kUnroll * blockDim.x;
    if (base >= end) break;
    load_experts(ids, base, end, num_experts, e);
  }
  write_expert_ids(s_off, num_experts, block_size, expert_map, expert_ids, num_blocks,
                   blockIdx.x, gridDim.x);
  if (blockIdx.x == 0 && threadIdx.x == 0) *total_out = s_off[num_experts];
}

}  // namespace moe_align
}  // namespace pykernels
