// The CUDA implementation of DeviceMirror (see the header for the layout and
// the algorithms). Comments here say why.
#include <cub/cub.cuh>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <dlfcn.h>
#include <mma.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#include "absl/strings/str_cat.h"
#include "core/cuda/changed_runs.h"
#include "core/cuda/device.h"
#include "core/cuda/device_mirror.h"
#include "core/status.h"
#include "core/tree/tree.h"

namespace negmine {
namespace {

// The one CUDA check: out of memory is RESOURCE_EXHAUSTED, the rest INTERNAL.
absl::Status CudaStatus(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return absl::OkStatus();
  cudaGetLastError();  // clear a non-sticky error so the next call is clean
  if (e == cudaErrorMemoryAllocation) {
    return absl::ResourceExhaustedError(
        absl::StrCat("out of GPU memory (", what, ")"));
  }
  return absl::InternalError(absl::StrCat("CUDA error ", cudaGetErrorName(e),
                                          " (", cudaGetErrorString(e), ") in ",
                                          what));
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

// The process's cuBLAS, opened once.
const absl::StatusOr<CublasApi>& LoadCublas() {
  static const absl::StatusOr<CublasApi>* api = new absl::StatusOr<CublasApi>(OpenCublas());
  return *api;
}
const CublasApi& Blas() { return *LoadCublas(); }

#define CUDA_RETURN_IF_ERROR(expr) RETURN_IF_ERROR(CudaStatus((expr), #expr))
#define CUBLAS_RETURN_IF_ERROR(expr) RETURN_IF_ERROR(CublasStatus((expr), #expr))

// Makes `device` current for the scope and restores the caller's device.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    cudaGetDevice(&previous_);
    if (previous_ != device) cudaSetDevice(device);
  }
  ~DeviceScope() { cudaSetDevice(previous_); }

 private:
  int previous_ = 0;
};

// A device allocation that knows its size; Grow keeps the content.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { cudaFree(ptr_); }

  // At least `bytes`; the old content is lost. On failure, unchanged.
  absl::Status Ensure(size_t bytes) {
    if (bytes <= bytes_) return absl::OkStatus();
    void* p = nullptr;
    CUDA_RETURN_IF_ERROR(cudaMalloc(&p, bytes));
    cudaFree(ptr_);
    ptr_ = p;
    bytes_ = bytes;
    return absl::OkStatus();
  }
  // At least `bytes`, keeping the first `keep` bytes. On failure, unchanged.
  absl::Status Grow(size_t bytes, size_t keep, cudaStream_t stream) {
    if (bytes <= bytes_) return absl::OkStatus();
    void* p = nullptr;
    CUDA_RETURN_IF_ERROR(cudaMalloc(&p, bytes));
    if (keep > 0) {
      const cudaError_t e = cudaMemcpyAsync(p, ptr_, keep, cudaMemcpyDeviceToDevice, stream);
      if (e == cudaSuccess) cudaStreamSynchronize(stream);
      if (e != cudaSuccess) {
        cudaFree(p);
        return CudaStatus(e, "copying a grown buffer");
      }
    }
    cudaFree(ptr_);
    ptr_ = p;
    bytes_ = bytes;
    return absl::OkStatus();
  }
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

constexpr int kThreads = 256;
constexpr int kPerThread = 16;
constexpr int kSegment = kThreads * kPerThread;  // scores per selection block
constexpr uint32_t kNoRow = DeviceMirror::kNoRow;

// A candidate inside the device: 12 bytes (ids are looked up at the end).
struct Cand {
  float key;
  float score;
  uint32_t row;
};
// Floats in one GEMM's score block (1 GiB).
constexpr size_t kScoreBudget = size_t{256} << 20;
// Candidate hits held for one beam group (768 MiB).
constexpr size_t kBeamBudget = size_t{64} << 20;
// Bytes of the pinned staging buffer.
constexpr size_t kStagingBytes = size_t{32} << 20;
constexpr int kMaxQueryGroup = 16384;
// Elements per block compared when the leaf pool is uploaded by changed runs.
constexpr size_t kPoolBlock = 1024;

// ------------------------------------------------------------ element types

template <typename T>
struct Elem;
template <>
struct Elem<float> {
  static constexpr cudaDataType_t kCuda = CUDA_R_32F;
  __device__ static float From(float x) { return x; }
  // 8 consecutive elements (32 bytes) dotted with q[0..8).
  __device__ static float Dot8(const float* x, const float* q) {
    const float4 a = reinterpret_cast<const float4*>(x)[0];
    const float4 b = reinterpret_cast<const float4*>(x)[1];
    return a.x * q[0] + a.y * q[1] + a.z * q[2] + a.w * q[3] + b.x * q[4] +
           b.y * q[5] + b.z * q[6] + b.w * q[7];
  }
};
// 8 consecutive 16-bit elements (one 16-byte load) dotted with q[0..8);
// Pair is __half2 or __nv_bfloat162.
__device__ inline float2 ToFloat2(__half2 h) { return __half22float2(h); }
__device__ inline float2 ToFloat2(__nv_bfloat162 h) { return __bfloat1622float2(h); }
template <typename Pair>
__device__ float Dot8Pairs(const void* x, const float* q) {
  const uint4 v = *reinterpret_cast<const uint4*>(x);
  const Pair* h = reinterpret_cast<const Pair*>(&v);
  float s = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = ToFloat2(h[i]);
    s += f.x * q[2 * i] + f.y * q[2 * i + 1];
  }
  return s;
}
template <>
struct Elem<__half> {
  static constexpr cudaDataType_t kCuda = CUDA_R_16F;
  __device__ static __half From(float x) { return __float2half_rn(x); }
  __device__ static float Dot8(const __half* x, const float* q) {
    return Dot8Pairs<__half2>(x, q);
  }
};
template <>
struct Elem<__nv_bfloat16> {
  static constexpr cudaDataType_t kCuda = CUDA_R_16BF;
  __device__ static __nv_bfloat16 From(float x) { return __float2bfloat16_rn(x); }
  __device__ static float Dot8(const __nv_bfloat16* x, const float* q) {
    return Dot8Pairs<__nv_bfloat162>(x, q);
  }
};

// The leaf level as the host tree stores it: leaf f's members (store rows)
// are pool[begin[f], begin[f] + count[f]).
struct Leaves {
  const uint32_t* begin;
  const uint32_t* count;
  const uint32_t* pool;
};

// ------------------------------------------------------------------ kernels

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

// Excluded rows of each query score -inf in the chunk [begin, begin + count).
__global__ void MaskExcludedKernel(float* scores, size_t ld, size_t begin,
                                   size_t count, const uint32_t* offsets,
                                   const uint32_t* rows, uint32_t query_base) {
  const uint32_t q = blockIdx.x;
  const uint32_t lo = offsets[query_base + q], hi = offsets[query_base + q + 1];
  for (uint32_t i = lo + threadIdx.x; i < hi; i += blockDim.x) {
    const size_t r = rows[i];
    if (r >= begin && r < begin + count) {
      scores[q * ld + (r - begin)] = -INFINITY;
    }
  }
}

__device__ __forceinline__ uint64_t Mix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// Standard Gumbel noise, a pure function of (seed, query, row): the same
// draw whatever the chunking. 24-bit uniforms: the noise is capped near 17,
// a tail of probability 3e-8.
__device__ __forceinline__ float Gumbel(uint64_t seed, uint32_t query,
                                        uint32_t row) {
  const uint64_t h =
      Mix64(seed ^ Mix64((uint64_t{query} << 32) | row));
  const float u = (static_cast<float>(h >> 40) + 0.5f) * 0x1p-24f;
  return -__logf(-__logf(u));
}

