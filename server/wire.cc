#include "server/wire.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "core/dtype.h"

namespace negmine::server {

grpc::Status ToGrpc(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()),
                      std::string(status.message()));
}

size_t DTypeSize(int dtype) {
  switch (dtype) {
    case v1::DTYPE_FLOAT32: return 4;
    case v1::DTYPE_FLOAT16:
    case v1::DTYPE_BFLOAT16: return 2;
    default: return 0;
  }
}

absl::StatusOr<std::vector<float>> DecodeMatrix(const v1::Matrix& m,
                                                const char* field,
                                                uint32_t want_cols) {
  const size_t elem = DTypeSize(m.dtype());
  if (elem == 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        field, ".dtype = ", m.dtype(),
        " is not a supported dtype (DTYPE_FLOAT32 = 1, DTYPE_FLOAT16 = 2, "
        "DTYPE_BFLOAT16 = 3)"));
  }
  if (m.rows() == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ".rows = 0: the batch is empty"));
  }
  if (m.cols() != want_cols) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ".cols = ", m.cols(),
                     " does not match the collection's dim = ", want_cols));
  }
  const size_t count = size_t{m.rows()} * m.cols();
  if (m.data().size() != count * elem) {
    return absl::InvalidArgumentError(absl::StrCat(
        field, ".data has ", m.data().size(), " bytes; rows ", m.rows(),
        " x cols ", m.cols(), " x ", elem, " bytes = ", count * elem));
  }
  std::vector<float> out(count);
  const char* src = m.data().data();
  // The wire is little-endian, and so is every platform negmine builds on
  // (x86-64, aarch64): a memcpy per element is the decode.
  static_assert(std::endian::native == std::endian::little);
  if (m.dtype() == v1::DTYPE_FLOAT32) {
    std::memcpy(out.data(), src, count * 4);
  } else {
    const bool half = m.dtype() == v1::DTYPE_FLOAT16;
    for (size_t i = 0; i < count; ++i) {
      uint16_t v;
      std::memcpy(&v, src + 2 * i, 2);
      out[i] = half ? HalfToFloat(v) : BFloat16ToFloat(v);
    }
  }
  return out;
}

void EncodeMatrix(absl::Span<const float> values, uint32_t rows, uint32_t cols,
                  v1::Matrix* out) {
  out->set_rows(rows);
  out->set_cols(cols);
  out->set_dtype(v1::DTYPE_FLOAT32);
  out->set_data(reinterpret_cast<const char*>(values.data()),
                values.size() * sizeof(float));
}

absl::StatusOr<SearchParams> ToSearchParams(const v1::MineParams& p) {
  SearchParams s;
  switch (p.mode()) {
    case v1::MINE_MODE_UNSPECIFIED:
    case v1::MINE_MODE_TOP_K: s.mode = MineMode::kTopK; break;
    case v1::MINE_MODE_SAMPLE: s.mode = MineMode::kSample; break;
    case v1::MINE_MODE_MIXED: s.mode = MineMode::kMixed; break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("params.mode = ", p.mode(), " is not a MineMode"));
  }
  switch (p.sampler()) {
    case v1::SAMPLER_UNSPECIFIED:
    case v1::SAMPLER_PROPOSAL: s.sampler = Sampler::kProposal; break;
    case v1::SAMPLER_EXACT: s.sampler = Sampler::kExact; break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("params.sampler = ", p.sampler(), " is not a SamplerKind"));
  }
  // uint32 fields beyond int range are out of every valid range anyway;
  // clamp so that core's range checks report them.
  auto to_int = [](uint32_t v) {
    return static_cast<int>(std::min<uint32_t>(v, 0x7fffffff));
  };
  s.k = to_int(p.k());
  s.temperature = p.temperature();
  s.num_hard = to_int(p.num_hard());
  s.with_replacement = p.with_replacement();
  s.rank_offset = to_int(p.rank_offset());
  s.approximate = p.approximate();
  s.beam_width = to_int(p.beam_width());
  s.want_log_z = p.return_log_z();
  s.seed = p.seed();
  if (p.log_z_width() < 0 || !std::isfinite(p.log_z_width())) {
    return absl::InvalidArgumentError(absl::StrCat(
        "params.log_z_width = ", p.log_z_width(), " must be finite and >= 0"));
  }
  if (p.log_z_width() > 0) s.log_z_width = p.log_z_width();
  return s;
}

