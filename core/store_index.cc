#include "core/store_index.h"

#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>
#include <limits>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "core/parallel.h"
#include "core/random.h"
#include "core/status.h"
#include "core/tree/draw_rounds.h"

namespace negmine {

StoreIndex::StoreIndex(const IndexOptions& options)
    : options_(options), store_(options.dim) {
  store_.Reserve(options.initial_capacity);
}

IndexStats StoreIndex::Stats() const {
  absl::ReaderMutexLock lock(&mu_);
  size_t device_bytes = 0;
  if (device_) {
    absl::MutexLock device_lock(&device_mu_);
    device_bytes = device_->MemoryBytes();
  }
  return {.num_targets = store_.size(),
          .capacity_rows = store_.num_rows(),
          .memory_bytes = store_.MemoryBytes() +
                          (inv_norms_.capacity() + served_.capacity() +
                           frame_.capacity()) * sizeof(float) +
                          ExtraMemoryLocked(),
          .device_memory_bytes = device_bytes,
          .version = version_};
}

PointSource StoreIndex::Points() const {
  if (drift_active_) return {.data = served_.data(), .dim = options_.dim};
  return {.data = store_.data(),
          .scale = inv_norms_.empty() ? nullptr : inv_norms_.data(),
          .dim = options_.dim};
}

absl::Status StoreIndex::Upsert(absl::Span<const uint64_t> ids,
                                absl::Span<const float> vectors,
                                int64_t model_step) {
  const int dim = options_.dim;
  if (vectors.size() != ids.size() * dim) {
    return absl::InvalidArgumentError(
        absl::StrCat("vectors hold ", vectors.size(), " floats; ", ids.size(),
                     " ids x dim ", dim, " needs ", ids.size() * dim));
  }
  {
    absl::flat_hash_set<uint64_t> seen;
    seen.reserve(ids.size());
    for (size_t i = 0; i < ids.size(); ++i) {
      if (!seen.insert(ids[i]).second) {
        return absl::InvalidArgumentError(
            absl::StrCat("ids: duplicate id ", ids[i], " at position ", i));
      }
    }
  }
  RETURN_IF_ERROR(CheckFinite(vectors, dim, "vectors"));
  std::vector<float> inv(options_.metric == Metric::kCosine ? ids.size() : 0);
  for (size_t i = 0; i < inv.size(); ++i) {
    double sq = 0;
    for (int j = 0; j < dim; ++j) sq += double{vectors[i * dim + j]} * vectors[i * dim + j];
    inv[i] = static_cast<float>(1.0 / std::sqrt(sq));
    if (!std::isfinite(inv[i])) {
      return absl::InvalidArgumentError(
          absl::StrCat("vectors: row ", i, " (id ", ids[i],
                       ") has zero norm, which a cosine collection cannot "
                       "score"));
    }
  }

  absl::MutexLock write_lock(&write_mu_);
  if (device_) {
    // Room on the device first, so that running out of GPU memory changes
    // nothing (RESOURCE_EXHAUSTED).
    absl::MutexLock device_lock(&device_mu_);
    RETURN_IF_ERROR(device_->Reserve(store_.num_rows() + ids.size()));
  }
  // Once drift is active: the new rows' frame and served vectors, and their
  // offsets (see the header).
  std::vector<float> frame_rows, served_rows, offset_rows;
  if (drift_active_) {
    DriftRows(vectors, inv, model_step, &frame_rows, &served_rows, &offset_rows);
  }
  absl::WriterMutexLock lock(&mu_);
  std::vector<uint32_t> updated;
  for (uint64_t id : ids) {
    if (std::optional<size_t> row = store_.Row(id)) updated.push_back(*row);
  }
  store_.Upsert(ids, vectors, model_step);
  if (!inv.empty()) {
    inv_norms_.resize(store_.num_rows());
    for (size_t i = 0; i < ids.size(); ++i) {
      inv_norms_[*store_.Row(ids[i])] = inv[i];
    }
  }
  if (drift_active_) {
    frame_.resize(store_.num_rows() * dim);
    served_.resize(store_.num_rows() * dim);
    for (size_t i = 0; i < ids.size(); ++i) {
      const size_t row = *store_.Row(ids[i]);
      std::copy_n(frame_rows.data() + i * dim, dim, frame_.data() + row * dim);
      std::copy_n(served_rows.data() + i * dim, dim, served_.data() + row * dim);
      if (offset_rows.empty()) {
        offsets_.erase(row);
      } else {
        offsets_[row].assign(offset_rows.begin() + i * dim,
                             offset_rows.begin() + (i + 1) * dim);
      }
      if (model_step > LatestStep()) {
        pending_[row] = model_step;
      } else {
        pending_.erase(row);
      }
    }
  }
  std::vector<uint32_t> inserted;
  if (updated.size() < ids.size()) {
    absl::flat_hash_set<uint32_t> old(updated.begin(), updated.end());
    for (uint64_t id : ids) {
      const uint32_t row = static_cast<uint32_t>(*store_.Row(id));
      if (!old.contains(row)) inserted.push_back(row);
    }
  }
  OnUpsertLocked(inserted, updated);
  MarkDeviceRows(inserted);
  MarkDeviceRows(updated);
  ++version_;
  return absl::OkStatus();
}

absl::StatusOr<size_t> StoreIndex::Delete(absl::Span<const uint64_t> ids,
                                          bool allow_missing) {
  absl::MutexLock write_lock(&write_mu_);
  absl::WriterMutexLock lock(&mu_);
  if (!allow_missing) {
    for (uint64_t id : ids) {
      if (!store_.Row(id)) {
        return absl::NotFoundError(absl::StrCat("ids: unknown id ", id));
      }
    }
  }
  std::vector<uint32_t> rows;
  for (uint64_t id : ids) {
    std::optional<size_t> row = store_.Row(id);
    if (row && store_.Delete(id)) {
      rows.push_back(static_cast<uint32_t>(*row));
      offsets_.erase(*row);
      pending_.erase(*row);
    }
  }
  if (!rows.empty()) {
    OnDeleteLocked(rows);
    MarkDeviceRows(rows);
    ++version_;
  }
  return rows.size();
}

absl::Status StoreIndex::Get(absl::Span<const uint64_t> ids,
                             std::vector<float>* vectors,
                             std::vector<int64_t>* steps) const {
  const int dim = options_.dim;
  absl::ReaderMutexLock lock(&mu_);
  vectors->resize(ids.size() * dim);
  steps->resize(ids.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    std::optional<size_t> row = store_.Row(ids[i]);
    if (!row) return absl::NotFoundError(absl::StrCat("ids: unknown id ", ids[i]));
    std::copy_n(store_.vector(*row), dim, vectors->data() + i * dim);
    (*steps)[i] = store_.model_step(*row);
  }
  return absl::OkStatus();
}

absl::StatusOr<SearchResult> StoreIndex::Search(
    absl::Span<const float> queries,
    absl::Span<const std::vector<uint64_t>> exclude,
    const SearchParams& params) const {
  const int dim = options_.dim;
  if (queries.empty() || queries.size() % dim != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("queries hold ", queries.size(),
                     " floats, not a positive multiple of dim ", dim));
  }
  const size_t n = queries.size() / dim;
  if (!exclude.empty() && exclude.size() != n) {
    return absl::InvalidArgumentError(
        absl::StrCat("exclude has ", exclude.size(), " lists for ", n,
                     " queries; send none or one per query"));
  }
  RETURN_IF_ERROR(CheckFinite(queries, dim, "queries"));
  absl::ReaderMutexLock lock(&mu_);
  RETURN_IF_ERROR(ValidateSearchParams(params, store_.size()));
  std::optional<absl::StatusOr<SearchResult>> on_device;
  if (device_) on_device = DeviceSearchLocked(queries, n, exclude, params);
  absl::StatusOr<SearchResult> result = absl::UnknownError("no search ran");
  const size_t unit = params.work_unit_queries > 0 ? static_cast<size_t>(params.work_unit_queries)
                                                   : n;
  if (on_device.has_value()) {
    result = *std::move(on_device);
  } else if (n <= unit) {
    result = SearchLocked(queries, n, exclude, params);
  } else {
    // Work units, one after the other under this one read lock: a deadline
    // stops the batch within a unit, and scratch is that of one unit.
    SearchResult all;
    all.index_version = version_;
    all.queries.reserve(n);
    SearchParams unit_params = params;
    for (size_t begin = 0; begin < n; begin += unit) {
      RETURN_IF_ERROR(CheckCancelled(params));
      const size_t m = std::min(unit, n - begin);
      unit_params.stream_offset = params.stream_offset + begin;
      ASSIGN_OR_RETURN(
          SearchResult part,
          SearchLocked(queries.subspan(begin * dim, m * dim), m,
                       exclude.empty() ? exclude : exclude.subspan(begin, m), unit_params));
      for (QueryResult& q : part.queries) all.queries.push_back(std::move(q));
    }
    result = std::move(all);
  }
  if (!result.ok() || result->queries.size() != n) return result;
  // Under the same lock as the search, so that the count is of its version.
  absl::flat_hash_set<uint64_t> live_excluded;
  for (size_t i = 0; i < n; ++i) {
    live_excluded.clear();
    if (!exclude.empty()) {
      for (uint64_t id : exclude[i]) {
        if (store_.Row(id).has_value()) live_excluded.insert(id);
      }
    }
    result->queries[i].num_eligible = store_.size() - live_excluded.size();
  }
  return result;
}

}  // namespace negmine

