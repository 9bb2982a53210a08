// Standalone sweep of the torch-free RMSNorm kernels over (threads, items) on 32768 x H bf16 rows,
// the measurement behind pick_items/pick_threads in csrc/norm/norm.cu. On a GPU machine:
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a bench/norm_sweep.cu -o /tmp/ns && /tmp/ns
#include <algorithm>
#include <cstdio>
#include <vector>
#include "../csrc/norm/norm.cuh"
using namespace pykernels;
using T = __nv_bfloat16;

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("CUDA %s at %d\n", cudaGetErrorString(e), __LINE__); exit(1);} } while (0)

template <int I>
float time_rms(T* out, const T* in, const T* w, int64_t rows, int64_t h, int threads, bool fused, T* res) {
  cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
  auto launch = [&] {
    if (fused) fused_add_rms_norm_kernel<T, 8, I><<<rows, threads>>>(out, res, w, h, h, h, 1e-6f);
    else rms_norm_kernel<T, 8, I><<<rows, threads>>>(out, in, w, h, h, h, 1e-6f);
  };
  for (int i = 0; i < 5; ++i) launch();
  CK(cudaDeviceSynchronize());
  std::vector<float> ts;
  for (int r = 0; r < 30; ++r) { cudaEventRecord(a); launch(); cudaEventRecord(b); cudaEventSynchronize(b); float ms; cudaEventElapsedTime(&ms, a, b); ts.push_back(ms); }
  CK(cudaGetLastError());
  std::sort(ts.begin(), ts.end());
  return ts[ts.size() / 2];
}

int main() {
  const int64_t rows = 32768;
  for (int64_t h : {4096, 8192}) {
    size_t n = rows * h;
    T *in, *out, *w, *res; CK(cudaMalloc(&in, n * 2)); CK(cudaMalloc(&out, n * 2)); CK(cudaMalloc(&res, n * 2)); CK(cudaMalloc(&w, h * 2));
    CK(cudaMemset(in, 0x3c, n * 2)); CK(cudaMemset(res, 0x3c, n * 2)); CK(cudaMemset(w, 0x3c, h * 2));
    const int64_t nvec = h / 8;
    for (int fused = 0; fused < 2; ++fused) {
      double bytes = (fused ? 4.0 : 2.0) * n * 2;
      for (int items : {0, 1, 2, 4, 8}) {
        for (int threads : {128, 256, 512, 1024}) {
          if (items > 0 && (int64_t)threads * items < nvec) continue;
          if (items > 0 && (int64_t)threads * items >= 2 * nvec) continue;
          float ms = 0;
          T* o = fused ? in : out;
          switch (items) {
            case 0: ms = time_rms<0>(o, in, w, rows, h, threads, fused, res); break;
            case 1: ms = time_rms<1>(o, in, w, rows, h, threads, fused, res); break;
            case 2: ms = time_rms<2>(o, in, w, rows, h, threads, fused, res); break;
            case 4: ms = time_rms<4>(o, in, w, rows, h, threads, fused, res); break;
            case 8: ms = time_rms<8>(o, in, w, rows, h, threads, fused, res); break;
          }
          printf("%s H=%5ld threads=%4d items=%d  %8.1f us  %.3f TB/s\n", fused ? "fused" : "rms  ", (long)h, threads, items, ms * 1e3, bytes / (ms * 1e-3) / 1e12);
        }
      }
    }
    cudaFree(in); cudaFree(out); cudaFree(w); cudaFree(res);
  }
  return 0;
}