absl::StatusOr<IndexOptions> ToIndexOptions(const v1::CollectionConfig& c) {
  IndexOptions o;
  if (c.dim() == 0 || c.dim() > IndexOptions::kMaxDim) {
    return absl::InvalidArgumentError(absl::StrCat(
        "config.dim = ", c.dim(), " must be in [1, ", IndexOptions::kMaxDim, "]"));
  }
  o.dim = static_cast<int>(c.dim());
  switch (c.metric()) {
    case v1::METRIC_UNSPECIFIED:
    case v1::METRIC_INNER_PRODUCT: o.metric = Metric::kInnerProduct; break;
    case v1::METRIC_COSINE: o.metric = Metric::kCosine; break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("config.metric = ", c.metric(), " is not a Metric"));
  }
  switch (c.backend()) {
    case v1::BACKEND_UNSPECIFIED:
    case v1::BACKEND_AUTO: o.backend = Backend::kAuto; break;
    case v1::BACKEND_CPU: o.backend = Backend::kCpu; break;
    case v1::BACKEND_CUDA: o.backend = Backend::kCuda; break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("config.backend = ", c.backend(), " is not a Backend"));
  }
  switch (c.device_dtype()) {
    case v1::DTYPE_UNSPECIFIED:
    case v1::DTYPE_FLOAT32: o.device_dtype = DeviceDtype::kFloat32; break;
    case v1::DTYPE_FLOAT16: o.device_dtype = DeviceDtype::kFloat16; break;
    case v1::DTYPE_BFLOAT16: o.device_dtype = DeviceDtype::kBFloat16; break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("config.device_dtype = ", c.device_dtype(), " is not a DType"));
  }
  switch (c.index_kind()) {
    case v1::INDEX_KIND_EXACT: o.kind = IndexKind::kExact; break;
    case v1::INDEX_KIND_UNSPECIFIED:
    case v1::INDEX_KIND_TREE: o.kind = IndexKind::kTree; break;
    default:
      return absl::InvalidArgumentError(absl::StrCat(
          "config.index_kind = ", c.index_kind(), " is not an IndexKind"));
  }
  if (c.tree().leaf_size() > 0) o.tree.leaf_size = static_cast<int>(std::min<uint32_t>(c.tree().leaf_size(), 1 << 30));
  if (c.tree().branching() > 0) o.tree.branching = static_cast<int>(std::min<uint32_t>(c.tree().branching(), 1 << 30));
  const v1::DriftParams& d = c.drift();
  if (d.num_landmarks() > 65536) {
    return absl::InvalidArgumentError(absl::StrCat(
        "config.drift.num_landmarks = ", d.num_landmarks(), " must be at most 65536"));
  }
  if (!(d.rebase_residual() >= 0 && d.rebase_residual() <= 10)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "config.drift.rebase_residual = ", d.rebase_residual(), " must be in [0, 10]"));
  }
  if (d.rebase_every_steps() < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "config.drift.rebase_every_steps = ", d.rebase_every_steps(), " must be >= 0"));
  }
  o.drift.num_landmarks = d.num_landmarks() > 0 ? static_cast<int>(d.num_landmarks())
                                                : std::max(64, 4 * o.dim);
  o.drift.rebase_residual = d.rebase_residual();
  o.drift.rebase_every_steps = d.rebase_every_steps();
  if (d.seed() != 0) o.drift.seed = d.seed();
  return o;
}