// ------------------------------------------------------------------ drift

namespace negmine {
namespace {

double Seconds(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - since)
      .count();
}

}  // namespace

absl::Status StoreIndex::GetScored(absl::Span<const uint64_t> ids,
                                   std::vector<float>* vectors) const {
  const int dim = options_.dim;
  absl::ReaderMutexLock lock(&mu_);
  const PointSource points = Points();
  vectors->resize(ids.size() * dim);
  for (size_t i = 0; i < ids.size(); ++i) {
    std::optional<size_t> row = store_.Row(ids[i]);
    if (!row) return absl::NotFoundError(absl::StrCat("ids: unknown id ", ids[i]));
    points.Get(static_cast<uint32_t>(*row), vectors->data() + i * dim);
  }
  return absl::OkStatus();
}

int StoreIndex::NumLandmarks() const {
  return options_.drift.num_landmarks > 0 ? options_.drift.num_landmarks
                                          : std::max(64, 4 * options_.dim);
}

std::vector<float> StoreIndex::ScoringCopy() const {
  const int dim = options_.dim;
  std::vector<float> out(store_.num_rows() * dim);
  const PointSource points = Points();
  for (uint32_t r = 0; r < store_.num_rows(); ++r) points.Get(r, out.data() + size_t{r} * dim);
  return out;
}

void StoreIndex::DriftRows(absl::Span<const float> vectors,
                           absl::Span<const float> inv, int64_t step,
                           std::vector<float>* frame_rows,
                           std::vector<float>* served_rows,
                           std::vector<float>* offset_rows) const {
  const int dim = options_.dim;
  const size_t n = vectors.size() / dim, total = vectors.size();
  frame_rows->assign(vectors.begin(), vectors.end());
  for (size_t i = 0; i < inv.size(); ++i) {
    for (int j = 0; j < dim; ++j) (*frame_rows)[i * dim + j] *= inv[i];
  }
  // served = x + corr_latest(x) - corr_s(x), offset = -corr_s(x); a step at
  // or beyond the latest update is served as sent, with offset
  // -corr_latest(x) (pending if beyond).
  std::vector<float> corr_latest(total, 0.0f);
  if (!history_.empty()) {
    history_.back().second->Apply(frame_rows->data(), n, /*normalize=*/false,
                                  corr_latest.data());
    for (size_t i = 0; i < total; ++i) corr_latest[i] -= (*frame_rows)[i];
  }
  const bool past = step < LatestStep();
  std::vector<float> corr_s = corr_latest;
  if (past) CorrectionAt(step, frame_rows->data(), n, corr_s.data());
  *served_rows = *frame_rows;
  offset_rows->resize(total);
  for (size_t i = 0; i < total; ++i) (*offset_rows)[i] = -corr_s[i];
  if (past) {
    for (size_t i = 0; i < total; ++i) (*served_rows)[i] += corr_latest[i] - corr_s[i];
    if (options_.metric == Metric::kCosine) NormalizeRows(served_rows->data(), n, dim);
  }
  if (std::all_of(offset_rows->begin(), offset_rows->end(), [](float v) { return v == 0; })) {
    offset_rows->clear();
  }
}

