// CUDA device discovery, behind a plain header: no CUDA types here, so every
// translation unit can include it whether or not CUDA was built.
//
// Thread safety: both functions are safe to call from any thread.
#ifndef NEGMINE_CORE_CUDA_DEVICE_H_
#define NEGMINE_CORE_CUDA_DEVICE_H_

#include <cstddef>

namespace negmine {

// True when this binary was built with the CUDA backend (NEGMINE_CUDA).
bool CudaBuilt();

// The number of usable CUDA devices; 0 when CUDA is not built, no driver is
// loaded, or no device is visible.
int CudaDeviceCount();

// Device memory of CUDA device `device` in bytes: in use (by any process)
// and in all. False when there is no such device (then both are 0).
bool CudaMemoryInfo(int device, size_t* used, size_t* total);

}  // namespace negmine

#endif  // NEGMINE_CORE_CUDA_DEVICE_H_
