// The CUDA implementation of DeviceMirror (see the header for the layout and
// the algorithms): the Mirror, which owns the device memory, the stream and
// the cuBLAS handle, uploads the writes and launches the kernels. Comments
// here say why. The kernels are in core/cuda/kernels_*.cuh (what they share
// in core/cuda/kernels.cuh), compiled here, where they are launched; the
// cuBLAS loader is core/cuda/cublas_api.cu.
//
// Why the Mirror stays one file (about 1,070 lines): it is one class template
// over the element type whose members share its buffers, its stream and its
// profile, and nvcc gives template kernels internal linkage, so its
// searches and the kernels they launch cannot move to another translation
// unit without a launcher for every kernel. The seam, if it is cut: the
// searches (Scan, ScanFused, Beam, Propose) apart from the upkeep (Reserve,
// SetRows, SetLeaves, CorrectRows and the copies).
#include <cub/cub.cuh>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

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
#include "core/cuda/cublas_api.h"
#include "core/cuda/device.h"
#include "core/cuda/device_mirror.h"
#include "core/cuda/kernels.cuh"
#include "core/cuda/kernels_drift.cuh"
#include "core/cuda/kernels_fused.cuh"
#include "core/cuda/kernels_propose.cuh"
#include "core/cuda/kernels_rows.cuh"
#include "core/cuda/kernels_select.cuh"
#include "core/status.h"
#include "core/tree/tree.h"

namespace negmine {
namespace device_internal {
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

#define CUDA_RETURN_IF_ERROR(expr) RETURN_IF_ERROR(CudaStatus((expr), #expr))

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

// Floats in one GEMM's score block (1 GiB).
constexpr size_t kScoreBudget = size_t{256} << 20;
// Candidate hits held for one beam group (768 MiB).
constexpr size_t kBeamBudget = size_t{64} << 20;
// Bytes of the pinned staging buffer.
constexpr size_t kStagingBytes = size_t{32} << 20;
constexpr int kMaxQueryGroup = 16384;
// Elements per block compared when the leaf pool is uploaded by changed runs.
constexpr size_t kPoolBlock = 1024;

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
}  // namespace device_internal

absl::StatusOr<std::unique_ptr<DeviceMirror>> DeviceMirror::Create(int dim, DeviceDtype dtype,
                                                                   int device) {
  const int count = CudaDeviceCount();
  if (device < 0 || device >= count) {
    return absl::FailedPreconditionError(absl::StrCat(
        "CUDA device ", device, " is not available (", count, " visible devices)"));
  }
  switch (dtype) {
    case DeviceDtype::kFloat16: return device_internal::MakeMirror<__half>(dim, device);
    case DeviceDtype::kBFloat16: return device_internal::MakeMirror<__nv_bfloat16>(dim, device);
    case DeviceDtype::kFloat32: break;
  }
  return device_internal::MakeMirror<float>(dim, device);
}

}  // namespace negmine