// A float's bits, reordered so that unsigned order is float order; 0 is
// kept for "no value" (no finite float maps to it).
__device__ __forceinline__ uint32_t OrderedKey(float f) {
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The inverse of OrderedKey.
__device__ __forceinline__ float KeyToFloat(uint32_t u) {
  return __uint_as_float((u & 0x80000000u) ? (u & 0x7fffffffu) : ~u);
}

enum SelectMode { kScores = 0, kGumbel = 1, kLeafCenters = 2, kHits = 3 };

struct SelectArgs {
  // kScores / kGumbel / kLeafCenters: scores[q * ld + i], i < count; the row
  // of i is row_base + i (for leaves: the leaf).
  const float* scores;
  size_t ld;
  size_t count;
  uint32_t row_base;
  const uint8_t* live;  // kScores / kGumbel
  // kScores / kGumbel, optional: per query of the launch, a key below which
  // nothing can reach the final top k (the k-th best key found so far).
  const float* min_key;
  float inv_tau;
  uint64_t seed;
  uint32_t query_base;   // global index of query 0 of the launch (noise)
  // kHits: hits[q * ld + i], i < (lens ? lens[q] : count).
  const Cand* hits;
  const uint32_t* lens;
  // Out: k hits per segment at out[q * out_ld + segment * k].
  Cand* out;
  size_t out_ld;
  int k;
  // Optional: per (query, segment) {max, sum} of exp(s * inv_tau - max),
  // at lse[q * lse_ld + lse_seg + segment].
  float2* lse;
  size_t lse_ld;
  size_t lse_seg;
};

// Keeps the best k of one segment of kSegment values of one query: a 4-pass
// radix select (8 bits per pass) for the k-th key in shared memory, then the
// keys above it and, in index order, as many keys equal to it as fit. One
// block of kThreads per (segment, query).
template <int kMode>
__global__ void __launch_bounds__(kThreads) SelectKernel(SelectArgs a) {
  const int tid = threadIdx.x;
  const uint32_t q = blockIdx.y;
  const size_t seg = blockIdx.x;
  uint32_t key[kPerThread];
  float score[kPerThread];
  uint32_t row[kPerThread];
  float lse_max = -INFINITY;

  size_t count = a.count;
  if (kMode == kHits && a.lens != nullptr) count = a.lens[q];
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const size_t idx = seg * kSegment + i * kThreads + tid;
    key[i] = 0;
    score[i] = 0;
    row[i] = kNoRow;
    if (idx >= count) continue;
    if (kMode == kHits) {
      const Cand h = a.hits[q * a.ld + idx];
      if (h.row != kNoRow) {
        key[i] = OrderedKey(h.key);
        score[i] = h.score;
        row[i] = h.row;
      }
    } else {
      const float s = a.scores[q * a.ld + idx];
      const uint32_t r = a.row_base + static_cast<uint32_t>(idx);
      if (kMode == kLeafCenters) {
        key[i] = OrderedKey(s);
        score[i] = s;
        row[i] = r;
      } else if (s != -INFINITY && a.live[r]) {
        const float k = kMode == kGumbel
                            ? s * a.inv_tau + Gumbel(a.seed, a.query_base + q, r)
                            : s;
        score[i] = s;
        row[i] = r;
        lse_max = fmaxf(lse_max, s * a.inv_tau);
        // Below the bound: eligible (log Z counts it) but never selected.
        key[i] = a.min_key != nullptr && k < a.min_key[q] ? 0 : OrderedKey(k);
      }
    }
  }

  __shared__ float red[kThreads / 32];
  __shared__ uint32_t hist[257];  // bin 256: lanes with no value
  __shared__ uint32_t warp_count[kThreads / 32];
  __shared__ uint32_t s_digit, s_need, s_gt;
  const int lane = tid & 31, warp = tid >> 5;

  if (kMode <= kGumbel && a.lse != nullptr) {
    // log-sum-exp partial of this segment: block max, then block sum.
    float m = lse_max;
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(~0u, m, o));
    if (lane == 0) red[warp] = m;
    __syncthreads();
    m = red[0];
    for (int w = 1; w < kThreads / 32; ++w) m = fmaxf(m, red[w]);
    __syncthreads();
    float sum = 0;
    if (m != -INFINITY) {
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) {
        if (row[i] != kNoRow) sum += __expf(score[i] * a.inv_tau - m);
      }
    }
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(~0u, sum, o);
    if (lane == 0) red[warp] = sum;
    __syncthreads();
    if (tid == 0) {
      float total = 0;
      for (int w = 0; w < kThreads / 32; ++w) total += red[w];
      a.lse[q * a.lse_ld + a.lse_seg + seg] = make_float2(m, total);
    }
  }

  // Count the valid values of the block.
  uint32_t valid = 0;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) valid += key[i] != 0;
  if (tid == 0) s_gt = 0;
  __syncthreads();
  atomicAdd(&s_gt, valid);
  __syncthreads();
  const uint32_t total_valid = s_gt;
  const uint32_t k = static_cast<uint32_t>(a.k);
  Cand* out = a.out + q * a.out_ld + seg * k;

  uint32_t threshold = 1;  // take every valid key (there are at most k)
  uint32_t need_eq = 0;
  if (total_valid > k) {
    uint32_t prefix = 0, mask = 0, kk = k;
    for (int shift = 24; shift >= 0; shift -= 8) {
      hist[tid] = 0;  // kThreads == 256 bins
      __syncthreads();
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) {
        // Scores share their leading bits, so most lanes of a warp hit the
        // same bin: one atomic per distinct bin per warp.
        const bool in = key[i] != 0 && (key[i] & mask) == prefix;
        const uint32_t bin = in ? (key[i] >> shift) & 255u : 256u;
        const uint32_t peers = __match_any_sync(~0u, bin);
        if (in && lane == __ffs(peers) - 1) atomicAdd(&hist[bin], __popc(peers));
      }
      __syncthreads();
      if (warp == 0) {
        // Lane l holds bins 255 - 8l .. 248 - 8l (descending order).
        uint32_t c[8], sum = 0;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          c[j] = hist[255 - lane * 8 - j];
          sum += c[j];
        }
        uint32_t incl = sum;
        for (int o = 1; o < 32; o <<= 1) {
          const uint32_t v = __shfl_up_sync(~0u, incl, o);
          if (lane >= o) incl += v;
        }
        const uint32_t excl = incl - sum;
        if (excl < kk && kk <= incl) {
          uint32_t acc = excl;
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            if (acc + c[j] >= kk) {
              s_digit = 255 - lane * 8 - j;
              s_need = kk - acc;
              break;
            }
            acc += c[j];
          }
        }
      }
      __syncthreads();
      prefix |= s_digit << shift;
      mask |= 255u << shift;
      kk = s_need;
      __syncthreads();
    }
    threshold = prefix;  // the k-th largest key
    need_eq = kk;        // how many keys equal to it are kept
  }

  // Keys above the threshold: any order.
  if (tid == 0) s_gt = 0;
  __syncthreads();
  const bool strict = total_valid > k;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    if (key[i] != 0 && (strict ? key[i] > threshold : true)) {
      const uint32_t pos = atomicAdd(&s_gt, 1u);
      out[pos] = Cand{KeyToFloat(key[i]), score[i], row[i]};
    }
  }
  __syncthreads();
  const uint32_t num_gt = s_gt;
  // Keys equal to the threshold, lowest index first (deterministic ties):
  // an ordered pass only when some of them must be left out.
  uint32_t num_eq = 0;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) num_eq += strict && key[i] == threshold;
  if (tid == 0) s_need = 0;
  __syncthreads();
  atomicAdd(&s_need, num_eq);
  __syncthreads();
  const bool ordered = strict && s_need > need_eq;
  if (strict && !ordered) {
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      if (key[i] == threshold) {
        const uint32_t pos = atomicAdd(&s_gt, 1u);
        out[pos] = Cand{KeyToFloat(key[i]), score[i], row[i]};
      }
    }
  }
  uint32_t base = 0;
  if (ordered) {
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const bool flag = key[i] == threshold;
      const uint32_t ballot = __ballot_sync(~0u, flag);
      if (lane == 0) warp_count[warp] = __popc(ballot);
      __syncthreads();
      uint32_t offset = base;
      for (int w = 0; w < warp; ++w) offset += warp_count[w];
      offset += __popc(ballot & ((1u << lane) - 1u));
      if (flag && offset < need_eq) {
        out[num_gt + offset] = Cand{KeyToFloat(key[i]), score[i], row[i]};
      }
      for (int w = 0; w < kThreads / 32; ++w) base += warp_count[w];
      __syncthreads();
    }
  }
  // Pad to k with "no hit".
  const uint32_t filled = strict ? k : num_gt;
  for (uint32_t j = filled + tid; j < k; j += kThreads) {
    out[j] = Cand{0.0f, 0.0f, kNoRow};
  }
}

__global__ void FillKernel(float* p, size_t n, float v) {
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n;
       i += size_t{gridDim.x} * blockDim.x) {
    p[i] = v;
  }
}

// bound[q] = max(bound[q], the smallest key of hits[q * ld .. + k]) when all
// k are hits: the final k-th best key is at least that.
__global__ void RaiseBoundKernel(const Cand* hits, size_t ld, int k, float* bound) {
  const uint32_t q = blockIdx.x;
  float m = INFINITY;
  bool full = true;
  for (int j = threadIdx.x; j < k; j += 32) {
    const Cand h = hits[q * ld + j];
    full = full && h.row != kNoRow;
    m = fminf(m, h.key);
  }
  for (int o = 16; o > 0; o >>= 1) m = fminf(m, __shfl_xor_sync(~0u, m, o));
  full = __all_sync(~0u, full);
  if (threadIdx.x == 0 && full) bound[q] = fmaxf(bound[q], m);
}

// log Z per query from the segments' {max, sum} partials.
__global__ void LogSumExpKernel(const float2* lse, size_t ld, size_t segs,
                                double* out) {
  const uint32_t q = blockIdx.x;
  __shared__ float s_max[kThreads];
  __shared__ double s_sum[kThreads];
  float m = -INFINITY;
  for (size_t i = threadIdx.x; i < segs; i += blockDim.x) {
    m = fmaxf(m, lse[q * ld + i].x);
  }
  s_max[threadIdx.x] = m;
  __syncthreads();
  for (int o = blockDim.x / 2; o > 0; o >>= 1) {
    if (threadIdx.x < o) s_max[threadIdx.x] = fmaxf(s_max[threadIdx.x], s_max[threadIdx.x + o]);
    __syncthreads();
  }
  m = s_max[0];
  double sum = 0;
  if (m != -INFINITY) {
    for (size_t i = threadIdx.x; i < segs; i += blockDim.x) {
      const float2 p = lse[q * ld + i];
      if (p.x != -INFINITY) sum += double{p.y} * exp(double{p.x} - m);
    }
  }
  s_sum[threadIdx.x] = sum;
  __syncthreads();
  for (int o = blockDim.x / 2; o > 0; o >>= 1) {
    if (threadIdx.x < o) s_sum[threadIdx.x] += s_sum[threadIdx.x + o];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    out[q] = m == -INFINITY ? -INFINITY : double{m} + log(s_sum[0]);
  }
}

// One block per query: scores the members of the query's selected leaves
// (leaf_hits[q * num_leaves ..], row = leaf) into out[q * cap ..], and their
// number into lens[q]. A group of `group` lanes reads one row, 8 elements
// (16 or 32 bytes) per lane per step.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    ScoreLeavesKernel(const T* vectors, int stride, const float* queries,
                      const Cand* leaf_hits, int num_leaves, Leaves leaves,
                      const uint32_t* order, int group, Cand* out, size_t cap,
                      uint32_t* lens) {
  extern __shared__ float shared[];
  float* qs = shared;                                        // stride
  uint32_t* pos = reinterpret_cast<uint32_t*>(qs + stride);  // num_leaves + 1
  const uint32_t q = order[blockIdx.x];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  for (int j = tid; j < stride; j += kThreads) qs[j] = queries[size_t{q} * stride + j];
  // Each leaf's first slot: a serial prefix in one thread (num_leaves is a
  // beam width, small next to the rows scored).
  for (int p = tid; p < num_leaves; p += kThreads) {
    const uint32_t leaf = leaf_hits[size_t{q} * num_leaves + p].row;
    pos[p + 1] = leaf == kNoRow ? 0 : leaves.count[leaf];
  }
  __syncthreads();
  if (tid == 0) {
    pos[0] = 0;
    for (int p = 0; p < num_leaves; ++p) pos[p + 1] += pos[p];
    lens[q] = pos[num_leaves];
  }
  __syncthreads();
  const int chunks = stride / 8;
  const int rows_per_step = 32 / group;
  const int sub = lane / group, part = lane % group;
  for (int p = warp; p < num_leaves; p += kThreads / 32) {
    const uint32_t leaf = leaf_hits[size_t{q} * num_leaves + p].row;
    if (leaf == kNoRow) continue;
    const uint32_t begin = leaves.begin[leaf], size = leaves.count[leaf];
    for (uint32_t r0 = 0; r0 < size; r0 += rows_per_step) {
      const uint32_t r = r0 + sub;
      float s = 0;
      uint32_t row = kNoRow;
      if (r < size) {
        row = leaves.pool[begin + r];
        const T* x = vectors + size_t{row} * stride;
        for (int c = part; c < chunks; c += group) s += Elem<T>::Dot8(x + c * 8, qs + c * 8);
      }
      for (int o = group / 2; o > 0; o >>= 1) s += __shfl_xor_sync(~0u, s, o);
      if (r < size && part == 0) {
        out[size_t{q} * cap + pos[p] + r] = Cand{s, s, row};
      }
    }
  }
}

// keys[q] = the leaf of query q's best center score among its `width`
// selected leaves, values[q] = q: sorting by it runs the queries that visit
// the same leaves side by side, so their rows are read from L2.
__global__ void BestLeafKernel(const Cand* leaf_hits, int width, uint32_t* keys,
                               uint32_t* values) {
  const uint32_t q = blockIdx.x;
  float best = -INFINITY;
  uint32_t leaf = 0;
  for (int p = threadIdx.x; p < width; p += 32) {
    const Cand h = leaf_hits[size_t{q} * width + p];
    if (h.row != kNoRow && h.key > best) {
      best = h.key;
      leaf = h.row;
    }
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float b = __shfl_xor_sync(~0u, best, o);
    const uint32_t l = __shfl_xor_sync(~0u, leaf, o);
    if (b > best || (b == best && l < leaf)) {
      best = b;
      leaf = l;
    }
  }
  if (threadIdx.x == 0) {
    keys[q] = leaf;
    values[q] = q;
  }
}

