// What the device mirror's kernels share: the launch shape, the candidate,
// the element types, the leaf level and the device helpers that more than
// one kernel file uses. The kernels themselves, by job: kernels_rows.cuh
// (rows, queries and ids in and out), kernels_select.cuh (the Scan's and the
// Beam's selection), kernels_fused.cuh (the fused scan), kernels_propose.cuh
// (the proposal sampler) and kernels_drift.cuh (the drift correction).
//
// Private to core/cuda: included only by device_mirror.cu (one translation
// unit: nvcc gives template kernels internal linkage, so the kernels are
// compiled where the Mirror launches them).
#ifndef NEGMINE_CORE_CUDA_KERNELS_CUH_
#define NEGMINE_CORE_CUDA_KERNELS_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <library_types.h>

#include <cstddef>
#include <cstdint>

#include "core/cuda/device_mirror.h"

namespace negmine {
namespace device_internal {

constexpr int kThreads = 256;
constexpr int kPerThread = 16;
constexpr int kSegment = kThreads * kPerThread;  // scores per selection block
constexpr uint32_t kNoRow = DeviceMirror::kNoRow;

// A candidate inside the device: 12 bytes (ids are looked up at the end).
struct Cand {
  float key;
  float score;
  uint32_t row;
};

// ------------------------------------------------------------ element types

template <typename T>
struct Elem;
template <>
struct Elem<float> {
  static constexpr cudaDataType_t kCuda = CUDA_R_32F;
  __device__ static float From(float x) { return x; }
  // 8 consecutive elements (32 bytes) dotted with q[0..8).
  __device__ static float Dot8(const float* x, const float* q) {
    const float4 a = reinterpret_cast<const float4*>(x)[0];
    const float4 b = reinterpret_cast<const float4*>(x)[1];
    return a.x * q[0] + a.y * q[1] + a.z * q[2] + a.w * q[3] + b.x * q[4] +
           b.y * q[5] + b.z * q[6] + b.w * q[7];
  }
};
// 8 consecutive 16-bit elements (one 16-byte load) dotted with q[0..8);
// Pair is __half2 or __nv_bfloat162.
__device__ inline float2 ToFloat2(__half2 h) { return __half22float2(h); }
__device__ inline float2 ToFloat2(__nv_bfloat162 h) { return __bfloat1622float2(h); }
template <typename Pair>
__device__ float Dot8Pairs(const void* x, const float* q) {
  const uint4 v = *reinterpret_cast<const uint4*>(x);
  const Pair* h = reinterpret_cast<const Pair*>(&v);
  float s = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = ToFloat2(h[i]);
    s += f.x * q[2 * i] + f.y * q[2 * i + 1];
  }
  return s;
}
template <>
struct Elem<__half> {
  static constexpr cudaDataType_t kCuda = CUDA_R_16F;
  __device__ static __half From(float x) { return __float2half_rn(x); }
  __device__ static float Dot8(const __half* x, const float* q) {
    return Dot8Pairs<__half2>(x, q);
  }
};
template <>
struct Elem<__nv_bfloat16> {
  static constexpr cudaDataType_t kCuda = CUDA_R_16BF;
  __device__ static __nv_bfloat16 From(float x) { return __float2bfloat16_rn(x); }
  __device__ static float Dot8(const __nv_bfloat16* x, const float* q) {
    return Dot8Pairs<__nv_bfloat162>(x, q);
  }
};

// The leaf level as the host tree stores it: leaf f's members (store rows)
// are pool[begin[f], begin[f] + count[f]).
struct Leaves {
  const uint32_t* begin;
  const uint32_t* count;
  const uint32_t* pool;
};

// -------------------------------------------------------- device helpers

__device__ __forceinline__ uint64_t Mix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// Whether `row` is in the sorted rows[lo, hi).
__device__ inline bool Contains(const uint32_t* rows, uint32_t lo, uint32_t hi, uint32_t row) {
  while (lo < hi) {
    const uint32_t mid = (lo + hi) / 2;
    if (rows[mid] < row) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo < hi && rows[lo] == row;
}

}  // namespace device_internal
}  // namespace negmine

#endif  // NEGMINE_CORE_CUDA_KERNELS_CUH_