void StoreIndex::CorrectionAt(int64_t step, const float* x, size_t n,
                              float* out) const {
  const size_t total = n * options_.dim;
  // corr of the i-th anchor: (s_F, 0), then the updates.
  auto corr = [&](size_t i, float* dst) {
    if (i == 0) {
      std::fill_n(dst, total, 0.0f);
      return;
    }
    history_[i - 1].second->Apply(x, n, /*normalize=*/false, dst);
    for (size_t j = 0; j < total; ++j) dst[j] -= x[j];
  };
  auto anchor_step = [&](size_t i) { return i == 0 ? frame_step_ : history_[i - 1].first; };
  const size_t anchors = history_.size() + 1;
  size_t a = 0;
  while (a + 1 < anchors && anchor_step(a + 1) <= step) ++a;
  corr(a, out);
  if (a + 1 == anchors || step <= anchor_step(a)) return;
  const double alpha = static_cast<double>(step - anchor_step(a)) /
                       static_cast<double>(anchor_step(a + 1) - anchor_step(a));
  std::vector<float> next(total);
  corr(a + 1, next.data());
  for (size_t j = 0; j < total; ++j) {
    out[j] = static_cast<float>((1 - alpha) * out[j] + alpha * next[j]);
  }
}

absl::Status StoreIndex::ChooseLandmarks() {
  const int dim = options_.dim;
  absl::ReaderMutexLock lock(&mu_);
  // Landmarks come from the rows whose frame vector is at the frame's step:
  // a target re-encoded since then would show only part of the drift.
  int64_t min_step = std::numeric_limits<int64_t>::max();
  for (uint32_t r = 0; r < store_.num_rows(); ++r) {
    if (store_.live(r)) min_step = std::min(min_step, store_.model_step(r));
  }
  std::vector<uint32_t> live, reencoded;
  live.reserve(store_.size());
  for (uint32_t r = 0; r < store_.num_rows(); ++r) {
    if (!store_.live(r)) continue;
    const bool at_frame = drift_active_
                              ? !offsets_.contains(r) && !pending_.contains(r)
                              : store_.model_step(r) == min_step;
    (at_frame ? live : reencoded).push_back(r);
  }
  if (live.size() + reencoded.size() == 0) {
    return absl::FailedPreconditionError(
        "the collection is empty: upsert targets before drift updates");
  }
  if (live.size() < size_t(NumLandmarks())) {
    live.insert(live.end(), reencoded.begin(), reencoded.end());
  }
  const int m = static_cast<int>(std::min<size_t>(NumLandmarks(), live.size()));
  // k-means++ over a uniform sample of 16 candidates per landmark.
  const uint64_t epoch = landmarks_.epoch + 1;
  Rng rng(options_.drift.seed, epoch);
  const size_t sample = std::min(live.size(), std::max<size_t>(16 * size_t(m), 4096));
  for (size_t i = 0; i < sample; ++i) {
    std::swap(live[i], live[i + rng.Below(live.size() - i)]);
  }
  std::vector<float> x(sample * dim);
  const PointSource points = Points();
  for (size_t i = 0; i < sample; ++i) points.Get(live[i], x.data() + i * dim);
  const std::vector<size_t> chosen =
      KMeansPlusPlus(x.data(), sample, dim, m, Mix64(options_.drift.seed + epoch));
  landmarks_.ids.clear();
  landmark_frame_.resize(m, dim);
  for (int i = 0; i < m; ++i) {
    landmarks_.ids.push_back(store_.id(live[chosen[i]]));
    std::copy_n(x.data() + chosen[i] * dim, dim, landmark_frame_.row(i).data());
  }
  landmarks_.epoch = epoch;
  return absl::OkStatus();
}

absl::StatusOr<LandmarkSet> StoreIndex::GetLandmarks() {
  absl::MutexLock write_lock(&write_mu_);
  if (landmarks_.epoch != 0) return landmarks_;
  RETURN_IF_ERROR(ChooseLandmarks());
  absl::WriterMutexLock lock(&mu_);
  drift_summary_.landmark_epoch = landmarks_.epoch;
  drift_summary_.num_landmarks = landmarks_.ids.size();
  LandmarkSet out = landmarks_;
  out.chosen = true;
  return out;
}

std::vector<float> StoreIndex::Materialize(
    int64_t step, const DriftModel& model,
    std::vector<std::pair<uint32_t, std::vector<float>>>* resolved) const {
  const int dim = options_.dim;
  const size_t rows = frame_.size() / dim;
  std::vector<float> served(frame_.size());
  bool done = false;
  if (device_ && !model.is_identity()) {
    // The bulk correction, two GEMMs over every row, on the GPU; on any
    // device failure the host computes the same.
    const DeviceDriftModel m{.kernel = static_cast<int>(model.kernel),
                             .width = model.width,
                             .center = model.center,
                             .landmarks = model.landmarks.data(),
                             .coef = model.coef.data(),
                             .m = static_cast<size_t>(model.landmarks.rows())};
    absl::MutexLock device_lock(&device_mu_);
    done = device_->CorrectRows(m, frame_.data(), rows, served.data()).ok();
  }
  if (!done) model.Apply(frame_.data(), rows, /*normalize=*/false, served.data());
  for (const auto& [row, offset] : offsets_) {
    if (pending_.contains(row)) continue;
    for (int j = 0; j < dim; ++j) served[size_t{row} * dim + j] += offset[j];
  }
  // A pending row at step s, with offset o = -corr_last(x): served
  // x + (1 - alpha) (corr_t(x) + o), and its new offset -corr_s(x) =
  // (1 - alpha) o - alpha corr_t(x), alpha = (s - last) / (t - last) <= 1.
  const int64_t last = LatestStep();
  std::vector<float> x(dim);
  for (const auto& [row, s] : pending_) {
    const double alpha = step > last ? std::min(1.0, double(s - last) / double(step - last)) : 1.0;
    auto it = offsets_.find(row);
    std::vector<float> o = it == offsets_.end() ? std::vector<float>(dim, 0.0f) : it->second;
    float* out = served.data() + size_t{row} * dim;
    const float* xr = frame_.data() + size_t{row} * dim;
    for (int j = 0; j < dim; ++j) {
      const double corr_t = double{out[j]} - xr[j];
      out[j] = static_cast<float>(xr[j] + (1 - alpha) * (corr_t + o[j]));
      o[j] = static_cast<float>((1 - alpha) * o[j] - alpha * corr_t);
    }
    resolved->emplace_back(row, std::move(o));
  }
  if (options_.metric == Metric::kCosine) NormalizeRows(served.data(), rows, dim);
  return served;
}