// Whether `row` is in the sorted rows[lo, hi).
__device__ bool Contains(const uint32_t* rows, uint32_t lo, uint32_t hi, uint32_t row) {
  while (lo < hi) {
    const uint32_t mid = (lo + hi) / 2;
    if (rows[mid] < row) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo < hi && rows[lo] == row;
}

// ------------------------------------------------- fused scan (top-k only)

// The fused scan's block: kFusedM queries against tiles of kFusedN targets,
// 8 warps of 32 x 32 (2 x 2 tensor-core fragments of 16 x 16 x 16).
constexpr int kFusedM = 64;
constexpr int kFusedN = 128;
constexpr int kFusedMaxStride = 256;
constexpr int kFusedPad = 8;  // elements per smem row against bank conflicts
constexpr int kFusedScoreLd = kFusedN + 4;

// Elements per smem row: the stride rounded up to the MMA depth (16), zeros
// past the stride, and the pad.
__host__ __device__ constexpr int FusedLd(int stride) {
  return (stride + 15) / 16 * 16 + kFusedPad;
}

size_t FusedSharedBytes(int stride, size_t elem) {
  return size_t{kFusedM + kFusedN} * FusedLd(stride) * elem +
         size_t{kFusedM} * kFusedScoreLd * sizeof(float) + kFusedM * sizeof(float);
}

// rows x depth elements into shared memory (row stride ld) from `src` (row
// stride `stride`), 16 bytes a thread: rows from `valid` on and elements
// from `stride` on are zeros.
template <typename T>
__device__ void LoadTile(T* dst, int ld, int depth, const T* src, int stride, int rows,
                         size_t valid) {
  const int vecs = depth / 8;
  for (int i = threadIdx.x; i < rows * vecs; i += blockDim.x) {
    const int r = i / vecs, c = i % vecs;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (r < valid && c * 8 < stride) v = reinterpret_cast<const uint4*>(src + size_t(r) * stride)[c];
    reinterpret_cast<uint4*>(dst + r * ld)[c] = v;
  }
}

// Scores queries [0, g) (T, stride apart) against rows [row_begin, row_end)
// with tensor cores, and appends every live, not excluded (row, score) whose
// score reaches bound[q] to query q's candidates: cand[q * cap + i], i from
// an atomic count[q] (entries past cap are dropped; count[q] > cap tells).
// The scores never go to global memory. Block (x, y): query tile y, target
// tiles x, x + gridDim.x, ...
template <typename T>
__global__ void __launch_bounds__(kThreads)
    FusedScanKernel(const T* vectors, int stride, const T* queries, size_t g,
                    size_t row_begin, size_t row_end, const uint8_t* live, const float* bound,
                    const uint32_t* excl_offsets, const uint32_t* excl_rows,
                    uint32_t query_base, Cand* cand, uint32_t* count, uint32_t cap) {
  using namespace nvcuda;
  extern __shared__ __align__(128) unsigned char fused_smem[];  // WMMA: 32-byte aligned tiles
  const int ld = FusedLd(stride), depth = ld - kFusedPad;
  T* qs = reinterpret_cast<T*>(fused_smem);                       // kFusedM x ld
  T* xs = qs + kFusedM * ld;                                      // kFusedN x ld
  float* ss = reinterpret_cast<float*>(xs + kFusedN * ld);        // kFusedM x kFusedScoreLd
  float* qbound = ss + kFusedM * kFusedScoreLd;                   // kFusedM
  const int tid = threadIdx.x, warp = tid >> 5;
  const size_t q0 = size_t{blockIdx.y} * kFusedM;
  LoadTile(qs, ld, depth, queries + q0 * stride, stride, kFusedM, q0 < g ? g - q0 : 0);
  for (int r = tid; r < kFusedM; r += kThreads) {
    qbound[r] = q0 + r < g ? bound[q0 + r] : INFINITY;
  }
  const int wm = warp / 4, wn = warp % 4;  // the warp's 32 x 32 of the tile
  for (size_t t0 = row_begin + size_t{blockIdx.x} * kFusedN; t0 < row_end;
       t0 += size_t{gridDim.x} * kFusedN) {
    __syncthreads();  // the last tile's epilogue is done with xs and ss
    LoadTile(xs, ld, depth, vectors + t0 * stride, stride, kFusedN, row_end - t0);
    __syncthreads();
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
    }
    for (int k = 0; k < depth; k += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], qs + (wm * 32 + i * 16) * ld + k, ld);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], xs + (wn * 32 + j * 16) * ld + k, ld);
#pragma unroll
      for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
      }
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        wmma::store_matrix_sync(ss + (wm * 32 + i * 16) * kFusedScoreLd + wn * 32 + j * 16,
                                acc[i][j], kFusedScoreLd, wmma::mem_row_major);
      }
    }
    __syncthreads();
    for (int e = tid; e < kFusedM * kFusedN; e += kThreads) {
      const int r = e / kFusedN, c = e % kFusedN;
      const size_t row = t0 + c;
      const float score = ss[r * kFusedScoreLd + c];
      if (row >= row_end || !(score >= qbound[r]) || !live[row]) continue;
      const size_t q = q0 + r;  // < g: qbound is +inf past g
      if (excl_offsets != nullptr &&
          Contains(excl_rows, excl_offsets[query_base + q], excl_offsets[query_base + q + 1],
                   static_cast<uint32_t>(row))) {
        continue;
      }
      const uint32_t pos = atomicAdd(&count[q], 1u);
      if (pos < cap) cand[q * cap + pos] = Cand{score, score, static_cast<uint32_t>(row)};
    }
  }
}

// Per query: lens[q] = min(count[q], cap), and overflow[q] = 1 once a
// count went past cap (its candidates are incomplete).
__global__ void ClipCountsKernel(const uint32_t* count, uint32_t cap, size_t g, uint32_t* lens,
                                 uint8_t* overflow) {
  for (size_t q = blockIdx.x * size_t{blockDim.x} + threadIdx.x; q < g;
       q += size_t{gridDim.x} * blockDim.x) {
    lens[q] = min(count[q], cap);
    if (count[q] > cap) overflow[q] = 1;
  }
}

// The best k (best[q * k ..]) back to the front of each query's candidates,
// and count[q] = how many of them are hits.
__global__ void KeepBestKernel(const Cand* best, int k, Cand* cand, uint32_t cap,
                               uint32_t* count) {
  const size_t q = blockIdx.x;
  uint32_t valid = 0;
  for (int j = threadIdx.x; j < k; j += blockDim.x) {
    const Cand c = best[q * k + j];
    cand[q * cap + j] = c;
    valid += c.row != kNoRow;
  }
  for (int o = 16; o > 0; o >>= 1) valid += __shfl_xor_sync(~0u, valid, o);
  if (threadIdx.x == 0) count[q] = valid;
}

// ------------------------------------------------------ proposal sampling

// The proposal's random numbers, as the CPU tree's (Searcher::DrawKey in
// core/tree/searcher.h): draw t of query i uses KeyUniform(DrawKey(seed, i,
// t), which); 0 picks its leaf.
__device__ __forceinline__ uint64_t DrawKey(uint64_t seed, uint32_t query, uint64_t t) {
  return Mix64(Mix64(seed ^ Mix64(query + 0x632be59bd9b4e019ULL)) + 4 * t);
}
__device__ __forceinline__ double KeyUniform(uint64_t key, uint64_t which) {
  return (static_cast<double>(Mix64(key + which) >> 11) + 0.5) * 0x1p-53;
}

// Block sum / max of one value per thread (every thread gets the result).
template <bool kMax>
__device__ float BlockReduce(float v, float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int o = 16; o > 0; o >>= 1) {
    const float w = __shfl_xor_sync(~0u, v, o);
    v = kMax ? fmaxf(v, w) : v + w;
  }
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  v = red[0];
  for (int w = 1; w < kThreads / 32; ++w) v = kMax ? fmaxf(v, red[w]) : v + red[w];
  return v;
}

// One block per query q of a group: every leaf's log weight
//   lw_f = <q, c_f>/tau + log n_f + |q|^2 spread_f / (2 dim tau^2),
// n_f counting the eligible targets (the (leaf, excluded count) pairs of
// query query_base + q), in place of its center score in lw[q * ld ..]; the
// prefix sums of exp(lw - top) in double into cdf[q * ld ..]; top and the
// total into top[q], total[q].
__global__ void __launch_bounds__(kThreads)
    LeafWeightsKernel(float* lw, double* cdf, size_t ld, size_t num_leaves,
                      const uint32_t* leaf_count, const float* spread, const float* queries,
                      int stride, int dim, float inv_tau, const uint32_t* pair_offsets,
                      const uint32_t* pair_leaf, const uint32_t* pair_count,
                      uint32_t query_base, float* top, double* total) {
  using Scan = cub::BlockScan<double, kThreads>;
  __shared__ typename Scan::TempStorage scan_temp;
  __shared__ float red[kThreads / 32];
  __shared__ double s_carry;
  const uint32_t q = blockIdx.x;
  const int tid = threadIdx.x;
  float sq = 0;
  for (int j = tid; j < stride; j += kThreads) {
    const float v = queries[size_t{q} * stride + j];
    sq += v * v;
  }
  sq = BlockReduce<false>(sq, red);
  const float scale = sq / (2.0f * dim) * inv_tau * inv_tau;
  float* row = lw + q * ld;
  for (size_t f = tid; f < num_leaves; f += kThreads) {
    const float n = static_cast<float>(leaf_count[f]);
    row[f] = row[f] * inv_tau + logf(n) + spread[f] * scale;
  }
  __syncthreads();
  if (pair_offsets != nullptr) {
    const uint32_t qi = query_base + q;
    for (uint32_t i = pair_offsets[qi] + tid; i < pair_offsets[qi + 1]; i += kThreads) {
      const uint32_t f = pair_leaf[i], k = pair_count[i];
      const uint32_t n = leaf_count[f];
      row[f] = k >= n ? -INFINITY
                      : row[f] - logf(static_cast<float>(n)) + logf(static_cast<float>(n - k));
    }
    __syncthreads();
  }
  float m = -INFINITY;
  for (size_t f = tid; f < num_leaves; f += kThreads) m = fmaxf(m, row[f]);
  m = BlockReduce<true>(m, red);
  if (!isfinite(m)) {  // overflow (+inf or NaN), or no eligible target
    if (tid == 0) {
      top[q] = m;
      total[q] = 0;
    }
    return;
  }
  double carry = 0;
  for (size_t base = 0; base < num_leaves; base += kThreads) {
    const size_t f = base + tid;
    const double w = f < num_leaves ? exp(static_cast<double>(row[f] - m)) : 0.0;
    double incl;
    Scan(scan_temp).InclusiveSum(w, incl);
    if (f < num_leaves) cdf[q * ld + f] = carry + incl;
    if (tid == kThreads - 1) s_carry = carry + incl;
    __syncthreads();
    carry = s_carry;
    __syncthreads();
  }
  if (tid == 0) {
    top[q] = m;
    total[q] = carry;
  }
}

// One block per query q of a group: its draws' leaves, each the first leaf
// whose prefix sum exceeds u * total (so never a leaf of weight 0), with
// log P(leaf) and the draw's key. The draws of q are draw_offsets[q] ..
// draw_offsets[q + 1]; an overflowed query's draws get leaf kNoRow and a
// NaN log P.
__global__ void DrawLeafKernel(const float* lw, const double* cdf, size_t ld,
                               size_t num_leaves, const float* top, const double* total,
                               const uint32_t* draw_offsets, const uint64_t* first_draw,
                               const uint32_t* query_ids, uint64_t seed, uint32_t query_base,
                               uint32_t* draw_leaf, double* draw_log_p, uint64_t* draw_key) {
  const uint32_t q = blockIdx.x, qi = query_base + q;
  const uint32_t gid = query_ids != nullptr ? query_ids[qi] : qi;
  const double sum = total[q];
  const double log_total = static_cast<double>(top[q]) + log(sum);
  const bool ok = isfinite(log_total) && sum > 0;
  const double* c = cdf + q * ld;
  const uint32_t begin = draw_offsets[q], count = draw_offsets[q + 1] - begin;
  for (uint32_t t = threadIdx.x; t < count; t += blockDim.x) {
    const uint32_t d = begin + t;
    const uint64_t key = DrawKey(seed, gid, first_draw[qi] + t);
    draw_key[d] = key;
    if (!ok) {
      draw_leaf[d] = kNoRow;
      draw_log_p[d] = NAN;
      continue;
    }
    const double u = KeyUniform(key, 0) * sum;
    size_t lo = 0, hi = num_leaves;  // first f with c[f] > u
    while (lo < hi) {
      const size_t mid = (lo + hi) / 2;
      if (c[mid] > u) {
        hi = mid;
      } else {
        lo = mid + 1;
      }
    }
    // u rounded up to the total: the last leaf of positive weight.
    size_t f = lo < num_leaves ? lo : num_leaves - 1;
    while (f > 0 && c[f] == c[f - 1]) --f;
    draw_leaf[d] = static_cast<uint32_t>(f);
    draw_log_p[d] = static_cast<double>(lw[q * ld + f]) - log_total;
  }
}

