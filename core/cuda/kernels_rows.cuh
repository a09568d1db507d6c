// The kernels that move rows, queries and ids: writes scattered into the
// mirror, queries padded to the stride, and the ids of the hits.
//
// Private to core/cuda: included only by device_mirror.cu (one translation
// unit: nvcc gives template kernels internal linkage, so the kernels are
// compiled where the Mirror launches them).
#ifndef NEGMINE_CORE_CUDA_KERNELS_ROWS_CUH_
#define NEGMINE_CORE_CUDA_KERNELS_ROWS_CUH_

#include <cstddef>
#include <cstdint>

#include "core/cuda/kernels.cuh"

namespace negmine {
namespace device_internal {

// dst[rows[i] * stride + j] = src[i * dim + j] (0 for j >= dim); and the
// live flags and ids likewise when given.
template <typename T>
__global__ void ScatterRowsKernel(const float* src, const uint32_t* rows, size_t count,
                                  int dim, int stride, T* dst, const uint8_t* live_src,
                                  uint8_t* live_dst, const uint64_t* ids_src,
                                  uint64_t* ids_dst) {
  const size_t total = count * stride;
  for (size_t e = blockIdx.x * size_t{blockDim.x} + threadIdx.x; e < total;
       e += size_t{gridDim.x} * blockDim.x) {
    const size_t i = e / stride;
    const int j = static_cast<int>(e % stride);
    const size_t row = rows[i];
    dst[row * stride + j] = Elem<T>::From(j < dim ? src[i * dim + j] : 0.0f);
    if (live_src != nullptr && j == 0) live_dst[row] = live_src[i];
    if (ids_src != nullptr && j == 0) ids_dst[row] = ids_src[i];
  }
}

// The ids of `count` candidates (0 for none).
__global__ void GatherIdsKernel(const Cand* c, size_t count, const uint64_t* ids,
                                uint64_t* out) {
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < count;
       i += size_t{gridDim.x} * blockDim.x) {
    out[i] = c[i].row == kNoRow ? 0 : ids[c[i].row];
  }
}

// Queries (n x dim floats) to n x stride, padded with zeros, as float and T.
template <typename T>
__global__ void PrepareQueriesKernel(const float* src, size_t n, int dim,
                                     int stride, float* qf, T* qt) {
  const size_t total = n * stride;
  for (size_t e = blockIdx.x * size_t{blockDim.x} + threadIdx.x; e < total;
       e += size_t{gridDim.x} * blockDim.x) {
    const size_t i = e / stride;
    const int j = static_cast<int>(e % stride);
    const float v = j < dim ? src[i * dim + j] : 0.0f;
    qf[e] = v;
    qt[e] = Elem<T>::From(v);
  }
}

}  // namespace device_internal
}  // namespace negmine

#endif  // NEGMINE_CORE_CUDA_KERNELS_ROWS_CUH_
