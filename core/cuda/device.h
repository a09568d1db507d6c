// CUDA device discovery, behind a plain header: no CUDA types here, so every
// translation unit can include it whether or not CUDA was built.
//
// Thread safety: both functions are safe to call from any thread.
#ifndef NEGMINE_CORE_CUDA_DEVICE_H_
#define NEGMINE_CORE_CUDA_DEVICE_H_

namespace negmine {

// True when this binary was built with the CUDA backend (NEGMINE_CUDA).
bool CudaBuilt();

// The number of usable CUDA devices; 0 when CUDA is not built, no driver is
// loaded, or no device is visible.
int CudaDeviceCount();

}  // namespace negmine

#endif  // NEGMINE_CORE_CUDA_DEVICE_H_
