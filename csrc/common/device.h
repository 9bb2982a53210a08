// Host-side facts about the current CUDA device, cached: no driver call on the hot path (or
// inside a CUDA-graph capture).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <atomic>

namespace pykernels {

// One attribute of the current device, cached per device and attribute (read once; the cache
// holds value + 1, so 0 means unread even for attributes that are 0, a minor version).
template <cudaDeviceAttr kAttr>
inline int device_attribute() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices] = {};
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const int cached = device < kMaxDevices ? cache[device].load(std::memory_order_relaxed) : 0;
  if (cached != 0) return cached - 1;
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, kAttr, device));
  if (device < kMaxDevices) cache[device].store(value + 1, std::memory_order_relaxed);
  return value;
}

// SMs of the current device.
inline int sm_count() { return device_attribute<cudaDevAttrMultiProcessorCount>(); }

// Compute capability of the current device as 10 * major + minor (90 on an H100 / H200).
inline int compute_capability() {
  return 10 * device_attribute<cudaDevAttrComputeCapabilityMajor>() +
         device_attribute<cudaDevAttrComputeCapabilityMinor>();
}

}  // namespace pykernels
