// The drift correction's kernels: the features of the drift kernel, and
// squared norms.
//
// Private to core/cuda: included only by device_mirror.cu (one translation
// unit: nvcc gives template kernels internal linkage, so the kernels are
// compiled where the Mirror launches them).
#ifndef NEGMINE_CORE_CUDA_KERNELS_DRIFT_CUH_
#define NEGMINE_CORE_CUDA_KERNELS_DRIFT_CUH_

#include <cstddef>
#include <cstdint>

#include "core/cuda/kernels.cuh"
#include "core/drift/drift.h"

namespace negmine {
namespace device_internal {

// Drift features in place: f (rows x m, row-major) from <x_i, l_j> to the
// kernel's value (Gaussian needs the squared norms xn, ln).
__global__ void DriftFeaturesKernel(float* f, size_t rows, int m, DriftKernel kernel,
                                    float inv_w, float center, const float* xn, const float* ln) {
  const size_t total = rows * m;
  for (size_t e = blockIdx.x * size_t{blockDim.x} + threadIdx.x; e < total;
       e += size_t{gridDim.x} * blockDim.x) {
    const size_t i = e / m;
    const int j = static_cast<int>(e % m);
    const float dot = f[e];
    if (kernel == DriftKernel::kGaussian) {
      f[e] = expf(-fmaxf(xn[i] + ln[j] - 2.0f * dot, 0.0f) * inv_w);
    } else if (kernel == DriftKernel::kExpInner) {
      f[e] = expf(fminf((dot - center) * inv_w, 60.0f));
    }
  }
}

// Squared norms of the rows of x (rows x d).
__global__ void SquaredNormsKernel(const float* x, size_t rows, int d, float* out) {
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < rows;
       i += size_t{gridDim.x} * blockDim.x) {
    float s = 0;
    for (int j = 0; j < d; ++j) s += x[i * d + j] * x[i * d + j];
    out[i] = s;
  }
}

}  // namespace device_internal
}  // namespace negmine

#endif  // NEGMINE_CORE_CUDA_KERNELS_DRIFT_CUH_
