#include "core/index.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "core/status.h"
#include "core/cuda/device.h"
#include "core/exact_index.h"
#include "core/mine_plan.h"
#include "core/tree/tree_index.h"

namespace negmine {

const char* MetricName(Metric m) {
  return m == Metric::kCosine ? "cosine" : "inner_product";
}

const char* BackendName(Backend b) {
  switch (b) {
    case Backend::kAuto: return "auto";
    case Backend::kCpu: return "cpu";
    case Backend::kCuda: return "cuda";
  }
  return "?";
}

const char* DeviceDtypeName(DeviceDtype t) {
  switch (t) {
    case DeviceDtype::kFloat32: return "float32";
    case DeviceDtype::kFloat16: return "float16";
    case DeviceDtype::kBFloat16: return "bfloat16";
  }
  return "?";
}

const char* IndexKindName(IndexKind k) {
  return k == IndexKind::kTree ? "tree" : "exact";
}

absl::Status ValidateSearchParams(const SearchParams& p, size_t num_targets) {
  if (num_targets == 0) {
    return absl::FailedPreconditionError(
        "the collection holds no targets yet; upsert some before mining");
  }
  if (p.k < 1 || static_cast<size_t>(p.k) > num_targets) {
    return absl::InvalidArgumentError(absl::StrCat(
        "params.k = ", p.k, " must be in [1, ", num_targets,
        "] (the collection's size)"));
  }
  if (p.mode != MineMode::kTopK &&
      !(p.temperature > 0 && std::isfinite(p.temperature))) {
    return absl::InvalidArgumentError(absl::StrCat(
        "params.temperature = ", p.temperature, " must be finite and > 0"));
  }
  if (p.want_log_z && !(p.temperature > 0 && std::isfinite(p.temperature))) {
    return absl::InvalidArgumentError(
        absl::StrCat("params.temperature = ", p.temperature,
                     " must be finite and > 0 when log Z is requested"));
  }
  if (p.mode == MineMode::kMixed && (p.num_hard < 0 || p.num_hard > p.k)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "params.num_hard = ", p.num_hard, " must be in [0, k = ", p.k, "]"));
  }
  if (p.rank_offset < 0 ||
      static_cast<size_t>(p.rank_offset) >= num_targets) {
    return absl::InvalidArgumentError(
        absl::StrCat("params.rank_offset = ", p.rank_offset, " must be in [0, ",
                     num_targets, ")"));
  }
  if (!(p.log_z_width >= 0)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "params.log_z_width = ", p.log_z_width, " must be >= 0"));
  }
  if (p.beam_width < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("params.beam_width = ", p.beam_width, " must be >= 0"));
  }
  return ValidateFilters(p);
}

absl::Status CheckFinite(absl::Span<const float> values, int dim,
                         const char* what) {
  for (size_t i = 0; i < values.size(); ++i) {
    if (!std::isfinite(values[i])) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, "[", i / dim, "][", i % dim, "] = ", values[i],
                       " is not finite"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Index>> CreateIndex(const IndexOptions& options) {
  if (options.dim < 1 || options.dim > IndexOptions::kMaxDim) {
    return absl::InvalidArgumentError(absl::StrCat(
        "dim = ", options.dim, " must be in [1, ", IndexOptions::kMaxDim, "]"));
  }
  if (options.kind == IndexKind::kTree &&
      (options.tree.leaf_size < 2 || options.tree.leaf_size > 65536 ||
       options.tree.branching < 2 || options.tree.branching > 1024)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tree.leaf_size = ", options.tree.leaf_size, " must be in [2, 65536] and "
        "tree.branching = ", options.tree.branching, " in [2, 1024]"));
  }
  if (options.backend == Backend::kCuda) {
    if (!CudaBuilt()) {
      return absl::UnimplementedError(
          "backend 'cuda' was not built into this binary (configure with "
          "-DNEGMINE_CUDA=ON where nvcc is installed)");
    }
    if (CudaDeviceCount() == 0) {
      return absl::FailedPreconditionError(
          "backend 'cuda' requested but no CUDA device is visible (check the "
          "driver and CUDA_VISIBLE_DEVICES, or use backend 'cpu' or 'auto')");
    }
  }
  std::unique_ptr<StoreIndex> index;
  if (options.kind == IndexKind::kTree) {
    index = std::make_unique<TreeIndex>(options);
  } else {
    index = std::make_unique<ExactIndex>(options);
  }
  const bool want_cuda = options.backend == Backend::kCuda ||
                         (options.backend == Backend::kAuto && CudaBuilt() &&
                          CudaDeviceCount() > 0);
  if (want_cuda) {
    absl::StatusOr<std::unique_ptr<DeviceMirror>> device =
        DeviceMirror::Create(options.dim, options.device_dtype);
    if (device.ok()) {
      index->AttachDevice(*std::move(device));
    } else if (options.backend == Backend::kCuda) {
      return device.status();
    }  // kAuto: the CPU serves (active_backend() says which)
  }
  return index;
}

}  // namespace negmine
