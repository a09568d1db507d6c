// Compiled instead of device.cu when the CUDA backend is not built.
#include "core/cuda/device.h"

namespace negmine {

bool CudaBuilt() { return false; }
int CudaDeviceCount() { return 0; }

}  // namespace negmine