void StoreIndex::InstallServed(std::vector<float> served) {
  {
    absl::ReaderMutexLock lock(&mu_);
    PrepareDrift({.data = served.data(), .dim = options_.dim});
  }
  absl::WriterMutexLock lock(&mu_);
  served_.swap(served);
  drift_active_ = true;
  OnDriftLocked();
  MarkDeviceAll();
  ++version_;
}

void StoreIndex::Rebase() {
  std::vector<float> frame = served_;
  {
    absl::WriterMutexLock lock(&mu_);
    frame_.swap(frame);
  }
  offsets_.clear();
  history_.clear();
  frame_step_ = drift_summary_.step;
  // Rows from beyond the new frame's step stay pending, served as sent.
  absl::erase_if(pending_, [&](const auto& p) { return p.second <= frame_step_; });
  // Cannot fail: the collection was not empty for the update.
  ChooseLandmarks().IgnoreError();
  OnRebase();
  absl::WriterMutexLock lock(&mu_);
  ++drift_summary_.rebases;
  drift_summary_.landmark_epoch = landmarks_.epoch;
  drift_summary_.num_landmarks = landmarks_.ids.size();
}

absl::StatusOr<DriftReport> StoreIndex::ApplyDrift(const DriftUpdate& update) {
  const int dim = options_.dim;
  const bool has_landmarks = !update.landmark_embeddings.empty();
  const bool has_map = !update.linear_a.empty() || !update.linear_b.empty();
  if (has_landmarks == has_map) {
    return absl::InvalidArgumentError(
        "a drift update carries either landmark embeddings or a linear map, "
        "not both and not neither");
  }
  absl::MutexLock write_lock(&write_mu_);
  if (store_.size() == 0) {
    return absl::FailedPreconditionError(
        "the collection is empty: upsert targets before drift updates");
  }
  if (drift_active_ && update.model_step < drift_summary_.step) {
    return absl::FailedPreconditionError(
        absl::StrCat("model_step ", update.model_step,
                     " is below the last drift update's step ",
                     drift_summary_.step, "; steps must not go backwards"));
  }
  if (has_map) return ApplyLinearMap(update);

  if (landmarks_.epoch == 0) {
    return absl::FailedPreconditionError(
        "no landmark set yet: call GetLandmarks and re-encode those targets");
  }
  if (update.landmark_epoch != landmarks_.epoch) {
    return absl::FailedPreconditionError(absl::StrCat(
        "landmark_epoch ", update.landmark_epoch, " is not the current set's (",
        landmarks_.epoch, "; it changes at every re-base): call GetLandmarks "
        "again and re-encode those targets"));
  }
  const size_t m = landmarks_.ids.size();
  if (update.landmark_embeddings.size() != m * dim) {
    return absl::InvalidArgumentError(absl::StrCat(
        "landmark_embeddings hold ", update.landmark_embeddings.size(),
        " floats (", update.landmark_embeddings.size() / dim, " rows of dim ", dim,
        "); the set has ", m, " landmarks, so ", m * dim, " are needed"));
  }
  RETURN_IF_ERROR(CheckFinite(update.landmark_embeddings, dim, "landmark_embeddings"));
  RowMatrixF current =
      Eigen::Map<const RowMatrixF>(update.landmark_embeddings.data(), m, dim);
  const bool cosine = options_.metric == Metric::kCosine;
  if (cosine) {
    for (size_t i = 0; i < m; ++i) {
      if (current.row(i).squaredNorm() == 0) {
        return absl::InvalidArgumentError(absl::StrCat(
            "landmark_embeddings: row ", i, " (id ", landmarks_.ids[i],
            ") has zero norm, which a cosine collection cannot score"));
      }
    }
    NormalizeRows(current.data(), m, dim);
  }

  auto start = std::chrono::steady_clock::now();
  ASSIGN_OR_RETURN(DriftFit fit, FitDrift(landmark_frame_, current, cosine));
  const double fit_seconds = Seconds(start);
  start = std::chrono::steady_clock::now();
  auto model = std::make_shared<const DriftModel>(std::move(fit.model));
  if (!drift_active_) {
    // The frame is the stored vectors, at the lowest step among them;
    // targets stored at a later step are pending.
    std::vector<float> frame;
    {
      absl::ReaderMutexLock lock(&mu_);
      frame = ScoringCopy();
      frame_step_ = update.model_step;
      for (uint32_t r = 0; r < store_.num_rows(); ++r) {
        if (store_.live(r)) frame_step_ = std::min(frame_step_, store_.model_step(r));
      }
      pending_.clear();
      for (uint32_t r = 0; r < store_.num_rows(); ++r) {
        if (store_.live(r) && store_.model_step(r) > frame_step_) {
          pending_[r] = store_.model_step(r);
        }
      }
    }
    absl::WriterMutexLock lock(&mu_);
    frame_.swap(frame);
  }
  std::vector<std::pair<uint32_t, std::vector<float>>> resolved;
  InstallServed(Materialize(update.model_step, *model, &resolved));
  for (auto& [row, offset] : resolved) {
    if (pending_[row] <= update.model_step) pending_.erase(row);
    offsets_[row] = std::move(offset);
  }
  history_.emplace_back(update.model_step, model);
  if (history_.size() > kHistory) history_.pop_front();
  const double apply_seconds = Seconds(start);

  DriftReport report{.heldout_residual = fit.heldout_residual,
                     .stale_residual = fit.stale_residual,
                     .kernel = DriftKernelName(model->kernel),
                     .lambda = model->lambda,
                     .fit_seconds = fit_seconds,
                     .apply_seconds = apply_seconds};
  {
    absl::WriterMutexLock lock(&mu_);
    DriftSummary& s = drift_summary_;
    s.active = true;
    s.step = update.model_step;
    s.kernel = report.kernel;
    s.lambda = report.lambda;
    s.heldout_residual = report.heldout_residual;
    s.stale_residual = report.stale_residual;
    ++s.updates;
    s.last_fit_seconds = fit_seconds;
    s.last_apply_seconds = apply_seconds;
  }
  const IndexOptions::Drift& opt = options_.drift;
  if ((opt.rebase_residual > 0 && fit.heldout_residual > opt.rebase_residual) ||
      (opt.rebase_every_steps > 0 &&
       update.model_step - frame_step_ >= opt.rebase_every_steps)) {
    Rebase();
    report.rebased = true;
  }
  absl::ReaderMutexLock lock(&mu_);
  report.landmark_epoch = landmarks_.epoch;
  report.index_version = version_;
  return report;
}

