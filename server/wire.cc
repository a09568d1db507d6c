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
  const v1::MineFilters& f = p.filters();
  if (f.has_min_score()) s.filters.min_score = f.min_score();
  if (f.has_max_score()) s.filters.max_score = f.max_score();
  if (f.has_absolute_margin()) s.filters.absolute_margin = f.absolute_margin();
  if (f.has_relative_margin()) s.filters.relative_margin = f.relative_margin();
  if (f.has_dedupe_cosine()) {
    if (!(f.dedupe_cosine() > 0)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "params.filters.dedupe_cosine = ", f.dedupe_cosine(), " must be in (0, 1] when set"));
    }
    s.filters.dedupe_cosine = f.dedupe_cosine();
  }
  switch (p.distribution()) {
    case v1::SAMPLE_DISTRIBUTION_UNSPECIFIED:
    case v1::SAMPLE_DISTRIBUTION_SOFTMAX: s.distribution = SampleDistribution::kSoftmax; break;
    case v1::SAMPLE_DISTRIBUTION_SIMANS: s.distribution = SampleDistribution::kSimans; break;
    default:
      return absl::InvalidArgumentError(absl::StrCat(
          "params.distribution = ", p.distribution(), " is not a SampleDistribution"));
  }
  if (p.simans().has_a()) s.simans.a = p.simans().a();
  if (p.simans().has_b()) s.simans.b = p.simans().b();
  s.simans.candidates = p.simans().candidates() > 0 ? to_int(p.simans().candidates())
                                                     : std::max(s.k, 100);
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

void ToWireCollectionInfo(const std::string& name, const Index& index,
                          v1::CollectionInfo* info) {
  ToWireConfig(name, index.options(), info->mutable_config());
  const IndexStats stats = index.Stats();
  info->set_num_targets(stats.num_targets);
  info->set_index_version(stats.version);
  info->set_memory_bytes(stats.memory_bytes);
  info->set_active_backend(index.active_backend() == Backend::kCuda ? v1::BACKEND_CUDA
                                                                     : v1::BACKEND_CPU);
  info->set_device_memory_bytes(stats.device_memory_bytes);
}

absl::StatusOr<WalEntry> FromUpsertRequest(const v1::UpsertTargetsRequest& r,
                                           const std::string& collection, uint32_t dim) {
  WalEntry e{.op = WalOp::kUpsert, .collection = collection, .model_step = r.model_step()};
  absl::StatusOr<std::vector<float>> vectors = DecodeMatrix(r.vectors(), "vectors", dim);
  if (!vectors.ok()) return vectors.status();
  e.vectors = *std::move(vectors);
  if (static_cast<size_t>(r.ids_size()) != r.vectors().rows()) {
    return absl::InvalidArgumentError(absl::StrCat("ids has ", r.ids_size(),
                                                   " entries but vectors.rows = ",
                                                   r.vectors().rows()));
  }
  e.ids.assign(r.ids().begin(), r.ids().end());
  return e;
}

absl::StatusOr<WalEntry> FromDeleteRequest(const v1::DeleteTargetsRequest& r) {
  WalEntry e{.op = WalOp::kDelete, .allow_missing = r.allow_missing()};
  absl::StatusOr<std::string> name = CollectionName(r.collection());
  if (!name.ok()) return name.status();
  e.collection = *std::move(name);
  e.ids.assign(r.ids().begin(), r.ids().end());
  return e;
}

absl::StatusOr<WalEntry> FromApplyDriftRequest(const v1::ApplyDriftRequest& r,
                                               const std::string& collection, uint32_t dim) {
  WalEntry e{.op = WalOp::kDrift, .collection = collection, .model_step = r.model_step(),
             .landmark_epoch = r.landmark_epoch()};
  switch (r.update_case()) {
    case v1::ApplyDriftRequest::kLandmarkEmbeddings: {
      absl::StatusOr<std::vector<float>> v =
          DecodeMatrix(r.landmark_embeddings(), "landmark_embeddings", dim);
      if (!v.ok()) return v.status();
      e.vectors = *std::move(v);
      return e;
    }
    case v1::ApplyDriftRequest::kLinearMap: {
      const v1::LinearMap& map = r.linear_map();
      absl::StatusOr<std::vector<float>> a = DecodeMatrix(map.a(), "linear_map.a", dim);
      if (!a.ok()) return a.status();
      e.linear_a = *std::move(a);
      if (map.a().rows() != dim) {
        return absl::InvalidArgumentError(absl::StrCat("linear_map.a has ", map.a().rows(),
                                                       " rows; it must be dim x dim = ", dim,
                                                       " x ", dim));
      }
      if (map.has_b()) {
        absl::StatusOr<std::vector<float>> b = DecodeMatrix(map.b(), "linear_map.b", dim);
        if (!b.ok()) return b.status();
        e.linear_b = *std::move(b);
        if (map.b().rows() != 1) {
          return absl::InvalidArgumentError(
              absl::StrCat("linear_map.b has ", map.b().rows(), " rows; it must be 1 x dim"));
        }
      }
      return e;
    }
    default:
      return absl::InvalidArgumentError("ApplyDrift needs landmark_embeddings or linear_map");
  }
}