void ToWireConfig(const std::string& name, const IndexOptions& o,
                  v1::CollectionConfig* out) {
  out->set_name(name);
  out->set_dim(o.dim);
  out->set_metric(o.metric == Metric::kCosine ? v1::METRIC_COSINE
                                              : v1::METRIC_INNER_PRODUCT);
  out->set_backend(o.backend == Backend::kCuda  ? v1::BACKEND_CUDA
                   : o.backend == Backend::kCpu ? v1::BACKEND_CPU
                                                : v1::BACKEND_AUTO);
  out->set_device_dtype(o.device_dtype == DeviceDtype::kFloat16    ? v1::DTYPE_FLOAT16
                        : o.device_dtype == DeviceDtype::kBFloat16 ? v1::DTYPE_BFLOAT16
                                                                   : v1::DTYPE_FLOAT32);
  out->set_index_kind(o.kind == IndexKind::kTree ? v1::INDEX_KIND_TREE
                                                 : v1::INDEX_KIND_EXACT);
  if (o.kind == IndexKind::kTree) {
    out->mutable_tree()->set_leaf_size(o.tree.leaf_size);
    out->mutable_tree()->set_branching(o.tree.branching);
  }
  v1::DriftParams* d = out->mutable_drift();
  d->set_num_landmarks(o.drift.num_landmarks);
  d->set_rebase_residual(o.drift.rebase_residual);
  d->set_rebase_every_steps(o.drift.rebase_every_steps);
  d->set_seed(o.drift.seed);
}

void ToWireTreeInfo(const TreeSummary& t, v1::TreeInfo* out) {
  out->set_depth(t.depth);
  out->set_nodes(t.num_nodes);
  out->set_leaves(t.num_leaves);
  out->set_dead_nodes(t.num_dead_nodes);
  out->set_min_leaf(t.min_leaf);
  out->set_max_leaf(t.max_leaf);
  out->set_mean_leaf(t.mean_leaf);
  out->mutable_leaf_size_histogram()->Add(t.leaf_size_histogram.begin(),
                                          t.leaf_size_histogram.end());
  out->set_looseness(t.looseness);
  out->set_rebuilds(t.rebuilds);
  out->set_subtree_rebuilds(t.subtree_rebuilds);
  out->set_last_rebuild_seconds(t.last_rebuild_seconds);
  out->set_visits_per_query(t.visits_per_query);
  out->set_rebuild_pending(t.rebuild_pending);
  out->set_sampler_proposals(t.sampler_proposals);
  out->set_sampler_accepted(t.sampler_accepted);
}

void ToWireDriftInfo(const DriftSummary& d, v1::DriftInfo* out) {
  out->set_active(d.active);
  out->set_model_step(d.step);
  out->set_landmark_epoch(d.landmark_epoch);
  out->set_num_landmarks(static_cast<uint32_t>(d.num_landmarks));
  out->set_kernel(d.kernel);
  out->set_lambda(d.lambda);
  out->set_heldout_residual(d.heldout_residual);
  out->set_stale_residual(d.stale_residual);
  out->set_updates(d.updates);
  out->set_rebases(d.rebases);
  out->set_last_fit_seconds(d.last_fit_seconds);
  out->set_last_apply_seconds(d.last_apply_seconds);
  out->mutable_staleness_histogram()->Add(d.staleness_histogram.begin(),
                                          d.staleness_histogram.end());
}

absl::StatusOr<std::string> CollectionName(const std::string& name) {
  if (name.empty()) return std::string("default");
  if (name.size() > 128) {
    return absl::InvalidArgumentError(absl::StrCat(
        "collection name has ", name.size(), " characters; at most 128"));
  }
  for (char c : name) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
                    (c >= '0' && c <= '9') || c == '_' || c == '.' || c == '-';
    if (!ok) {
      return absl::InvalidArgumentError(absl::StrCat(
          "collection name '", name,
          "' may hold only letters, digits, '_', '.' and '-'"));
    }
  }
  return name;
}

}  // namespace negmine::server
