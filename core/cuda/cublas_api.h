// cuBLAS, opened at run time (dlopen) rather than linked: the functions the
// mirror calls, the process's one copy of them, and the status of a cuBLAS
// call. Private to core/cuda.
#ifndef NEGMINE_CORE_CUDA_CUBLAS_API_H_
#define NEGMINE_CORE_CUDA_CUBLAS_API_H_

#include <cublas_v2.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/status.h"

namespace negmine {
namespace device_internal {

// cuBLAS, opened at run time rather than linked: libcublasLt carries ~94 KB
// of thread-local storage, and a process linked with it can no longer start
// threads with small stacks (glibc places static TLS on each thread's stack;
// civetweb's 100 KB threads, which serve /metrics, then fail to start). Its
// TLS is of the dynamic model, so opening it later is safe.
struct CublasApi {
  decltype(&cublasCreate_v2) create;
  decltype(&cublasDestroy_v2) destroy;
  decltype(&cublasSetStream_v2) set_stream;
  decltype(&cublasSetMathMode) set_math_mode;
  // (cublasGemmEx is overloaded in C++; this is the C symbol's signature)
  cublasStatus_t (*gemm_ex)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int,
                            const void*, const void*, cudaDataType, int, const void*,
                            cudaDataType, int, const void*, void*, cudaDataType, int,
                            cublasComputeType_t, cublasGemmAlgo_t);
  decltype(&cublasSgemm_v2) sgemm;
};

// The process's cuBLAS, opened once (FAILED_PRECONDITION when the library
// or one of the functions is missing).
const absl::StatusOr<CublasApi>& LoadCublas();
// The loaded functions; only after LoadCublas() succeeded.
inline const CublasApi& Blas() { return *LoadCublas(); }

// A cuBLAS status: out of memory is RESOURCE_EXHAUSTED, the rest INTERNAL.
absl::Status CublasStatus(cublasStatus_t s, const char* what);

#define CUBLAS_RETURN_IF_ERROR(expr) RETURN_IF_ERROR(CublasStatus((expr), #expr))

}  // namespace device_internal
}  // namespace negmine

#endif  // NEGMINE_CORE_CUDA_CUBLAS_API_H_