void ToWireDriftReport(const DriftReport& report, v1::ApplyDriftResponse* out) {
  out->set_heldout_residual(report.heldout_residual);
  out->set_stale_residual(report.stale_residual);
  out->set_kernel(report.kernel);
  out->set_lambda(report.lambda);
  out->set_rebased(report.rebased);
  out->set_landmark_epoch(report.landmark_epoch);
  out->set_index_version(report.index_version);
  out->set_fit_seconds(report.fit_seconds);
  out->set_apply_seconds(report.apply_seconds);
}

absl::StatusOr<MineInput> FromMineRequest(const v1::MineRequest& r, uint32_t dim,
                                          const MineLimits& limits) {
  MineInput in;
  absl::StatusOr<std::vector<float>> queries = DecodeMatrix(r.queries(), "queries", dim);
  if (!queries.ok()) return queries.status();
  in.queries = *std::move(queries);
  in.n = r.queries().rows();
  if (in.n > limits.max_batch) {
    return absl::InvalidArgumentError(absl::StrCat(
        "queries.rows = ", in.n, " exceeds the server's max_batch = ", limits.max_batch));
  }
  if (r.exclude_size() != 0 && static_cast<uint32_t>(r.exclude_size()) != in.n) {
    return absl::InvalidArgumentError(absl::StrCat("exclude has ", r.exclude_size(),
                                                   " lists for ", in.n,
                                                   " queries; send none or one per query"));
  }
  if (r.positives_size() != 0 && static_cast<uint32_t>(r.positives_size()) != in.n) {
    return absl::InvalidArgumentError(absl::StrCat("positives has ", r.positives_size(),
                                                   " lists for ", in.n,
                                                   " queries; send none or one per query"));
  }
  absl::StatusOr<SearchParams> params = ToSearchParams(r.params());
  if (!params.ok()) return params.status();
  in.params = *std::move(params);
  if (r.params().k() > limits.max_k) {
    return absl::InvalidArgumentError(absl::StrCat(
        "params.k = ", r.params().k(), " exceeds the server's max_k = ", limits.max_k));
  }
  // Refused up front: a response that could not be sent. Per result at most
  // 18 bytes (an id's varint up to 10, a score and a log q), per query its
  // framing, counts, shortfall text and positives' scores.
  const uint64_t k = r.params().k();
  size_t max_positives = 0;
  for (const v1::IdList& p : r.positives()) {
    max_positives = std::max<size_t>(max_positives, p.ids_size());
  }
  const uint64_t per_query = 400 + 18 * k + 5 * max_positives;
  if (64 + in.n * per_query > limits.max_message_bytes) {
    const uint64_t fit = (limits.max_message_bytes - 64) / per_query;
    return absl::InvalidArgumentError(absl::StrCat(
        "the response to queries.rows = ", in.n, " at params.k = ", k, " could take ",
        64 + in.n * per_query, " bytes, over the server's max_message_bytes = ",
        limits.max_message_bytes, ": split it into requests of at most ", fit,
        " queries at this k (or lower k)"));
  }
  in.exclude.resize(r.exclude_size());
  for (int i = 0; i < r.exclude_size(); ++i) {
    in.exclude[i].assign(r.exclude(i).ids().begin(), r.exclude(i).ids().end());
  }
  in.positives.resize(r.positives_size());
  for (int i = 0; i < r.positives_size(); ++i) {
    in.positives[i].assign(r.positives(i).ids().begin(), r.positives(i).ids().end());
  }
  in.params.positives = in.positives;
  return in;
}