absl::StatusOr<DriftReport> StoreIndex::ApplyLinearMap(const DriftUpdate& update) {
  const int dim = options_.dim;
  const size_t d = dim;
  if (update.linear_a.size() != d * d) {
    return absl::InvalidArgumentError(
        absl::StrCat("linear_map.a holds ", update.linear_a.size(),
                     " floats; dim x dim needs ", d * d));
  }
  if (!update.linear_b.empty() && update.linear_b.size() != d) {
    return absl::InvalidArgumentError(
        absl::StrCat("linear_map.b holds ", update.linear_b.size(),
                     " floats; it needs dim = ", d, " (or none)"));
  }
  RETURN_IF_ERROR(CheckFinite(update.linear_a, dim, "linear_map.a"));
  RETURN_IF_ERROR(CheckFinite(update.linear_b, dim, "linear_map.b"));
  const auto start = std::chrono::steady_clock::now();
  Eigen::Map<const RowMatrixF> a(update.linear_a.data(), d, d);
  std::vector<float> served;
  {
    absl::ReaderMutexLock lock(&mu_);
    served = ScoringCopy();
  }
  const size_t rows = served.size() / d;
  Eigen::Map<RowMatrixF> x(served.data(), rows, d);
  x = x * a.transpose();  // row form of new = a old
  if (!update.linear_b.empty()) {
    x.rowwise() += Eigen::Map<const Eigen::RowVectorXf>(update.linear_b.data(), d);
  }
  if (options_.metric == Metric::kCosine) {
    absl::ReaderMutexLock lock(&mu_);
    for (uint32_t r = 0; r < rows; ++r) {
      if (store_.live(r) && x.row(r).squaredNorm() == 0) {
        return absl::InvalidArgumentError(absl::StrCat(
            "linear_map sends target ", store_.id(r),
            " to zero, which a cosine collection cannot score"));
      }
    }
    NormalizeRows(served.data(), rows, dim);
  }
  InstallServed(std::move(served));
  {
    absl::WriterMutexLock lock(&mu_);
    drift_summary_.active = true;
    drift_summary_.step = update.model_step;
    drift_summary_.kernel = "linear_map";
    drift_summary_.lambda = 0;
    drift_summary_.heldout_residual = 0;
    drift_summary_.stale_residual = 0;
    ++drift_summary_.updates;
    drift_summary_.last_fit_seconds = 0;
  }
  Rebase();
  const double seconds = Seconds(start);
  absl::WriterMutexLock lock(&mu_);
  drift_summary_.last_apply_seconds = seconds;
  return DriftReport{.kernel = "linear_map",
                     .rebased = true,
                     .landmark_epoch = landmarks_.epoch,
                     .index_version = version_,
                     .apply_seconds = seconds};
}

DriftSummary StoreIndex::DriftInfo() const {
  absl::ReaderMutexLock lock(&mu_);
  DriftSummary s = drift_summary_;
  if (s.active) {
    s.staleness_histogram.assign(5, 0);
    for (uint32_t r = 0; r < store_.num_rows(); ++r) {
      if (!store_.live(r)) continue;
      const int64_t age = s.step - store_.model_step(r);
      const size_t bucket = age <= 0 ? 0 : age < 10 ? 1 : age < 100 ? 2 : age < 1000 ? 3 : 4;
      ++s.staleness_histogram[bucket];
    }
  }
  return s;
}

}  // namespace negmine

// ---------------------------------------------------------------- snapshot

