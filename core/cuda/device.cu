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

}  // namespace negmine
