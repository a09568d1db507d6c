// Compiled instead of device.cu and device_mirror.cu when the CUDA backend is
// not built.
#include "core/cuda/device.h"
#include "core/cuda/device_mirror.h"

namespace negmine {

bool CudaBuilt() { return false; }
int CudaDeviceCount() { return 0; }
bool CudaMemoryInfo(int, size_t* used, size_t* total) {
  *used = *total = 0;
  return false;
}

absl::StatusOr<std::unique_ptr<DeviceMirror>> DeviceMirror::Create(int, DeviceDtype, int) {
  return absl::UnimplementedError(
      "the CUDA backend was not built into this binary (configure with -DNEGMINE_CUDA=ON "
      "where nvcc is installed)");
}

}  // namespace negmine