namespace negmine {
namespace {

constexpr uint8_t kSnapshotVersion = 1;

void PutMatrix(const RowMatrixF& m, ByteWriter& w) {
  w.Put<uint64_t>(m.rows());
  w.Put<uint64_t>(m.cols());
  w.PutArray(m.data(), m.size());
}

bool GetMatrix(ByteReader& r, RowMatrixF* m) {
  uint64_t rows = 0, cols = 0;
  std::vector<float> v;
  if (!r.Get(&rows) || !r.Get(&cols) || !r.GetArray(&v)) return false;
  const bool fits = rows <= INT32_MAX && cols <= INT32_MAX &&
                    ((rows == 0 || cols == 0) ? v.empty()
                                              : rows <= v.size() / cols && rows * cols == v.size());
  if (!fits) return false;
  *m = Eigen::Map<const RowMatrixF>(v.data(), rows, cols);
  return true;
}

// DriftSummary::kernel points at one of these names.
const char* KernelNameFromString(const std::string& s) {
  for (DriftKernel k : {DriftKernel::kNone, DriftKernel::kLinear, DriftKernel::kGaussian,
                        DriftKernel::kExpInner}) {
    if (s == DriftKernelName(k)) return DriftKernelName(k);
  }
  return s == "linear_map" ? "linear_map" : nullptr;
}

}  // namespace

absl::StatusOr<std::string> StoreIndex::Snapshot() const {
  absl::MutexLock write_lock(&write_mu_);
  absl::ReaderMutexLock lock(&mu_);
  ByteWriter w;
  w.Put<uint8_t>(kSnapshotVersion);
  store_.Save(w);
  w.PutArray(inv_norms_);
  w.Put<uint64_t>(version_);
  w.Put<uint8_t>(drift_active_ ? 1 : 0);
  w.PutArray(served_);
  w.PutArray(frame_);
  w.Put<uint64_t>(offsets_.size());
  for (const auto& [row, offset] : offsets_) {
    w.Put<uint32_t>(row);
    w.PutArray(offset);
  }
  w.Put<uint64_t>(pending_.size());
  for (const auto& [row, step] : pending_) {
    w.Put<uint32_t>(row);
    w.Put<int64_t>(step);
  }
  w.PutArray(landmarks_.ids);
  w.Put<uint64_t>(landmarks_.epoch);
  PutMatrix(landmark_frame_, w);
  w.Put<int64_t>(frame_step_);
  w.Put<uint64_t>(history_.size());
  for (const auto& [step, m] : history_) {
    w.Put<int64_t>(step);
    w.Put<uint8_t>(static_cast<uint8_t>(m->kernel));
    w.Put<float>(m->width);
    w.Put<float>(m->center);
    w.Put<double>(m->lambda);
    PutMatrix(m->landmarks, w);
    PutMatrix(m->coef, w);
  }
  const DriftSummary& d = drift_summary_;
  w.Put<uint8_t>(d.active ? 1 : 0);
  w.Put<int64_t>(d.step);
  w.Put<uint64_t>(d.landmark_epoch);
  w.Put<uint64_t>(d.num_landmarks);
  w.PutString(d.kernel);
  w.Put<double>(d.lambda);
  w.Put<double>(d.heldout_residual);
  w.Put<double>(d.stale_residual);
  w.Put<uint64_t>(d.updates);
  w.Put<uint64_t>(d.rebases);
  w.Put<double>(d.last_fit_seconds);
  w.Put<double>(d.last_apply_seconds);
  SaveExtraLocked(w);
  return std::move(w.bytes());
}

absl::Status StoreIndex::Restore(std::string_view snapshot) {
  const int dim = options_.dim;
  ByteReader r(snapshot);
  EmbeddingStore store(dim);
  std::vector<float> inv_norms, served, frame;
  uint64_t version = 0, count = 0;
  uint8_t format = 0, active = 0;
  bool ok = r.Get(&format) && format == kSnapshotVersion && store.Load(r) &&
            r.GetArray(&inv_norms) && r.Get(&version) && r.Get(&active) && active <= 1 &&
            r.GetArray(&served) && r.GetArray(&frame) && r.Get(&count);
  const size_t rows = store.num_rows();
  ok = ok && (options_.metric == Metric::kCosine ? inv_norms.size() >= store.size()
                                                 : inv_norms.empty()) &&
       inv_norms.size() <= rows &&
       (active ? served.size() == rows * dim && frame.size() == rows * dim
               : served.empty() && frame.empty());
  absl::flat_hash_map<uint32_t, std::vector<float>> offsets;
  for (uint64_t i = 0; ok && i < count; ++i) {
    uint32_t row = 0;
    std::vector<float> v;
    ok = r.Get(&row) && r.GetArray(&v) && row < rows && v.size() == size_t(dim);
    if (ok) offsets[row] = std::move(v);
  }
  absl::flat_hash_map<uint32_t, int64_t> pending;
  ok = ok && r.Get(&count);
  for (uint64_t i = 0; ok && i < count; ++i) {
    uint32_t row = 0;
    int64_t step = 0;
    ok = r.Get(&row) && r.Get(&step) && row < rows;
    if (ok) pending[row] = step;
  }
  LandmarkSet landmarks;
  RowMatrixF landmark_frame;
  int64_t frame_step = 0;
  ok = ok && r.GetArray(&landmarks.ids) && r.Get(&landmarks.epoch) &&
       GetMatrix(r, &landmark_frame) && r.Get(&frame_step) && r.Get(&count) &&
       (landmarks.ids.empty() || (landmark_frame.rows() == Eigen::Index(landmarks.ids.size()) &&
                                  landmark_frame.cols() == dim));
  std::deque<std::pair<int64_t, std::shared_ptr<const DriftModel>>> history;
  for (uint64_t i = 0; ok && i < count; ++i) {
    auto m = std::make_shared<DriftModel>();
    int64_t step = 0;
    uint8_t kernel = 0;
    ok = r.Get(&step) && r.Get(&kernel) && kernel <= 3 && r.Get(&m->width) &&
         r.Get(&m->center) && r.Get(&m->lambda) && GetMatrix(r, &m->landmarks) &&
         GetMatrix(r, &m->coef) && m->landmarks.cols() == dim &&
         (kernel == 0 ? m->coef.size() == 0
                      : m->coef.rows() == m->landmarks.rows() && m->coef.cols() == dim);
    m->kernel = static_cast<DriftKernel>(kernel);
    history.emplace_back(step, std::move(m));
  }
  DriftSummary d;
  uint8_t summary_active = 0;
  std::string kernel;
  ok = ok && r.Get(&summary_active) && r.Get(&d.step) && r.Get(&d.landmark_epoch) &&
       r.Get(&d.num_landmarks) && r.GetString(&kernel) && r.Get(&d.lambda) &&
       r.Get(&d.heldout_residual) && r.Get(&d.stale_residual) && r.Get(&d.updates) &&
       r.Get(&d.rebases) && r.Get(&d.last_fit_seconds) && r.Get(&d.last_apply_seconds) &&
       (d.kernel = KernelNameFromString(kernel)) != nullptr;
  d.active = summary_active != 0;
  if (!ok) {
    return absl::DataLossError(absl::StrCat(
        "an index snapshot of ", snapshot.size(),
        " bytes does not parse or is inconsistent with the collection (dim ", dim, ")"));
  }
  absl::MutexLock write_lock(&write_mu_);
  absl::WriterMutexLock lock(&mu_);
  uint8_t was_active = drift_active_ ? 1 : 0;
  auto swap_all = [&] {
    std::swap(store_, store);
    std::swap(inv_norms_, inv_norms);
    std::swap(version_, version);
    std::swap(was_active, active);
    drift_active_ = was_active != 0;
    std::swap(served_, served);
    std::swap(frame_, frame);
    std::swap(offsets_, offsets);
    std::swap(pending_, pending);
    std::swap(landmarks_, landmarks);
    std::swap(landmark_frame_, landmark_frame);
    std::swap(frame_step_, frame_step);
    std::swap(history_, history);
    std::swap(drift_summary_, d);
  };
  swap_all();
  if (!RestoreExtraLocked(r)) {
    swap_all();  // back to the state before: an index never serves half a snapshot
    return absl::DataLossError(absl::StrCat(
        "an index snapshot of ", snapshot.size(),
        " bytes does not parse: its structure part is damaged or does not fit"));
  }
  MarkDeviceAll();
  return absl::OkStatus();
}

}  // namespace negmine

