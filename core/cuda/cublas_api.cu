// The cuBLAS loader (core/cuda/cublas_api.h).
#include "core/cuda/cublas_api.h"

#include <dlfcn.h>

#include <type_traits>

#include "absl/strings/str_cat.h"

namespace negmine {
namespace device_internal {
namespace {

absl::StatusOr<CublasApi> OpenCublas() {
  void* lib = nullptr;
  for (const char* name : {"libcublas.so.13", "libcublas.so"}) {
    if ((lib = dlopen(name, RTLD_NOW | RTLD_LOCAL)) != nullptr) break;
  }
  if (lib == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat("cuBLAS (libcublas.so.13) could not be loaded: ", dlerror(),
                     "; install the CUDA 13 runtime libraries or set LD_LIBRARY_PATH"));
  }
  CublasApi api;
  bool ok = true;
  auto get = [&](auto* fn, const char* symbol) {
    *fn = reinterpret_cast<std::remove_pointer_t<decltype(fn)>>(dlsym(lib, symbol));
    ok = ok && *fn != nullptr;
  };
  get(&api.create, "cublasCreate_v2");
  get(&api.destroy, "cublasDestroy_v2");
  get(&api.set_stream, "cublasSetStream_v2");
  get(&api.set_math_mode, "cublasSetMathMode");
  get(&api.gemm_ex, "cublasGemmEx");
  get(&api.sgemm, "cublasSgemm_v2");
  if (!ok) return absl::FailedPreconditionError("cuBLAS lacks a function negmine uses");
  return api;  // the library stays open for the life of the process
}

}  // namespace

const absl::StatusOr<CublasApi>& LoadCublas() {
  static const absl::StatusOr<CublasApi>* api = new absl::StatusOr<CublasApi>(OpenCublas());
  return *api;
}

absl::Status CublasStatus(cublasStatus_t s, const char* what) {
  if (s == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  if (s == CUBLAS_STATUS_ALLOC_FAILED) {
    return absl::ResourceExhaustedError(
        absl::StrCat("out of GPU memory (", what, ")"));
  }
  return absl::InternalError(
      absl::StrCat("cuBLAS error ", static_cast<int>(s), " in ", what));
}

}  // namespace device_internal
}  // namespace negmine