size_t ToWireMineResponse(SearchResult& result, bool want_log_z, v1::MineResponse* resp) {
  resp->set_index_version(result.index_version);
  size_t negatives = 0;
  for (QueryResult& q : result.queries) {
    v1::QueryNegatives* out = resp->add_results();
    out->mutable_ids()->Add(q.ids.begin(), q.ids.end());
    out->mutable_scores()->Add(q.scores.begin(), q.scores.end());
    out->mutable_log_q()->Add(q.log_q.begin(), q.log_q.end());
    out->set_num_top(q.num_top);
    out->set_num_eligible(q.num_eligible);
    out->mutable_positive_scores()->Add(q.positive_scores.begin(), q.positive_scores.end());
    v1::FilterCounts* removed = out->mutable_removed();
    removed->set_excluded(q.removed.excluded);
    removed->set_positives(q.removed.positives);
    removed->set_max_score(q.removed.max_score);
    removed->set_min_score(q.removed.min_score);
    removed->set_absolute_margin(q.removed.absolute_margin);
    removed->set_relative_margin(q.removed.relative_margin);
    removed->set_rank_offset(q.removed.rank_offset);
    removed->set_dedupe(q.removed.dedupe);
    out->set_shortfall(std::move(q.shortfall));
    if (want_log_z) {
      out->set_log_z_lo(q.log_z_lo);
      out->set_log_z_hi(q.log_z_hi);
    }
    negatives += q.ids.size();
    q = QueryResult();  // the response holds it now
  }
  return negatives;
}

absl::Status FromAssignBatchesOptions(const v1::AssignBatchesRequest& r, BatchOptions* options,
                                      bool* async, uint32_t* dim) {
  if (r.batch_size() == 0) {
    return absl::InvalidArgumentError("batch_size = 0: set it (>= 1) in the first message");
  }
  options->batch_size = static_cast<int>(std::min<uint32_t>(r.batch_size(), 1 << 30));
  options->seed = r.seed() != 0 ? r.seed() : 1;
  if (r.params().neighbors() > 0) {
    options->neighbors = static_cast<int>(std::min<uint32_t>(r.params().neighbors(), 4096));
  }
  options->quantile = r.params().quantile();
  if (r.params().beam_width() > 0) {
    options->beam_width = static_cast<int>(std::min<uint32_t>(r.params().beam_width(), 1 << 20));
  }
  options->shuffle_batches = !r.params().keep_batch_order();
  *async = r.async();
  *dim = r.queries().cols();
  if (*dim == 0 || *dim > IndexOptions::kMaxDim) {
    return absl::InvalidArgumentError(absl::StrCat("queries.cols = ", *dim, " must be in [1, ",
                                                   IndexOptions::kMaxDim, "]"));
  }
  return absl::OkStatus();
}

absl::Status AppendExamples(const v1::AssignBatchesRequest& r, uint32_t dim, size_t message,
                            std::vector<float>* queries, std::vector<float>* positives) {
  absl::StatusOr<std::vector<float>> q = DecodeMatrix(r.queries(), "queries", dim);
  if (!q.ok()) return q.status();
  absl::StatusOr<std::vector<float>> p = DecodeMatrix(r.positives(), "positives", dim);
  if (!p.ok()) return p.status();
  if (r.queries().rows() != r.positives().rows()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "queries.rows = ", r.queries().rows(), " but positives.rows = ", r.positives().rows(),
        " (message ", message, "); every example needs both"));
  }
  queries->insert(queries->end(), q->begin(), q->end());
  positives->insert(positives->end(), p->begin(), p->end());
  return absl::OkStatus();
}

void ToWireBatches(const BatchAssignment& a, size_t num_examples, double seconds,
                   v1::AssignBatchesResponse* out) {
  for (const auto& batch : a.batches) {
    out->add_batches()->mutable_example_indices()->Add(batch.begin(), batch.end());
  }
  out->set_bandwidth_before(static_cast<double>(a.bandwidth_before));
  out->set_bandwidth_after(static_cast<double>(a.bandwidth_after));
  out->set_in_batch_similarity_before(a.in_batch_similarity_before);
  out->set_in_batch_similarity_after(a.in_batch_similarity_after);
  out->set_num_examples(num_examples);
  out->set_edges(a.edges);
  out->set_components(a.components);
  out->set_seconds(seconds);
}

void ToWireBatchJob(bool done, const absl::Status& status, double progress,
                    const v1::AssignBatchesResponse& result, v1::GetBatchJobResponse* out) {
  out->set_progress(progress);
  if (!done) {
    out->set_state(v1::JOB_STATE_RUNNING);
  } else if (status.ok()) {
    out->set_state(v1::JOB_STATE_DONE);
    *out->mutable_result() = result;
  } else {
    out->set_state(v1::JOB_STATE_FAILED);
    out->mutable_error()->set_code(static_cast<int>(status.code()));
    out->mutable_error()->set_message(std::string(status.message()));
  }
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
