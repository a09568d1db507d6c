// The fused scan (top-k only): scores on tensor cores (WMMA), kept only
// when they reach their query's bound, and the candidates cut back to the
// best k.
//
// Private to core/cuda: included only by device_mirror.cu (one translation
// unit: nvcc gives template kernels internal linkage, so the kernels are
// compiled where the Mirror launches them).
#ifndef NEGMINE_CORE_CUDA_KERNELS_FUSED_CUH_
#define NEGMINE_CORE_CUDA_KERNELS_FUSED_CUH_

#include <mma.h>

#include <cstddef>
#include <cstdint>

#include "core/cuda/kernels.cuh"

namespace negmine {
namespace device_internal {

// The fused scan's block: kFusedM queries against tiles of kFusedN targets,
// 8 warps of 32 x 32 (2 x 2 tensor-core fragments of 16 x 16 x 16).
constexpr int kFusedM = 64;
constexpr int kFusedN = 128;
constexpr int kFusedMaxStride = 256;
constexpr int kFusedPad = 8;  // elements per smem row against bank conflicts
constexpr int kFusedScoreLd = kFusedN + 4;

// Elements per smem row: the stride rounded up to the MMA depth (16), zeros
// past the stride, and the pad.
__host__ __device__ constexpr int FusedLd(int stride) {
  return (stride + 15) / 16 * 16 + kFusedPad;
}

inline size_t FusedSharedBytes(int stride, size_t elem) {
  return size_t{kFusedM + kFusedN} * FusedLd(stride) * elem +
         size_t{kFusedM} * kFusedScoreLd * sizeof(float) + kFusedM * sizeof(float);
}

// rows x depth elements into shared memory (row stride ld) from `src` (row
// stride `stride`), 16 bytes a thread: rows from `valid` on and elements
// from `stride` on are zeros.
template <typename T>
__device__ void LoadTile(T* dst, int ld, int depth, const T* src, int stride, int rows,
                         size_t valid) {
  const int vecs = depth / 8;
  for (int i = threadIdx.x; i < rows * vecs; i += blockDim.x) {
    const int r = i / vecs, c = i % vecs;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (r < valid && c * 8 < stride) v = reinterpret_cast<const uint4*>(src + size_t(r) * stride)[c];
    reinterpret_cast<uint4*>(dst + r * ld)[c] = v;
  }
}

// Scores queries [0, g) (T, stride apart) against rows [row_begin, row_end)
// with tensor cores, and appends every live, not excluded (row, score) whose
// score reaches bound[q] to query q's candidates: cand[q * cap + i], i from
// an atomic count[q] (entries past cap are dropped; count[q] > cap tells).
// The scores never go to global memory. Block (x, y): query tile y, target
// tiles x, x + gridDim.x, ...
template <typename T>
__global__ void __launch_bounds__(kThreads)
    FusedScanKernel(const T* vectors, int stride, const T* queries, size_t g,
                    size_t row_begin, size_t row_end, const uint8_t* live, const float* bound,
                    const uint32_t* excl_offsets, const uint32_t* excl_rows,
                    uint32_t query_base, Cand* cand, uint32_t* count, uint32_t cap) {
  using namespace nvcuda;
  extern __shared__ __align__(128) unsigned char fused_smem[];  // WMMA: 32-byte aligned tiles
  const int ld = FusedLd(stride), depth = ld - kFusedPad;
  T* qs = reinterpret_cast<T*>(fused_smem);                       // kFusedM x ld
  T* xs = qs + kFusedM * ld;                                      // kFusedN x ld
  float* ss = reinterpret_cast<float*>(xs + kFusedN * ld);        // kFusedM x kFusedScoreLd
  float* qbound = ss + kFusedM * kFusedScoreLd;                   // kFusedM
  const int tid = threadIdx.x, warp = tid >> 5;
  const size_t q0 = size_t{blockIdx.y} * kFusedM;
  LoadTile(qs, ld, depth, queries + q0 * stride, stride, kFusedM, q0 < g ? g - q0 : 0);
  for (int r = tid; r < kFusedM; r += kThreads) {
    qbound[r] = q0 + r < g ? bound[q0 + r] : INFINITY;
  }
  const int wm = warp / 4, wn = warp % 4;  // the warp's 32 x 32 of the tile
  for (size_t t0 = row_begin + size_t{blockIdx.x} * kFusedN; t0 < row_end;
       t0 += size_t{gridDim.x} * kFusedN) {
    __syncthreads();  // the last tile's epilogue is done with xs and ss
    LoadTile(xs, ld, depth, vectors + t0 * stride, stride, kFusedN, row_end - t0);
    __syncthreads();
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
    }
    for (int k = 0; k < depth; k += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], qs + (wm * 32 + i * 16) * ld + k, ld);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], xs + (wn * 32 + j * 16) * ld + k, ld);
#pragma unroll
      for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
      }
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        wmma::store_matrix_sync(ss + (wm * 32 + i * 16) * kFusedScoreLd + wn * 32 + j * 16,
                                acc[i][j], kFusedScoreLd, wmma::mem_row_major);
      }
    }
    __syncthreads();
    for (int e = tid; e < kFusedM * kFusedN; e += kThreads) {
      const int r = e / kFusedN, c = e % kFusedN;
      const size_t row = t0 + c;
      const float score = ss[r * kFusedScoreLd + c];
      if (row >= row_end || !(score >= qbound[r]) || !live[row]) continue;
      const size_t q = q0 + r;  // < g: qbound is +inf past g
      if (excl_offsets != nullptr &&
          Contains(excl_rows, excl_offsets[query_base + q], excl_offsets[query_base + q + 1],
                   static_cast<uint32_t>(row))) {
        continue;
      }
      const uint32_t pos = atomicAdd(&count[q], 1u);
      if (pos < cap) cand[q * cap + pos] = Cand{score, score, static_cast<uint32_t>(row)};
    }
  }
}

// Per query: lens[q] = min(count[q], cap), and overflow[q] = 1 once a
// count went past cap (its candidates are incomplete).
__global__ void ClipCountsKernel(const uint32_t* count, uint32_t cap, size_t g, uint32_t* lens,
                                 uint8_t* overflow) {
  for (size_t q = blockIdx.x * size_t{blockDim.x} + threadIdx.x; q < g;
       q += size_t{gridDim.x} * blockDim.x) {
    lens[q] = min(count[q], cap);
    if (count[q] > cap) overflow[q] = 1;
  }
}

// The best k (best[q * k ..]) back to the front of each query's candidates,
// and count[q] = how many of them are hits.
__global__ void KeepBestKernel(const Cand* best, int k, Cand* cand, uint32_t cap,
                               uint32_t* count) {
  const size_t q = blockIdx.x;
  uint32_t valid = 0;
  for (int j = threadIdx.x; j < k; j += blockDim.x) {
    const Cand c = best[q * k + j];
    cand[q * cap + j] = c;
    valid += c.row != kNoRow;
  }
  for (int o = 16; o > 0; o >>= 1) valid += __shfl_xor_sync(~0u, valid, o);
  if (threadIdx.x == 0) count[q] = valid;
}

}  // namespace device_internal
}  // namespace negmine

#endif  // NEGMINE_CORE_CUDA_KERNELS_FUSED_CUH_
