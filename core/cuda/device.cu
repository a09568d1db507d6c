#include <cuda_runtime.h>

#include "core/cuda/device.h"

namespace negmine {

bool CudaBuilt() { return true; }

int CudaDeviceCount() {
  int count = 0;
  // Without a driver or device this returns an error code; that means "none".
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error
    return 0;
  }
  return count;
}

bool CudaMemoryInfo(int device, size_t* used, size_t* total) {
  *used = *total = 0;
  int previous = 0;
  if (cudaGetDevice(&previous) != cudaSuccess || cudaSetDevice(device) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  size_t free_bytes = 0;
  const bool ok = cudaMemGetInfo(&free_bytes, total) == cudaSuccess;
  if (ok) *used = *total - free_bytes;
  cudaGetLastError();
  cudaSetDevice(previous);
  return ok;
}

}  // namespace negmine