// ------------------------------------------------------------------ device

namespace negmine {

void StoreIndex::MarkDeviceRows(absl::Span<const uint32_t> rows) {
  if (!device_ || rows.empty()) return;
  absl::MutexLock lock(&device_mu_);
  device_dirty_.insert(device_dirty_.end(), rows.begin(), rows.end());
}

void StoreIndex::MarkDeviceAll() {
  if (!device_) return;
  absl::MutexLock lock(&device_mu_);
  device_all_dirty_ = true;
  device_dirty_.clear();
}

absl::Status StoreIndex::SyncDeviceLocked() const {
  const size_t rows = store_.num_rows();
  const bool all = device_all_dirty_;
  if (all) {
    RETURN_IF_ERROR(device_->SetAll(Points(), rows, store_.live_flags(), store_.row_ids()));
    device_all_dirty_ = false;
    device_dirty_.clear();
  } else if (!device_dirty_.empty()) {
    std::sort(device_dirty_.begin(), device_dirty_.end());
    device_dirty_.erase(std::unique(device_dirty_.begin(), device_dirty_.end()),
                        device_dirty_.end());
    RETURN_IF_ERROR(device_->Reserve(rows));
    RETURN_IF_ERROR(device_->SetRows(Points(), device_dirty_, store_.live_flags(),
                                             store_.row_ids()));
    device_dirty_.clear();
  }
  device_->SetNumRows(rows);
  return SyncDeviceTreeLocked(*device_, all);
}

std::optional<absl::StatusOr<SearchResult>> StoreIndex::DeviceSearchLocked(
    absl::Span<const float> queries, size_t n,
    absl::Span<const std::vector<uint64_t>> exclude, const SearchParams& params) const {
  const bool sampling = params.mode != MineMode::kTopK;
  const bool tree = options_.kind == IndexKind::kTree;
  // SAMPLE on a tree: the proposal sampler (DeviceMirror::Propose); else
  // Gumbel-top-k over a scan, exact and without replacement only.
  const bool proposal = sampling && tree && params.sampler == Sampler::kProposal;
  if (sampling && params.with_replacement && !proposal) return std::nullopt;  // host only
  const bool beam = !sampling && params.approximate && tree;
  const size_t num_hard = params.mode == MineMode::kTopK    ? params.k
                          : params.mode == MineMode::kMixed ? params.num_hard
                                                            : 0;
  const size_t num_samples = sampling ? params.k - num_hard : 0;
  size_t max_exclude = 0;
  for (const auto& e : exclude) max_exclude = std::max(max_exclude, e.size());
  const size_t num_top = params.rank_offset + num_hard;
  // A scan masks exclusions on the device; a beam asks for more and filters.
  if (num_top + (beam ? max_exclude : 0) > size_t{DeviceMirror::kMaxK} ||
      (!proposal && num_samples > size_t{DeviceMirror::kMaxK})) {
    return std::nullopt;
  }

  const int dim = options_.dim;
  std::vector<float> normalized;
  if (options_.metric == Metric::kCosine) {
    normalized.assign(queries.begin(), queries.end());
    NormalizeRows(normalized.data(), n, dim);
    queries = normalized;
  }
  DeviceMirror::ScanParams scan;
  scan.inv_tau = static_cast<float>(1.0 / params.temperature);
  scan.seed = Mix64(params.seed);
  // Per query: the rows excluded by the caller, then the rank window's; and
  // the top part (MIXED's hard results, excluded from its samples). Only
  // built when some later pass or filter needs them.
  const bool track = !exclude.empty() || params.rank_offset > 0 || num_samples > 0 ||
                     params.want_log_z;
  std::vector<std::vector<uint32_t>> excluded(track ? n : 0), hard(track ? n : 0);
  for (size_t i = 0; i < exclude.size(); ++i) {
    for (uint64_t id : exclude[i]) {
      if (std::optional<size_t> row = store_.Row(id)) {
        excluded[i].push_back(static_cast<uint32_t>(*row));
      }
    }
  }
  auto set_exclusions = [&](DeviceMirror::ScanParams* p, bool with_hard) {
    p->exclude_offsets.assign(1, 0);
    p->exclude_rows.clear();
    for (size_t i = 0; i < n; ++i) {
      p->exclude_rows.insert(p->exclude_rows.end(), excluded[i].begin(), excluded[i].end());
      if (with_hard) p->exclude_rows.insert(p->exclude_rows.end(), hard[i].begin(), hard[i].end());
      p->exclude_offsets.push_back(static_cast<uint32_t>(p->exclude_rows.size()));
    }
  };
  // The valid hits of query i (of k per query), moved to the front of its
  // block and sorted by `before`; returns their number.
  auto take = [&](std::vector<DeviceHit>& hits, size_t i, size_t k, auto before) {
    DeviceHit* h = hits.data() + i * k;
    DeviceHit* end = std::remove_if(
        h, h + k, [](const DeviceHit& x) { return x.row == DeviceMirror::kNoRow; });
    std::sort(h, end, before);
    return static_cast<size_t>(end - h);
  };
  auto by_score = [](const DeviceHit& a, const DeviceHit& b) {
    return a.score > b.score || (a.score == b.score && a.id < b.id);
  };
  auto by_key = [](const DeviceHit& a, const DeviceHit& b) {
    return a.key > b.key || (a.key == b.key && a.id < b.id);
  };

  absl::MutexLock device_lock(&device_mu_);
  if (absl::Status s = SyncDeviceLocked(); !s.ok()) return s;
  if (absl::Status s = CheckCancelled(params); !s.ok()) return s;
  SearchResult result;
  result.index_version = version_;
  result.queries.resize(n);
  std::vector<DeviceHit> hits;

  // 1. The top part: rank window + hard results.
  if (num_top > 0) {
    absl::Status s;
    size_t k = num_top;
    if (beam) {
      k += max_exclude;
      const int width = params.beam_width > 0 ? params.beam_width : 128;
      s = device_->Beam(queries, n, width, static_cast<int>(k), &hits);
    } else {
      DeviceMirror::ScanParams p = scan;
      p.k = static_cast<int>(k);
      if (!exclude.empty()) set_exclusions(&p, false);
      s = device_->Scan(queries, n, p, &hits, nullptr);
    }
    if (!s.ok()) return s;
    ParallelFor(n, 256, [&](size_t begin, size_t end) {
      for (size_t i = begin; i < end; ++i) {
        DeviceHit* h = hits.data() + i * k;
        if (beam && track && !excluded[i].empty()) {
          absl::flat_hash_set<uint32_t> drop(excluded[i].begin(), excluded[i].end());
          for (size_t j = 0; j < k; ++j) {
            if (drop.contains(h[j].row)) h[j].row = DeviceMirror::kNoRow;
          }
        }
        const size_t got = std::min(take(hits, i, k, by_score), num_top);
        QueryResult& out = result.queries[i];
        const size_t skipped = std::min<size_t>(params.rank_offset, got);
        out.ids.reserve(params.k);
        out.scores.reserve(params.k);
        out.log_q.reserve(params.k);
        for (size_t j = skipped; j < got; ++j) {
          out.ids.push_back(h[j].id);
          out.scores.push_back(h[j].score);
          out.log_q.push_back(0.0f);
        }
        out.num_top = static_cast<int>(got - skipped);
        if (track) {
          for (size_t j = 0; j < skipped; ++j) excluded[i].push_back(h[j].row);
          for (size_t j = skipped; j < got; ++j) hard[i].push_back(h[j].row);
        }
      }
    });
  }
  if (absl::Status s = CheckCancelled(params); !s.ok()) return s;

  // 2. log Z over the eligible rows (the rank window excluded), when asked
  // for and not given by the sampling pass below.
  std::vector<double> log_z;
  const bool own_log_z_pass =
      params.want_log_z && (num_samples == 0 || num_hard > 0 || proposal);
  if (own_log_z_pass) {
    DeviceMirror::ScanParams p = scan;
    p.k = 1;
    p.want_log_z = true;
    set_exclusions(&p, false);
    std::vector<DeviceHit> unused;
    if (absl::Status s = device_->Scan(queries, n, p, &unused, &log_z); !s.ok()) return s;
    for (size_t i = 0; i < n; ++i) {
      result.queries[i].log_z_lo = result.queries[i].log_z_hi = log_z[i];
    }
  }

  // 3. Samples from the tree's proposal, in rounds as on the CPU.
  if (num_samples > 0 && proposal) {
    // Per query: the rows not eligible (excluded, or in the top part).
    std::vector<std::vector<uint32_t>> ineligible(n);
    DrawRounds rounds(n, params.with_replacement);
    for (size_t i = 0; i < n; ++i) {
      std::vector<uint32_t>& rows = ineligible[i];
      rows.assign(excluded[i].begin(), excluded[i].end());
      rows.insert(rows.end(), hard[i].begin(), hard[i].end());
      std::sort(rows.begin(), rows.end());
      rows.erase(std::unique(rows.begin(), rows.end()), rows.end());
      rounds.set_want(static_cast<uint32_t>(i), num_samples, store_.size() - rows.size());
    }
    std::vector<float> batch;
    std::vector<DeviceHit> draws;
    while (!rounds.active().empty()) {
      if (absl::Status s = CheckCancelled(params); !s.ok()) return s;
      DeviceMirror::ProposeParams p{.inv_tau = scan.inv_tau, .seed = scan.seed};
      p.exclude_offsets.assign(1, 0);
      batch.clear();
      for (uint32_t i : rounds.active()) {
        batch.insert(batch.end(), queries.begin() + size_t{i} * dim,
                     queries.begin() + size_t{i + 1} * dim);
        p.query_ids.push_back(i);
        p.draws.push_back(static_cast<uint32_t>(rounds.Need(i)));
        p.first_draw.push_back(rounds.attempts(i));
        rounds.Drew(i, rounds.Need(i));
        p.exclude_rows.insert(p.exclude_rows.end(), ineligible[i].begin(), ineligible[i].end());
        p.exclude_offsets.push_back(static_cast<uint32_t>(p.exclude_rows.size()));
      }
      if (absl::Status s = device_->Propose(batch, p.query_ids.size(), p, &draws); !s.ok()) {
        return s;
      }
      size_t d = 0;
      for (size_t j = 0; j < p.query_ids.size(); ++j) {
        const uint32_t i = p.query_ids[j];
        QueryResult& out = result.queries[i];
        for (const size_t end = d + p.draws[j]; d < end; ++d) {
          const DeviceHit& h = draws[d];
          if (h.row == DeviceMirror::kNoRow || !rounds.Take(i, h.row)) continue;
          out.ids.push_back(h.id);
          out.scores.push_back(h.score);
          out.log_q.push_back(h.key);
        }
      }
      rounds.EndRound();
    }
  }

  // 3. Or exact samples: Gumbel-top-k over the rest, with log Z for log q.
  if (num_samples > 0 && !proposal) {
    DeviceMirror::ScanParams p = scan;
    p.k = static_cast<int>(num_samples);
    p.gumbel = true;
    p.want_log_z = true;
    set_exclusions(&p, true);
    if (absl::Status s = device_->Scan(queries, n, p, &hits, &log_z); !s.ok()) return s;
    ParallelFor(n, 256, [&](size_t begin, size_t end) {
      for (size_t i = begin; i < end; ++i) {
        QueryResult& out = result.queries[i];
        if (params.want_log_z && !own_log_z_pass) out.log_z_lo = out.log_z_hi = log_z[i];
        const DeviceHit* h = hits.data() + i * num_samples;
        const size_t got = take(hits, i, num_samples, by_key);  // draw order
        for (size_t j = 0; j < got; ++j) {
          out.ids.push_back(h[j].id);
          out.scores.push_back(h[j].score);
          out.log_q.push_back(static_cast<float>(h[j].score * double{scan.inv_tau} - log_z[i]));
        }
      }
    });
  }
  NoteDeviceVisits(device_->LastVisitsPerQuery());
  return result;
}

}  // namespace negmine