// One warp per draw (num_draws of them, the draws of query q of the group
// at draw_offsets[q] ..): the drawn leaf's eligible members scored, a lane
// per member; one of them by Gumbel-max over s/tau + noise (an exact draw
// from the leaf's softmax), and the leaf's log Z on the way. out[d]: key
// log q = log P(leaf) + s/tau - log Z_leaf, NaN (row kNoRow) for an
// overflow, -inf (row kNoRow) when the leaf had no eligible member.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    DrawTargetKernel(const T* vectors, int stride, const float* queries, size_t g,
                     const uint32_t* draw_offsets, size_t num_draws, Leaves leaves,
                     const uint32_t* excl_offsets,
                     const uint32_t* excl_rows, uint32_t query_base,
                     const uint32_t* draw_leaf, const double* draw_log_p,
                     const uint64_t* draw_key, float inv_tau, Cand* out) {
  const size_t d = (blockIdx.x * size_t{blockDim.x} + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (d >= num_draws) return;  // the whole warp
  const uint32_t leaf = draw_leaf[d];
  if (leaf == kNoRow) {
    if (lane == 0) out[d] = Cand{NAN, 0.0f, kNoRow};
    return;
  }
  // The draw's query: the last q with draw_offsets[q] <= d.
  size_t lo = 0, hi = g;
  while (hi - lo > 1) {
    const size_t mid = (lo + hi) / 2;
    if (draw_offsets[mid] <= d) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  const size_t q = lo;
  const float* qv = queries + q * stride;
  const uint32_t ex_lo = excl_offsets != nullptr ? excl_offsets[query_base + q] : 0;
  const uint32_t ex_hi = excl_offsets != nullptr ? excl_offsets[query_base + q + 1] : 0;
  const uint64_t key = draw_key[d];
  const uint32_t begin = leaves.begin[leaf], size = leaves.count[leaf];
  // Online log-sum-exp (m, sum) and the best perturbed key, per lane.
  float m = -INFINITY, sum = 0, best = -INFINITY, best_score = 0;
  uint32_t best_row = kNoRow, best_r = 0;
  for (uint32_t r = lane; r < size; r += 32) {
    const uint32_t row = leaves.pool[begin + r];
    if (ex_lo < ex_hi && Contains(excl_rows, ex_lo, ex_hi, row)) continue;
    const T* x = vectors + size_t{row} * stride;
    float s = 0;
    for (int c = 0; c < stride / 8; ++c) s += Elem<T>::Dot8(x + c * 8, qv + c * 8);
    const float l = s * inv_tau;
    if (l > m) {
      sum = sum * expf(m - l) + 1.0f;
      m = l;
    } else {
      sum += expf(l - m);
    }
    const double u = KeyUniform(key ^ Mix64(r + 0x5851f42d4c957f2dULL), 1);
    const float k = l + static_cast<float>(-log(-log(u)));
    if (k > best) {
      best = k;
      best_score = s;
      best_row = row;
      best_r = r;
    }
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(~0u, m, o), sum2 = __shfl_xor_sync(~0u, sum, o);
    const float mm = fmaxf(m, m2);
    sum = (m == -INFINITY ? 0.0f : sum * expf(m - mm)) +
          (m2 == -INFINITY ? 0.0f : sum2 * expf(m2 - mm));
    m = mm;
    const float b2 = __shfl_xor_sync(~0u, best, o), s2 = __shfl_xor_sync(~0u, best_score, o);
    const uint32_t row2 = __shfl_xor_sync(~0u, best_row, o), r2 = __shfl_xor_sync(~0u, best_r, o);
    if (b2 > best || (b2 == best && row2 != kNoRow && (best_row == kNoRow || r2 < best_r))) {
      best = b2;
      best_score = s2;
      best_row = row2;
      best_r = r2;
    }
  }
  if (lane != 0) return;
  if (best_row == kNoRow) {
    out[d] = Cand{-INFINITY, 0.0f, kNoRow};
    return;
  }
  const double log_z = static_cast<double>(m) + log(static_cast<double>(sum));
  const double log_q = draw_log_p[d] + static_cast<double>(best_score) * inv_tau - log_z;
  out[d] = isfinite(log_q) ? Cand{static_cast<float>(log_q), best_score, best_row}
                           : Cand{NAN, 0.0f, kNoRow};
}

// The ids of `count` candidates (0 for none).
__global__ void GatherIdsKernel(const Cand* c, size_t count, const uint64_t* ids,
                                uint64_t* out) {
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < count;
       i += size_t{gridDim.x} * blockDim.x) {
    out[i] = c[i].row == kNoRow ? 0 : ids[c[i].row];
  }
}

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

int GridFor(size_t work) {
  return static_cast<int>(std::min<size_t>((work + kThreads - 1) / kThreads, 65535));
}

size_t CeilDiv(size_t a, size_t b) { return (a + b - 1) / b; }

// Per-query row lists (query q's at rows[offsets[q], offsets[q + 1])) with
// each list sorted and without repeats, for the kernels' binary searches.
void SortedPerQuery(const std::vector<uint32_t>& offsets, const std::vector<uint32_t>& rows,
                    std::vector<uint32_t>* out_offsets, std::vector<uint32_t>* out_rows) {
  out_offsets->assign(1, 0);
  out_rows->clear();
  for (size_t q = 0; q + 1 < offsets.size(); ++q) {
    const size_t first = out_rows->size();
    out_rows->insert(out_rows->end(), rows.begin() + offsets[q], rows.begin() + offsets[q + 1]);
    std::sort(out_rows->begin() + first, out_rows->end());
    out_rows->erase(std::unique(out_rows->begin() + first, out_rows->end()), out_rows->end());
    out_offsets->push_back(static_cast<uint32_t>(out_rows->size()));
  }
}

// --------------------------------------------------------------- the mirror

template <typename T>
class Mirror final : public DeviceMirror {
 public:
  Mirror(int dim, int device) : dim_(dim), stride_((dim + 7) / 8 * 8), device_(device) {}

  ~Mirror() override {
    DeviceScope scope(device_);
    if (handle_ != nullptr) Blas().destroy(handle_);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
    cudaFreeHost(staging_);
  }

  absl::Status Init() {
    RETURN_IF_ERROR(LoadCublas().status());
    DeviceScope scope(device_);
    CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    CUBLAS_RETURN_IF_ERROR(Blas().create(&handle_));
    CUBLAS_RETURN_IF_ERROR(Blas().set_stream(handle_, stream_));
    CUBLAS_RETURN_IF_ERROR(Blas().set_math_mode(handle_, CUBLAS_DEFAULT_MATH));
    CUDA_RETURN_IF_ERROR(cudaHostAlloc(&staging_, kStagingBytes, cudaHostAllocDefault));
    // Debugging knob: profile every call and print its phases to stderr.
    trace_ = std::getenv("NEGMINE_CUDA_PROFILE") != nullptr;
    const char* fused = std::getenv("NEGMINE_CUDA_FUSED_SCAN");
    fused_scan_ = fused != nullptr && std::strcmp(fused, "1") == 0;
    CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&sm_count_, cudaDevAttrMultiProcessorCount, device_));
    profiling_ = trace_;
    return absl::OkStatus();
  }

  absl::Status Reserve(size_t rows) override {
    if (rows <= capacity_) return absl::OkStatus();
    DeviceScope scope(device_);
    const size_t cap = std::max(rows, capacity_ + capacity_ / 2);
    // Grown one by one; a failure leaves the old capacity usable (a larger
    // buffer beside it is harmless).
    RETURN_IF_ERROR(live_.Grow(cap, capacity_, stream_));
    RETURN_IF_ERROR(ids_.Grow(cap * sizeof(uint64_t), capacity_ * sizeof(uint64_t), stream_));
    RETURN_IF_ERROR(vectors_.Grow(cap * stride_ * sizeof(T),
                                  capacity_ * stride_ * sizeof(T), stream_));
    capacity_ = cap;
    return absl::OkStatus();
  }

  absl::Status SetRows(const PointSource& points, absl::Span<const uint32_t> rows,
                       const uint8_t* live, const uint64_t* ids) override {
    DeviceScope scope(device_);
    return ScatterFloats(points, rows.data(), 0, rows.size(), vectors_.as<T>(), live, ids);
  }

  absl::Status SetAll(const PointSource& points, size_t num_rows, const uint8_t* live,
                      const uint64_t* ids) override {
    RETURN_IF_ERROR(Reserve(num_rows));
    DeviceScope scope(device_);
    RETURN_IF_ERROR(ScatterFloats(points, nullptr, 0, num_rows, vectors_.as<T>(), live, ids));
    num_rows_ = num_rows;
    return absl::OkStatus();
  }

  void SetNumRows(size_t num_rows) override { num_rows_ = num_rows; }

  absl::Status SetLeaves(absl::Span<const float> centers, absl::Span<const float> spreads,
                         absl::Span<const uint32_t> begin, absl::Span<const uint32_t> count,
                         absl::Span<const uint32_t> pool) override {
    DeviceScope scope(device_);
    const size_t num_leaves = begin.size();
    const bool same_centers = centers.empty() && num_leaves > 0;
    if (spreads.size() != num_leaves || count.size() != num_leaves ||
        (same_centers ? !has_leaves_ || num_leaves != num_leaves_
                      : centers.size() != num_leaves * dim_)) {
      return absl::InvalidArgumentError("SetLeaves: arrays of inconsistent lengths");
    }
    for (size_t f = 0; f < num_leaves; ++f) {
      if (size_t{begin[f]} + count[f] > pool.size()) {
        return absl::InvalidArgumentError("SetLeaves: a leaf beyond the pool");
      }
    }
    // Any failure below leaves the device's leaf level half written.
    has_leaves_ = false;
    if (!same_centers) {
      // Centers go through the row scatter (float -> T, padded).
      RETURN_IF_ERROR(
          leaf_centers_.Ensure(std::max<size_t>(num_leaves, 1) * stride_ * sizeof(T)));
      const PointSource src{.data = centers.data(), .dim = dim_};
      RETURN_IF_ERROR(ScatterFloats(src, nullptr, 0, num_leaves, leaf_centers_.as<T>(),
                                    nullptr, nullptr));
    }
    RETURN_IF_ERROR(Upload(leaf_spreads_, spreads));
    RETURN_IF_ERROR(Upload(leaf_begin_, begin));
    RETURN_IF_ERROR(Upload(leaf_count_, count));
    // The pool by the runs that changed since the last upload. Until this
    // succeeds the shadow is empty, so that after a failure the next call
    // uploads the whole pool.
    std::vector<uint32_t> shadow;
    shadow.swap(pool_shadow_);
    RETURN_IF_ERROR(leaf_pool_.Grow(std::max<size_t>(pool.size(), 1) * sizeof(uint32_t),
                                    shadow.size() * sizeof(uint32_t), stream_));
    const std::vector<std::pair<size_t, size_t>> runs =
        ChangedRuns<uint32_t>(shadow, pool, kPoolBlock);
    RETURN_IF_ERROR(CopyRunsToDevice(leaf_pool_.as<uint32_t>(), pool.data(), runs));
    shadow.assign(pool.begin(), pool.end());
    pool_shadow_.swap(shadow);
    leaf_begin_host_.assign(begin.begin(), begin.end());
    leaf_count_host_.assign(count.begin(), count.end());
    leaf_of_row_.clear();  // rebuilt when a Propose with exclusions needs it
    num_leaves_ = num_leaves;
    max_leaf_ = count.empty() ? 0 : *std::max_element(count.begin(), count.end());
    last_pool_upload_ = 0;
    for (const auto& [b, e] : runs) last_pool_upload_ += e - b;
    has_leaves_ = true;
    return absl::OkStatus();
  }
  bool has_leaves() const override { return has_leaves_; }
  size_t LastPoolUpload() const override { return last_pool_upload_; }

  absl::Status Scan(absl::Span<const float> queries, size_t n, const ScanParams& p,
                    std::vector<DeviceHit>* hits, std::vector<double>* log_z) override {
    if constexpr (!std::is_same_v<T, float>) {
      if (fused_scan_ && !p.gumbel && !p.want_log_z && n >= kFusedM &&
          stride_ <= kFusedMaxStride && num_rows_ > 0 && p.k >= 1 && p.k <= kMaxK) {
        return ScanFused(queries, n, p, hits);
      }
    }
    return ScanUnfused(queries, n, p, hits, log_z);
  }

  absl::Status ScanUnfused(absl::Span<const float> queries, size_t n, const ScanParams& p,
                           std::vector<DeviceHit>* hits, std::vector<double>* log_z) {
    DeviceScope scope(device_);
    hits->resize(n * std::max(p.k, 0));
    if (log_z != nullptr) log_z->assign(n, -std::numeric_limits<double>::infinity());
    if (num_rows_ == 0 || n == 0) {
      std::fill(hits->begin(), hits->end(), DeviceHit{0, 0, kNoRow, 0});
      return absl::OkStatus();
    }
    const int k = p.k;
    if (k < 1 || k > kMaxK) {
      return absl::InvalidArgumentError(absl::StrCat("device k = ", k, " not in [1, ", kMaxK, "]"));
    }
    StartProfile();
    RETURN_IF_ERROR(PrepareQueries(queries, n));
    Mark("upload queries");
    const bool masked = !p.exclude_offsets.empty();
    if (masked) {
      RETURN_IF_ERROR(Upload(excl_offsets_, p.exclude_offsets));
      RETURN_IF_ERROR(Upload(excl_rows_, p.exclude_rows));
    }
    const size_t group = std::min<size_t>(n, kMaxQueryGroup);
    // Rows per GEMM: the score block within budget, whole segments.
    size_t chunk = std::max<size_t>(kScoreBudget / group, kSegment);
    chunk = std::min(CeilDiv(num_rows_, kSegment) * kSegment, chunk / kSegment * kSegment);
    const size_t chunk_segs = chunk / kSegment;
    const size_t total_segs = CeilDiv(num_rows_, kSegment);
    // Each chunk's best k go to a slot of `accum`; when the slots are full
    // they are reduced into slot 0.
    constexpr size_t kSlots = 32;
    RETURN_IF_ERROR(scores_.Ensure(group * chunk * sizeof(float)));
    RETURN_IF_ERROR(chunk_hits_.Ensure(group * chunk_segs * k * sizeof(Cand)));
    RETURN_IF_ERROR(accum_.Ensure(group * kSlots * k * sizeof(Cand)));
    RETURN_IF_ERROR(final_.Ensure(group * k * sizeof(Cand)));
    RETURN_IF_ERROR(bound_.Ensure(group * sizeof(float)));
    if (p.want_log_z) {
      RETURN_IF_ERROR(lse_.Ensure(group * total_segs * sizeof(float2)));
      RETURN_IF_ERROR(log_z_.Ensure(group * sizeof(double)));
    }
    std::vector<double> host_z(group);
    for (size_t q0 = 0; q0 < n; q0 += group) {
      const size_t g = std::min(group, n - q0);
      size_t slot = 0;
      FillKernel<<<1, kThreads, 0, stream_>>>(bound_.as<float>(), g, -INFINITY);
      for (size_t begin = 0; begin < num_rows_; begin += chunk) {
        const size_t count = std::min(chunk, num_rows_ - begin);
        const float alpha = 1.0f, beta = 0.0f;
        Mark("select");
        CUBLAS_RETURN_IF_ERROR(Blas().gemm_ex(
            handle_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(count),
            static_cast<int>(g), stride_, &alpha,
            vectors_.as<T>() + begin * stride_, Elem<T>::kCuda, stride_,
            qt_.as<T>() + q0 * stride_, Elem<T>::kCuda, stride_, &beta,
            scores_.as<float>(), CUDA_R_32F, static_cast<int>(count),
            CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
        Mark("gemm");
        if (masked) {
          MaskExcludedKernel<<<g, 128, 0, stream_>>>(
              scores_.as<float>(), count, begin, count, excl_offsets_.as<uint32_t>(),
              excl_rows_.as<uint32_t>(), static_cast<uint32_t>(q0));
        }
        SelectArgs a{};
        a.scores = scores_.as<float>();
        a.ld = count;
        a.count = count;
        a.row_base = static_cast<uint32_t>(begin);
        a.live = live_.as<uint8_t>();
        a.min_key = bound_.as<float>();
        a.inv_tau = p.inv_tau;
        a.seed = p.seed;
        a.query_base = static_cast<uint32_t>(q0);
        a.out = chunk_hits_.as<Cand>();
        a.out_ld = chunk_segs * k;
        a.k = k;
        if (p.want_log_z) {
          a.lse = lse_.as<float2>();
          a.lse_ld = total_segs;
          a.lse_seg = begin / kSegment;
        }
        const dim3 grid(static_cast<unsigned>(CeilDiv(count, kSegment)), static_cast<unsigned>(g));
        if (p.gumbel) {
          SelectKernel<kGumbel><<<grid, kThreads, 0, stream_>>>(a);
        } else {
          SelectKernel<kScores><<<grid, kThreads, 0, stream_>>>(a);
        }
        CUDA_RETURN_IF_ERROR(cudaGetLastError());
        if (slot == kSlots) {
          RETURN_IF_ERROR(Reduce(accum_.as<Cand>(), kSlots * k, kSlots * k, nullptr, g,
                                 k, accum_.as<Cand>(), kSlots * k));
          slot = 1;
        }
        RETURN_IF_ERROR(Reduce(chunk_hits_.as<Cand>(), chunk_segs * k,
                               CeilDiv(count, kSegment) * k, nullptr, g, k,
                               accum_.as<Cand>() + slot * k, kSlots * k));
        // Later chunks skip what cannot beat this chunk's k-th best.
        RaiseBoundKernel<<<static_cast<unsigned>(g), 32, 0, stream_>>>(
            accum_.as<Cand>() + slot * k, kSlots * k, k, bound_.as<float>());
        ++slot;
      }
      RETURN_IF_ERROR(Reduce(accum_.as<Cand>(), kSlots * k, slot * k, nullptr, g, k,
                             final_.as<Cand>(), k));
      Mark("select");
      RETURN_IF_ERROR(Download(g, k, q0, hits));
      if (p.want_log_z) {
        LogSumExpKernel<<<g, kThreads, 0, stream_>>>(lse_.as<float2>(), total_segs, total_segs,
                                                     log_z_.as<double>());
        CUDA_RETURN_IF_ERROR(cudaGetLastError());
        RETURN_IF_ERROR(CopyToHost(host_z.data(), log_z_.as<void>(), g * sizeof(double)));
        for (size_t i = 0; i < g; ++i) (*log_z)[q0 + i] = host_z[i];
      }
      Mark("download");
    }
    last_visits_ = static_cast<double>(num_rows_);
    Trace("scan", n);
    return absl::OkStatus();
  }

  // Top-k by the fused kernel, per group of queries: rows in chunks that
  // grow as the per-query bound (the k-th best so far) tightens; after each
  // chunk the candidates are cut back to the best k. A query whose
  // candidates overflowed is scanned again by ScanUnfused.
  absl::Status ScanFused(absl::Span<const float> queries, size_t n, const ScanParams& p,
                         std::vector<DeviceHit>* hits) {
    DeviceScope scope(device_);
    const int k = p.k;
    hits->resize(n * k);
    StartProfile();
    RETURN_IF_ERROR(PrepareQueries(queries, n));
    // Exclusions, sorted per query (the kernel searches them).
    const bool masked = !p.exclude_offsets.empty() && !p.exclude_rows.empty();
    if (masked) {
      std::vector<uint32_t> offsets, rows;
      SortedPerQuery(p.exclude_offsets, p.exclude_rows, &offsets, &rows);
      RETURN_IF_ERROR(Upload(excl_offsets_, offsets));
      RETURN_IF_ERROR(Upload(excl_rows_, rows));
    }
    Mark("upload queries");
    const uint32_t cap = static_cast<uint32_t>(std::max<size_t>(8192, 4 * size_t(k)));
    const size_t group = std::min<size_t>(n, 4096);
    const size_t smem = FusedSharedBytes(stride_, sizeof(T));
    CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(
        FusedScanKernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    RETURN_IF_ERROR(cand_.Ensure(group * cap * sizeof(Cand)));
    RETURN_IF_ERROR(final_.Ensure(group * k * sizeof(Cand)));
    RETURN_IF_ERROR(bound_.Ensure(group * sizeof(float)));
    RETURN_IF_ERROR(fused_count_.Ensure(group * sizeof(uint32_t)));
    RETURN_IF_ERROR(lens_.Ensure(group * sizeof(uint32_t)));
    RETURN_IF_ERROR(overflow_.Ensure(group));
    // Rows per chunk grow by `growth` (expected candidates per query in a
    // chunk: about k x chunk / rows before it, so cap / 2).
    const size_t growth = std::max<size_t>(2, cap / (2 * size_t(k)));
    std::vector<uint8_t> host_overflow(group);
    std::vector<uint32_t> again;
    for (size_t q0 = 0; q0 < n; q0 += group) {
      const size_t g = std::min(group, n - q0);
      FillKernel<<<1, kThreads, 0, stream_>>>(bound_.as<float>(), g, -INFINITY);
      CUDA_RETURN_IF_ERROR(cudaMemsetAsync(fused_count_.as<void>(), 0, g * sizeof(uint32_t), stream_));
      CUDA_RETURN_IF_ERROR(cudaMemsetAsync(overflow_.as<void>(), 0, g, stream_));
      const unsigned tiles_y = static_cast<unsigned>(CeilDiv(g, kFusedM));
      size_t chunk = cap;  // the first chunk: every row may be a candidate
      for (size_t begin = 0; begin < num_rows_; begin += chunk, chunk *= growth) {
        const size_t end = std::min(num_rows_, begin + chunk);
        const size_t tiles = CeilDiv(end - begin, kFusedN);
        const unsigned tiles_x = static_cast<unsigned>(
            std::clamp<size_t>(CeilDiv(size_t{8} * sm_count_, tiles_y), 1, tiles));
        Mark("select");
        FusedScanKernel<T><<<dim3(tiles_x, tiles_y), kThreads, smem, stream_>>>(
            vectors_.as<T>(), stride_, qt_.as<T>() + q0 * stride_, g, begin, end,
            live_.as<uint8_t>(), bound_.as<float>(), masked ? excl_offsets_.as<uint32_t>() : nullptr,
            excl_rows_.as<uint32_t>(), static_cast<uint32_t>(q0), cand_.as<Cand>(),
            fused_count_.as<uint32_t>(), cap);
        CUDA_RETURN_IF_ERROR(cudaGetLastError());
        Mark("gemm");
        ClipCountsKernel<<<GridFor(g), kThreads, 0, stream_>>>(
            fused_count_.as<uint32_t>(), cap, g, lens_.as<uint32_t>(), overflow_.as<uint8_t>());
        RETURN_IF_ERROR(Reduce(cand_.as<Cand>(), cap, cap, lens_.as<uint32_t>(), g, k,
                               final_.as<Cand>(), k));
        KeepBestKernel<<<static_cast<unsigned>(g), 32, 0, stream_>>>(
            final_.as<Cand>(), k, cand_.as<Cand>(), cap, fused_count_.as<uint32_t>());
        RaiseBoundKernel<<<static_cast<unsigned>(g), 32, 0, stream_>>>(final_.as<Cand>(), k, k,
                                                                      bound_.as<float>());
        CUDA_RETURN_IF_ERROR(cudaGetLastError());
      }
      Mark("select");
      RETURN_IF_ERROR(Download(g, k, q0, hits));
      RETURN_IF_ERROR(CopyToHost(host_overflow.data(), overflow_.as<void>(), g));
      for (size_t i = 0; i < g; ++i) {
        if (host_overflow[i]) again.push_back(static_cast<uint32_t>(q0 + i));
      }
      Mark("download");
    }
    if (!again.empty()) {
      // The overflowed queries, by the unfused scan (with their exclusions).
      ScanParams sub = p;
      std::vector<float> qs;
      sub.exclude_offsets.assign(masked ? 1 : 0, 0);
      sub.exclude_rows.clear();
      for (uint32_t q : again) {
        qs.insert(qs.end(), queries.begin() + size_t{q} * dim_, queries.begin() + size_t{q + 1} * dim_);
        if (masked) {
          sub.exclude_rows.insert(sub.exclude_rows.end(),
                                  p.exclude_rows.begin() + p.exclude_offsets[q],
                                  p.exclude_rows.begin() + p.exclude_offsets[q + 1]);
          sub.exclude_offsets.push_back(static_cast<uint32_t>(sub.exclude_rows.size()));
        }
      }
      std::vector<DeviceHit> redo;
      std::vector<std::pair<std::string, double>> phases = std::move(phases_);
      RETURN_IF_ERROR(ScanUnfused(qs, again.size(), sub, &redo, nullptr));
      for (auto& [name, seconds] : phases_) phases.emplace_back("redo " + name, seconds);
      phases_ = std::move(phases);
      for (size_t j = 0; j < again.size(); ++j) {
        std::copy_n(redo.begin() + j * k, k, hits->begin() + size_t{again[j]} * k);
      }
    }
    last_fused_redo_ = again.size();
    last_visits_ = static_cast<double>(num_rows_);
    Trace("fused scan", n);
    return absl::OkStatus();
  }

  absl::Status Beam(absl::Span<const float> queries, size_t n, int leaves, int k,
                    std::vector<DeviceHit>* hits) override {
    DeviceScope scope(device_);
    hits->resize(n * std::max(k, 0));
    if (!has_leaves_) {
      return absl::FailedPreconditionError("the device holds no tree leaves yet");
    }
    if (num_leaves_ == 0 || n == 0) {
      std::fill(hits->begin(), hits->end(), DeviceHit{0, 0, kNoRow, 0});
      return absl::OkStatus();
    }
    if (k < 1 || k > kMaxK) {
      return absl::InvalidArgumentError(absl::StrCat("device k = ", k, " not in [1, ", kMaxK, "]"));
    }
    const int width = static_cast<int>(std::min<size_t>(std::clamp(leaves, 1, kMaxK), num_leaves_));
    StartProfile();
    RETURN_IF_ERROR(PrepareQueries(queries, n));
    Mark("upload queries");

    const size_t cap = std::max<size_t>(size_t(width) * max_leaf_, 1);
    const size_t group = std::clamp<size_t>(kBeamBudget / cap, 1, std::min<size_t>(n, kMaxQueryGroup));
    const size_t leaf_segs = CeilDiv(num_leaves_, kSegment);
    RETURN_IF_ERROR(scores_.Ensure(group * num_leaves_ * sizeof(float)));
    RETURN_IF_ERROR(chunk_hits_.Ensure(group * leaf_segs * width * sizeof(Cand)));
    RETURN_IF_ERROR(leaf_sel_.Ensure(group * width * sizeof(Cand)));
    RETURN_IF_ERROR(cand_.Ensure(group * cap * sizeof(Cand)));
    RETURN_IF_ERROR(lens_.Ensure(group * sizeof(uint32_t)));
    RETURN_IF_ERROR(order_.Ensure(4 * group * sizeof(uint32_t)));
    RETURN_IF_ERROR(final_.Ensure(group * k * sizeof(Cand)));
    const size_t shared_bytes = stride_ * sizeof(float) + (width + 1) * sizeof(uint32_t);
    if (shared_bytes > 48 * 1024) {
      CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(ScoreLeavesKernel<T>,
                                                cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                static_cast<int>(shared_bytes)));
    }
    int lanes = 1;
    while (lanes < 32 && lanes < stride_ / 8) lanes *= 2;
    std::vector<uint32_t> host_lens(group);
    double visits = 0;
    for (size_t q0 = 0; q0 < n; q0 += group) {
      const size_t g = std::min(group, n - q0);
      RETURN_IF_ERROR(ScoreLeafCenters(q0, g));
      Mark("route gemm");
      SelectArgs a{};
      a.scores = scores_.as<float>();
      a.ld = num_leaves_;
      a.count = num_leaves_;
      a.out = chunk_hits_.as<Cand>();
      a.out_ld = leaf_segs * width;
      a.k = width;
      SelectKernel<kLeafCenters><<<dim3(static_cast<unsigned>(leaf_segs), static_cast<unsigned>(g)),
                                  kThreads, 0, stream_>>>(a);
      CUDA_RETURN_IF_ERROR(cudaGetLastError());
      RETURN_IF_ERROR(Reduce(chunk_hits_.as<Cand>(), leaf_segs * width, leaf_segs * width,
                             nullptr, g, width, leaf_sel_.as<Cand>(), width));
      Mark("route select");
      uint32_t* keys = order_.as<uint32_t>();
      uint32_t* values = keys + g;
      uint32_t* sorted_keys = values + g;
      uint32_t* sorted_values = sorted_keys + g;
      BestLeafKernel<<<static_cast<unsigned>(g), 32, 0, stream_>>>(leaf_sel_.as<Cand>(),
                                                                  width, keys, values);
      size_t temp_bytes = 0;
      int bits = 1;
      while (bits < 32 && (size_t{1} << bits) < num_leaves_) ++bits;
      cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, keys, sorted_keys, values,
                                      sorted_values, static_cast<int>(g), 0, bits, stream_);
      RETURN_IF_ERROR(sort_temp_.Ensure(std::max<size_t>(temp_bytes, 1)));
      CUDA_RETURN_IF_ERROR(cub::DeviceRadixSort::SortPairs(
          sort_temp_.as<void>(), temp_bytes, keys, sorted_keys, values, sorted_values,
          static_cast<int>(g), 0, bits, stream_));
      Mark("order queries");
      ScoreLeavesKernel<T><<<static_cast<unsigned>(g), kThreads, shared_bytes, stream_>>>(
          vectors_.as<T>(), stride_, qf_.as<float>() + q0 * stride_, leaf_sel_.as<Cand>(),
          width, DeviceLeaves(), sorted_values,
          lanes, cand_.as<Cand>(), cap, lens_.as<uint32_t>());
      CUDA_RETURN_IF_ERROR(cudaGetLastError());
      Mark("score leaves");
      RETURN_IF_ERROR(Reduce(cand_.as<Cand>(), cap, cap, lens_.as<uint32_t>(), g, k,
                             final_.as<Cand>(), k));
      Mark("select");
      RETURN_IF_ERROR(Download(g, k, q0, hits));
      RETURN_IF_ERROR(CopyToHost(host_lens.data(), lens_.as<void>(), g * sizeof(uint32_t)));
      for (size_t i = 0; i < g; ++i) visits += host_lens[i];
      Mark("download");
    }
    last_visits_ = visits / n + width;
    Trace("beam", n);
    return absl::OkStatus();
  }

  absl::Status Propose(absl::Span<const float> queries, size_t n, const ProposeParams& p,
                       std::vector<DeviceHit>* draws) override {
    DeviceScope scope(device_);
    if (p.draws.size() != n || p.first_draw.size() != n ||
        (!p.query_ids.empty() && p.query_ids.size() != n) ||
        (!p.exclude_offsets.empty() && p.exclude_offsets.size() != n + 1)) {
      return absl::InvalidArgumentError("Propose: per-query parameters of the wrong length");
    }
    if (!has_leaves_) {
      return absl::FailedPreconditionError("the device holds no tree leaves yet");
    }
    // Draw offsets per query, over the whole call.
    std::vector<uint32_t> draw_offsets(n + 1, 0);
    for (size_t q = 0; q < n; ++q) draw_offsets[q + 1] = draw_offsets[q] + p.draws[q];
    const DeviceHit none{-std::numeric_limits<float>::infinity(), 0, kNoRow, 0};
    draws->assign(draw_offsets[n], none);
    if (draw_offsets[n] == 0 || num_leaves_ == 0) return absl::OkStatus();
    StartProfile();
    RETURN_IF_ERROR(PrepareQueries(queries, n));
    // Exclusions: per query, its rows sorted and unique (searched by the
    // draws) and its (leaf, excluded count) pairs (the leaves' weights).
    const bool masked = !p.exclude_offsets.empty() && !p.exclude_rows.empty();
    if (masked) {
      std::vector<uint32_t> ex_offsets, ex_rows, pair_offsets(n + 1, 0), pair_leaf, pair_count;
      SortedPerQuery(p.exclude_offsets, p.exclude_rows, &ex_offsets, &ex_rows);
      if (leaf_of_row_.empty()) {
        for (size_t f = 0; f < num_leaves_; ++f) {
          for (uint32_t i = 0; i < leaf_count_host_[f]; ++i) {
            const uint32_t row = pool_shadow_[leaf_begin_host_[f] + i];
            if (row >= leaf_of_row_.size()) leaf_of_row_.resize(row + 1, kNoRow);
            leaf_of_row_[row] = static_cast<uint32_t>(f);
          }
        }
      }
      std::vector<uint32_t> leaves;
      for (size_t q = 0; q < n; ++q) {
        leaves.clear();
        for (uint32_t i = ex_offsets[q]; i < ex_offsets[q + 1]; ++i) {
          const uint32_t r = ex_rows[i];
          if (r < leaf_of_row_.size() && leaf_of_row_[r] != kNoRow) {
            leaves.push_back(leaf_of_row_[r]);
          }
        }
        std::sort(leaves.begin(), leaves.end());
        for (size_t i = 0; i < leaves.size();) {
          size_t j = i;
          while (j < leaves.size() && leaves[j] == leaves[i]) ++j;
          pair_leaf.push_back(leaves[i]);
          pair_count.push_back(static_cast<uint32_t>(j - i));
          i = j;
        }
        pair_offsets[q + 1] = static_cast<uint32_t>(pair_leaf.size());
      }
      RETURN_IF_ERROR(Upload(excl_offsets_, ex_offsets));
      RETURN_IF_ERROR(Upload(excl_rows_, ex_rows));
      RETURN_IF_ERROR(Upload(pair_offsets_, pair_offsets));
      RETURN_IF_ERROR(Upload(pair_leaf_, pair_leaf));
      RETURN_IF_ERROR(Upload(pair_count_, pair_count));
    }
    RETURN_IF_ERROR(Upload(first_draw_, p.first_draw));
    if (!p.query_ids.empty()) RETURN_IF_ERROR(Upload(query_ids_, p.query_ids));
    Mark("upload queries");

    // Per (query, leaf): a float score / log weight and a double prefix sum.
    const size_t group = std::clamp<size_t>(kScoreBudget / (3 * num_leaves_), 1,
                                            std::min<size_t>(n, kMaxQueryGroup));
    size_t max_group_draws = 0;
    for (size_t q0 = 0; q0 < n; q0 += group) {
      const size_t g = std::min(group, n - q0);
      max_group_draws = std::max<size_t>(max_group_draws, draw_offsets[q0 + g] - draw_offsets[q0]);
    }
    RETURN_IF_ERROR(scores_.Ensure(group * num_leaves_ * sizeof(float)));
    RETURN_IF_ERROR(cdf_.Ensure(group * num_leaves_ * sizeof(double)));
    RETURN_IF_ERROR(top_.Ensure(group * sizeof(float)));
    RETURN_IF_ERROR(total_.Ensure(group * sizeof(double)));
    RETURN_IF_ERROR(draw_offsets_.Ensure((group + 1) * sizeof(uint32_t)));
    RETURN_IF_ERROR(draw_leaf_.Ensure(max_group_draws * sizeof(uint32_t)));
    RETURN_IF_ERROR(draw_log_p_.Ensure(max_group_draws * sizeof(double)));
    RETURN_IF_ERROR(draw_key_.Ensure(max_group_draws * sizeof(uint64_t)));
    RETURN_IF_ERROR(final_.Ensure(max_group_draws * sizeof(Cand)));
    std::vector<uint32_t> group_offsets;
    for (size_t q0 = 0; q0 < n; q0 += group) {
      const size_t g = std::min(group, n - q0);
      const size_t first = draw_offsets[q0], count = draw_offsets[q0 + g] - first;
      if (count == 0) continue;
      group_offsets.resize(g + 1);
      for (size_t q = 0; q <= g; ++q) group_offsets[q] = draw_offsets[q0 + q] - first;
      RETURN_IF_ERROR(CopyToDevice(draw_offsets_.as<void>(), group_offsets.data(),
                                   group_offsets.size() * sizeof(uint32_t)));
      RETURN_IF_ERROR(ScoreLeafCenters(q0, g));
      Mark("route gemm");
      LeafWeightsKernel<<<static_cast<unsigned>(g), kThreads, 0, stream_>>>(
          scores_.as<float>(), cdf_.as<double>(), num_leaves_, num_leaves_,
          leaf_count_.as<uint32_t>(), leaf_spreads_.as<float>(), qf_.as<float>() + q0 * stride_,
          stride_, dim_, p.inv_tau, masked ? pair_offsets_.as<uint32_t>() : nullptr,
          pair_leaf_.as<uint32_t>(), pair_count_.as<uint32_t>(), static_cast<uint32_t>(q0),
          top_.as<float>(), total_.as<double>());
      CUDA_RETURN_IF_ERROR(cudaGetLastError());
      DrawLeafKernel<<<static_cast<unsigned>(g), 128, 0, stream_>>>(
          scores_.as<float>(), cdf_.as<double>(), num_leaves_, num_leaves_, top_.as<float>(),
          total_.as<double>(), draw_offsets_.as<uint32_t>(), first_draw_.as<uint64_t>(),
          p.query_ids.empty() ? nullptr : query_ids_.as<uint32_t>(), p.seed,
          static_cast<uint32_t>(q0), draw_leaf_.as<uint32_t>(), draw_log_p_.as<double>(),
          draw_key_.as<uint64_t>());
      CUDA_RETURN_IF_ERROR(cudaGetLastError());
      Mark("draw leaves");
      DrawTargetKernel<T><<<static_cast<unsigned>(CeilDiv(count * 32, kThreads)), kThreads, 0,
                            stream_>>>(
          vectors_.as<T>(), stride_, qf_.as<float>() + q0 * stride_, g,
          draw_offsets_.as<uint32_t>(), count, DeviceLeaves(),
          masked ? excl_offsets_.as<uint32_t>() : nullptr,
          excl_rows_.as<uint32_t>(), static_cast<uint32_t>(q0), draw_leaf_.as<uint32_t>(),
          draw_log_p_.as<double>(), draw_key_.as<uint64_t>(), p.inv_tau, final_.as<Cand>());
      CUDA_RETURN_IF_ERROR(cudaGetLastError());
      Mark("draw targets");
      RETURN_IF_ERROR(DownloadHits(final_.as<Cand>(), count, draws->data() + first));
      Mark("download");
    }
    for (size_t q = 0; q < n; ++q) {
      for (uint32_t d = draw_offsets[q]; d < draw_offsets[q + 1]; ++d) {
        if (std::isnan((*draws)[d].key)) {
          return absl::InvalidArgumentError(
              absl::StrCat("query ", p.query_ids.empty() ? q : p.query_ids[q],
                           ": its scores over the temperature ", 1.0 / p.inv_tau,
                           " overflow; scale the embeddings or raise the temperature"));
        }
      }
    }
    last_visits_ = static_cast<double>(num_leaves_) + double(draw_offsets[n]) / n;
    Trace("propose", n);
    return absl::OkStatus();
  }

  absl::Status CorrectRows(const DeviceDriftModel& md, const float* x, size_t n,
                           float* out) override {
    DeviceScope scope(device_);
    const int d = dim_;
    const int m = static_cast<int>(md.m);
    if (md.kernel == DriftKernel::kNone || m == 0) {
      std::copy_n(x, n * d, out);
      return absl::OkStatus();
    }
    // Rows per chunk: x, out and the features within the score budget.
    const size_t chunk = std::clamp<size_t>(kScoreBudget / (2 * d + m + 1), 1, n);
    DeviceBuffer dl, dc, dx, df, dln, dxn;
    RETURN_IF_ERROR(dl.Ensure(md.m * d * sizeof(float)));
    RETURN_IF_ERROR(dc.Ensure(md.m * d * sizeof(float)));
    RETURN_IF_ERROR(dln.Ensure(md.m * sizeof(float)));
    RETURN_IF_ERROR(dx.Ensure(2 * chunk * d * sizeof(float)));  // x, then out
    RETURN_IF_ERROR(df.Ensure(chunk * md.m * sizeof(float)));
    RETURN_IF_ERROR(dxn.Ensure(chunk * sizeof(float)));
    RETURN_IF_ERROR(CopyToDevice(dl.as<void>(), md.landmarks, md.m * d * sizeof(float)));
    RETURN_IF_ERROR(CopyToDevice(dc.as<void>(), md.coef, md.m * d * sizeof(float)));
    SquaredNormsKernel<<<GridFor(md.m), kThreads, 0, stream_>>>(dl.as<float>(), md.m, d,
                                                                dln.as<float>());
    const float inv_w = 1.0f / md.width;
    for (size_t b = 0; b < n; b += chunk) {
      const int rows = static_cast<int>(std::min(chunk, n - b));
      float* xs = dx.as<float>();
      float* os = xs + chunk * d;
      RETURN_IF_ERROR(CopyToDevice(xs, x + b * d, size_t(rows) * d * sizeof(float)));
      const float one = 1.0f, zero = 0.0f;
      // Row-major f (rows x m) = x L^T: column-major m x rows = L^T' x'.
      CUBLAS_RETURN_IF_ERROR(Blas().sgemm(handle_, CUBLAS_OP_T, CUBLAS_OP_N, m, rows, d, &one,
                                         dl.as<float>(), d, xs, d, &zero, df.as<float>(), m));
      if (md.kernel != DriftKernel::kLinear) {
        SquaredNormsKernel<<<GridFor(rows), kThreads, 0, stream_>>>(xs, rows, d,
                                                                    dxn.as<float>());
        DriftFeaturesKernel<<<GridFor(size_t(rows) * m), kThreads, 0, stream_>>>(
            df.as<float>(), rows, m, md.kernel, inv_w, md.center, dxn.as<float>(),
            dln.as<float>());
        CUDA_RETURN_IF_ERROR(cudaGetLastError());
      }
      // out = x + f C: column-major d x rows = C' (d x m) f' (m x rows) + x'.
      CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(os, xs, size_t(rows) * d * sizeof(float),
                                           cudaMemcpyDeviceToDevice, stream_));
      CUBLAS_RETURN_IF_ERROR(Blas().sgemm(handle_, CUBLAS_OP_N, CUBLAS_OP_N, d, rows, m, &one,
                                         dc.as<float>(), d, df.as<float>(), m, &one, os, d));
      RETURN_IF_ERROR(CopyToHost(out + b * d, os, size_t(rows) * d * sizeof(float)));
    }
    return absl::OkStatus();
  }

  size_t MemoryBytes() const override {
    return vectors_.bytes() + live_.bytes() + ids_.bytes() + final_ids_.bytes() + leaf_centers_.bytes() +
           leaf_begin_.bytes() + leaf_count_.bytes() + leaf_pool_.bytes() + scores_.bytes() +
           chunk_hits_.bytes() + accum_.bytes() + final_.bytes() + lse_.bytes() +
           log_z_.bytes() + bound_.bytes() + qraw_.bytes() + qf_.bytes() + qt_.bytes() +
           excl_offsets_.bytes() + excl_rows_.bytes() + leaf_sel_.bytes() + cand_.bytes() + order_.bytes() + sort_temp_.bytes() +
           lens_.bytes() + scratch_[0].bytes() + scratch_[1].bytes() + leaf_spreads_.bytes() +
           cdf_.bytes() + top_.bytes() + total_.bytes() + draw_offsets_.bytes() +
           draw_leaf_.bytes() + draw_log_p_.bytes() + draw_key_.bytes() + first_draw_.bytes() +
           query_ids_.bytes() + pair_offsets_.bytes() + pair_leaf_.bytes() + pair_count_.bytes() +
           fused_count_.bytes() + overflow_.bytes();
  }
  double LastVisitsPerQuery() const override { return last_visits_; }
  void set_profiling(bool on) override { profiling_ = on; }
  void set_fused_scan(bool on) override { fused_scan_ = on; }
  size_t LastFusedRedo() const override { return last_fused_redo_; }
  std::string LastProfile() const override {
    std::string out;
    for (const auto& [name, seconds] : phases_) {
      absl::StrAppend(&out, out.empty() ? "" : ", ", name, " ",
                      absl::SixDigits(seconds * 1e3), " ms");
    }
    return out;
  }
  double LastGemmSeconds() const override {
    for (const auto& [name, seconds] : phases_) {
      if (name == "gemm") return seconds;
    }
    return 0;
  }

 private:
  // Host -> device through the pinned staging buffer.
  absl::Status CopyToDevice(void* dst, const void* src, size_t bytes) {
    for (size_t done = 0; done < bytes; done += kStagingBytes) {
      const size_t b = std::min(kStagingBytes, bytes - done);
      std::memcpy(staging_, static_cast<const char*>(src) + done, b);
      CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(static_cast<char*>(dst) + done, staging_, b,
                                           cudaMemcpyHostToDevice, stream_));
      CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
    }
    return absl::OkStatus();
  }
  // src[b, e) to dst[b, e) for every run, packed into the staging buffer
  // (one synchronization per buffer-full, not per run).
  template <typename V>
  absl::Status CopyRunsToDevice(V* dst, const V* src,
                                const std::vector<std::pair<size_t, size_t>>& runs) {
    const size_t capacity = kStagingBytes / sizeof(V);
    size_t used = 0;
    for (auto [b, e] : runs) {
      while (b < e) {
        if (used == capacity) {
          CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
          used = 0;
        }
        const size_t len = std::min(e - b, capacity - used);
        V* stage = static_cast<V*>(staging_) + used;
        std::memcpy(stage, src + b, len * sizeof(V));
        CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst + b, stage, len * sizeof(V),
                                             cudaMemcpyHostToDevice, stream_));
        used += len;
        b += len;
      }
    }
    CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
    return absl::OkStatus();
  }
  absl::Status CopyToHost(void* dst, const void* src, size_t bytes) {
    for (size_t done = 0; done < bytes; done += kStagingBytes) {
      const size_t b = std::min(kStagingBytes, bytes - done);
      CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(staging_, static_cast<const char*>(src) + done, b,
                                           cudaMemcpyDeviceToHost, stream_));
      CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
      std::memcpy(static_cast<char*>(dst) + done, staging_, b);
    }
    return absl::OkStatus();
  }

  // The g x k candidates in final_ and their ids into hits[q0 * k ..].
  absl::Status Download(size_t g, int k, size_t q0, std::vector<DeviceHit>* hits) {
    return DownloadHits(final_.as<Cand>(), g * k, hits->data() + q0 * k);
  }
  // `count` candidates at `c` and their ids into out[0 .. count).
  absl::Status DownloadHits(const Cand* c, size_t count, DeviceHit* out) {
    RETURN_IF_ERROR(final_ids_.Ensure(count * sizeof(uint64_t)));
    GatherIdsKernel<<<GridFor(count), kThreads, 0, stream_>>>(c, count, ids_.as<uint64_t>(),
                                                             final_ids_.as<uint64_t>());
    CUDA_RETURN_IF_ERROR(cudaGetLastError());
    host_cands_.resize(count);
    host_ids_.resize(count);
    RETURN_IF_ERROR(CopyToHost(host_cands_.data(), c, count * sizeof(Cand)));
    RETURN_IF_ERROR(CopyToHost(host_ids_.data(), final_ids_.as<void>(), count * sizeof(uint64_t)));
    for (size_t i = 0; i < count; ++i) {
      out[i] = DeviceHit{host_cands_[i].key, host_cands_[i].score, host_cands_[i].row, host_ids_[i]};
    }
    return absl::OkStatus();
  }

  // Rows (rows[i], or first + i) of `points` into `dst` as T, through the
  // staging buffer in pieces; with `live` (and `ids`, indexed by row), the
  // rows' live flags and ids into live_ and ids_ too.
  absl::Status ScatterFloats(const PointSource& points, const uint32_t* rows, size_t first,
                             size_t count, T* dst, const uint8_t* live, const uint64_t* ids) {
    // Staging record per piece of c rows: ids (8c), rows (4c), vectors
    // (4c dim), live flags (c).
    const size_t row_bytes = sizeof(uint64_t) + sizeof(uint32_t) + dim_ * sizeof(float) + 1;
    const size_t per = std::max<size_t>(kStagingBytes / row_bytes, 1);
    RETURN_IF_ERROR(upload_.Ensure(std::min(per, std::max<size_t>(count, 1)) * row_bytes + 64));
    for (size_t i0 = 0; i0 < count; i0 += per) {
      const size_t c = std::min(per, count - i0);
      auto layout = [&](void* base, uint64_t** id, uint32_t** r, float** f, uint8_t** l) {
        *id = static_cast<uint64_t*>(base);
        *r = reinterpret_cast<uint32_t*>(*id + c);
        *f = reinterpret_cast<float*>(*r + c);
        *l = reinterpret_cast<uint8_t*>(*f + c * dim_);
      };
      uint64_t* id;
      uint32_t* r;
      float* f;
      uint8_t* l;
      layout(staging_, &id, &r, &f, &l);
      for (size_t i = 0; i < c; ++i) {
        const uint32_t row = rows ? rows[i0 + i] : static_cast<uint32_t>(first + i0 + i);
        points.Get(row, f + i * dim_);
        r[i] = row;
        if (live != nullptr) l[i] = live[row];
        id[i] = ids != nullptr ? ids[row] : 0;
      }
      CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(upload_.as<void>(), staging_, c * row_bytes,
                                           cudaMemcpyHostToDevice, stream_));
      layout(upload_.as<void>(), &id, &r, &f, &l);
      ScatterRowsKernel<T><<<GridFor(c * stride_), kThreads, 0, stream_>>>(
          f, r, c, dim_, stride_, dst, live ? l : nullptr, live_.as<uint8_t>(),
          ids ? id : nullptr, ids_.as<uint64_t>());
      CUDA_RETURN_IF_ERROR(cudaGetLastError());
      CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
    }
    return absl::OkStatus();
  }

  // A host vector into a device buffer (grown to fit).
  template <typename V>
  absl::Status Upload(DeviceBuffer& dst, absl::Span<const V> src) {
    RETURN_IF_ERROR(dst.Ensure(std::max<size_t>(src.size(), 1) * sizeof(V)));
    return CopyToDevice(dst.as<void>(), src.data(), src.size() * sizeof(V));
  }
  template <typename V>
  absl::Status Upload(DeviceBuffer& dst, const std::vector<V>& src) {
    return Upload(dst, absl::Span<const V>(src));
  }

  Leaves DeviceLeaves() const {
    return Leaves{leaf_begin_.as<uint32_t>(), leaf_count_.as<uint32_t>(),
                  leaf_pool_.as<uint32_t>()};
  }

  // scores_[q * num_leaves_ + f] = <query q0 + q, center f> for g queries.
  absl::Status ScoreLeafCenters(size_t q0, size_t g) {
    const float alpha = 1.0f, beta = 0.0f;
    CUBLAS_RETURN_IF_ERROR(Blas().gemm_ex(
        handle_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(num_leaves_), static_cast<int>(g),
        stride_, &alpha, leaf_centers_.as<T>(), Elem<T>::kCuda, stride_,
        qt_.as<T>() + q0 * stride_, Elem<T>::kCuda, stride_, &beta, scores_.as<float>(),
        CUDA_R_32F, static_cast<int>(num_leaves_), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    return absl::OkStatus();
  }

  absl::Status PrepareQueries(absl::Span<const float> queries, size_t n) {
    RETURN_IF_ERROR(qraw_.Ensure(n * dim_ * sizeof(float)));
    RETURN_IF_ERROR(qf_.Ensure(n * stride_ * sizeof(float)));
    RETURN_IF_ERROR(qt_.Ensure(n * stride_ * sizeof(T)));
    RETURN_IF_ERROR(CopyToDevice(qraw_.as<void>(), queries.data(), n * dim_ * sizeof(float)));
    PrepareQueriesKernel<T><<<GridFor(n * stride_), kThreads, 0, stream_>>>(
        qraw_.as<float>(), n, dim_, stride_, qf_.as<float>(), qt_.as<T>());
    CUDA_RETURN_IF_ERROR(cudaGetLastError());
    return absl::OkStatus();
  }

  // The best k of each query's first `len` (or lens[q]) hits of `in` (row
  // stride in_ld) into out[q * out_ld ..], by passes of the selection
  // kernel. `in` and `out` may be the same buffer when len <= kSegment.
  absl::Status Reduce(const Cand* in, size_t in_ld, size_t len, const uint32_t* lens,
                      size_t nq, int k, Cand* out, size_t out_ld) {
    const Cand* cur = in;
    size_t cur_ld = in_ld;
    int ping = 0;
    while (true) {
      const size_t segs = CeilDiv(std::max<size_t>(len, 1), kSegment);
      SelectArgs a{};
      a.hits = cur;
      a.ld = cur_ld;
      a.count = len;
      a.lens = lens;
      a.k = k;
      if (segs == 1) {
        a.out = out;
        a.out_ld = out_ld;
      } else {
        RETURN_IF_ERROR(scratch_[ping].Ensure(nq * segs * k * sizeof(Cand)));
        a.out = scratch_[ping].as<Cand>();
        a.out_ld = segs * k;
      }
      SelectKernel<kHits><<<dim3(static_cast<unsigned>(segs), static_cast<unsigned>(nq)),
                            kThreads, 0, stream_>>>(a);
      CUDA_RETURN_IF_ERROR(cudaGetLastError());
      if (segs == 1) return absl::OkStatus();
      cur = a.out;
      cur_ld = a.out_ld;
      len = segs * k;
      lens = nullptr;
      ping ^= 1;
    }
  }

  const int dim_, stride_;
  const int device_;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t handle_ = nullptr;
  void* staging_ = nullptr;
  size_t capacity_ = 0, num_rows_ = 0;
  DeviceBuffer vectors_, live_, ids_, upload_, final_ids_;
  std::vector<Cand> host_cands_;
  std::vector<uint64_t> host_ids_;
  DeviceBuffer leaf_centers_, leaf_spreads_, leaf_begin_, leaf_count_, leaf_pool_;
  size_t num_leaves_ = 0, max_leaf_ = 0;
  // Host copies of what the device holds, for the changed runs, and row ->
  // leaf (kNoRow: none; empty until a Propose with exclusions needs it).
  std::vector<uint32_t> pool_shadow_, leaf_begin_host_, leaf_count_host_, leaf_of_row_;
  size_t last_pool_upload_ = 0;
  // Propose's per-call buffers.
  DeviceBuffer cdf_, top_, total_, draw_offsets_, draw_leaf_, draw_log_p_, draw_key_;
  DeviceBuffer first_draw_, query_ids_, pair_offsets_, pair_leaf_, pair_count_;
  bool has_leaves_ = false;
  DeviceBuffer qraw_, qf_, qt_, excl_offsets_, excl_rows_;
  DeviceBuffer scores_, chunk_hits_, accum_, final_, lse_, log_z_, bound_;
  DeviceBuffer leaf_sel_, cand_, lens_, order_, sort_temp_;
  DeviceBuffer scratch_[2];
  // The fused scan: on or off, its per-query counts and overflow flags, and
  // how many queries the last call had to scan again unfused.
  bool fused_scan_ = false;
  int sm_count_ = 1;
  DeviceBuffer fused_count_, overflow_;
  size_t last_fused_redo_ = 0;
  double last_visits_ = 0;
  // Profiling (benchmarks): time per phase of the last call, in order.
  void StartProfile() {
    phases_.clear();
    if (profiling_) cudaStreamSynchronize(stream_);
    mark_ = std::chrono::steady_clock::now();
  }
  void Mark(const char* phase) {
    if (!profiling_) return;
    cudaStreamSynchronize(stream_);
    const auto now = std::chrono::steady_clock::now();
    const double t = std::chrono::duration<double>(now - mark_).count();
    mark_ = now;
    for (auto& [name, seconds] : phases_) {
      if (name == phase) {
        seconds += t;
        return;
      }
    }
    phases_.emplace_back(phase, t);
  }
  void Trace(const char* call, size_t n) const {
    if (trace_) std::fprintf(stderr, "negmine cuda %s n=%zu: %s\n", call, n, LastProfile().c_str());
  }
  bool profiling_ = false, trace_ = false;
  std::chrono::steady_clock::time_point mark_;
  std::vector<std::pair<std::string, double>> phases_;
};

template <typename T>
absl::StatusOr<std::unique_ptr<DeviceMirror>> MakeMirror(int dim, int device) {
  auto m = std::make_unique<Mirror<T>>(dim, device);
  RETURN_IF_ERROR(m->Init());
  return std::unique_ptr<DeviceMirror>(std::move(m));
}

}  // namespace

absl::StatusOr<std::unique_ptr<DeviceMirror>> DeviceMirror::Create(int dim, DeviceDtype dtype,
                                                                   int device) {
  const int count = CudaDeviceCount();
  if (device < 0 || device >= count) {
    return absl::FailedPreconditionError(absl::StrCat(
        "CUDA device ", device, " is not available (", count, " visible devices)"));
  }
  switch (dtype) {
    case DeviceDtype::kFloat16: return MakeMirror<__half>(dim, device);
    case DeviceDtype::kBFloat16: return MakeMirror<__nv_bfloat16>(dim, device);
    case DeviceDtype::kFloat32: break;
  }
  return MakeMirror<float>(dim, device);
}

}  // namespace negmine
