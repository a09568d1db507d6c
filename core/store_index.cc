// StoreIndex: writes and versions, Get, the drift protocol around
// DriftState, snapshots, and the device search planner (DeviceSearchLocked).
// The search entry point and the mining controls are in store_search.cc.
// Why one file (about 750 lines): each part works on the store under the
// same locks; the seam left to cut is the device planner (about 200 lines,
// run only on a GPU), which belongs beside core/cuda/ once the device seam
// of docs/ARCHITECTURE.md exists.
#include "core/store_index.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "core/linalg.h"
#include "core/parallel.h"
#include "core/random.h"
#include "core/status.h"
#include "core/tree/draw_rounds.h"

namespace negmine {

StoreIndex::StoreIndex(const IndexOptions& options)
    : options_(options), store_(options.dim), drift_(options.dim, options.metric, options.drift) {
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
          .memory_bytes = store_.MemoryBytes() + inv_norms_.capacity() * sizeof(float) +
                          drift_.MemoryBytes() + ExtraMemoryLocked(),
          .device_memory_bytes = device_bytes,
          .version = version_};
}

uint64_t StoreIndex::version() const {
  absl::ReaderMutexLock lock(&mu_);
  return version_;
}

PointSource StoreIndex::Points() const {
  if (drift_.active()) return {.data = drift_.served(), .dim = options_.dim};
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
  // offsets (core/drift/drift_state.h), computed while queries go on.
  DriftState::NewRows drift_rows;
  {
    absl::ReaderMutexLock lock(&mu_);
    if (drift_.active()) drift_rows = drift_.RowsFor(vectors, inv, model_step);
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
  if (drift_.active()) {
    drift_.Resize(store_.num_rows());
    for (size_t i = 0; i < ids.size(); ++i) {
      drift_.PutRow(static_cast<uint32_t>(*store_.Row(ids[i])), i, model_step, drift_rows);
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
      drift_.EraseRow(static_cast<uint32_t>(*row));
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

std::vector<float> StoreIndex::ScoringCopy() const {
  const int dim = options_.dim;
  std::vector<float> out(store_.num_rows() * dim);
  const PointSource points = Points();
  for (uint32_t r = 0; r < store_.num_rows(); ++r) points.Get(r, out.data() + size_t{r} * dim);
  return out;
}

absl::Status StoreIndex::ChooseLandmarks() {
  absl::StatusOr<DriftState::LandmarkChoice> choice;
  {
    absl::ReaderMutexLock lock(&mu_);
    choice = drift_.ChooseLandmarks(store_, Points());
  }
  if (!choice.ok()) return choice.status();
  absl::WriterMutexLock lock(&mu_);
  drift_.SetLandmarks(*std::move(choice));
  return absl::OkStatus();
}

absl::StatusOr<LandmarkSet> StoreIndex::GetLandmarks() {
  absl::MutexLock write_lock(&write_mu_);
  {
    absl::ReaderMutexLock lock(&mu_);
    if (drift_.landmarks().epoch != 0) return drift_.landmarks();
  }
  RETURN_IF_ERROR(ChooseLandmarks());
  absl::ReaderMutexLock lock(&mu_);
  LandmarkSet out = drift_.landmarks();
  out.chosen = true;
  return out;
}

void StoreIndex::InstallServed(std::vector<float> served) {
  {
    absl::ReaderMutexLock lock(&mu_);
    PrepareDrift({.data = served.data(), .dim = options_.dim});
  }
  absl::WriterMutexLock lock(&mu_);
  drift_.InstallServed(std::move(served));
  OnDriftLocked();
  MarkDeviceAll();
  ++version_;
}

void StoreIndex::Rebase() {
  std::vector<float> frame;
  {
    absl::ReaderMutexLock lock(&mu_);
    frame = drift_.ServedCopy();
  }
  {
    absl::WriterMutexLock lock(&mu_);
    drift_.Rebase(std::move(frame));
  }
  // Cannot fail: the collection was not empty for the update.
  ChooseLandmarks().IgnoreError();
  OnRebase();
  absl::WriterMutexLock lock(&mu_);
  drift_.NoteRebase();
}

absl::StatusOr<DriftReport> StoreIndex::ApplyDrift(const DriftUpdate& update) {
  const bool has_landmarks = !update.landmark_embeddings.empty();
  const bool has_map = !update.linear_a.empty() || !update.linear_b.empty();
  if (has_landmarks == has_map) {
    return absl::InvalidArgumentError(
        "a drift update carries either landmark embeddings or a linear map, "
        "not both and not neither");
  }
  absl::MutexLock write_lock(&write_mu_);
  {
    absl::ReaderMutexLock lock(&mu_);
    if (store_.size() == 0) {
      return absl::FailedPreconditionError(
          "the collection is empty: upsert targets before drift updates");
    }
    RETURN_IF_ERROR(drift_.CheckStep(update.model_step));
  }
  if (has_map) return ApplyLinearMap(update);

  auto start = std::chrono::steady_clock::now();
  absl::StatusOr<DriftFit> fit;
  {
    absl::ReaderMutexLock lock(&mu_);
    ASSIGN_OR_RETURN(RowMatrixF current, drift_.LandmarkEmbeddings(update));
    start = std::chrono::steady_clock::now();
    fit = drift_.Fit(current);
  }
  if (!fit.ok()) return fit.status();
  const double fit_seconds = Seconds(start);
  start = std::chrono::steady_clock::now();
  auto model = std::make_shared<const DriftModel>(std::move(fit->model));
  bool active = false;
  {
    absl::ReaderMutexLock lock(&mu_);
    active = drift_.active();
  }
  if (!active) {
    // The frame is the stored vectors, at the lowest step among them;
    // targets stored at a later step are pending.
    std::vector<float> frame;
    {
      absl::ReaderMutexLock lock(&mu_);
      frame = ScoringCopy();
    }
    absl::WriterMutexLock lock(&mu_);
    drift_.Activate(std::move(frame), store_, update.model_step);
  }
  // The bulk correction, two GEMMs over every row, on the GPU when there is
  // one; on any device failure the host computes the same.
  DriftState::BulkCorrect bulk;
  if (device_) {
    bulk = [this](const DriftModel& model, const float* x, size_t n, float* out) {
      const DeviceDriftModel m{.kernel = model.kernel,
                               .width = model.width,
                               .center = model.center,
                               .landmarks = model.landmarks.data(),
                               .coef = model.coef.data(),
                               .m = static_cast<size_t>(model.landmarks.rows())};
      absl::MutexLock device_lock(&device_mu_);
      return device_->CorrectRows(m, x, n, out).ok();
    };
  }
  DriftState::Materialized next;
  {
    absl::ReaderMutexLock lock(&mu_);
    next = drift_.Materialize(update.model_step, *model, bulk);
  }
  InstallServed(std::move(next.served));
  {
    absl::WriterMutexLock lock(&mu_);
    drift_.Resolve(update.model_step, model, std::move(next.resolved));
  }
  const double apply_seconds = Seconds(start);

  DriftReport report{.heldout_residual = fit->heldout_residual,
                     .stale_residual = fit->stale_residual,
                     .kernel = DriftKernelName(model->kernel),
                     .lambda = model->lambda,
                     .fit_seconds = fit_seconds,
                     .apply_seconds = apply_seconds};
  bool rebase = false;
  {
    absl::WriterMutexLock lock(&mu_);
    drift_.NoteUpdate(update.model_step, report.kernel, report.lambda,
                      report.heldout_residual, report.stale_residual, fit_seconds,
                      apply_seconds);
    rebase = drift_.WantsRebase(update.model_step, fit->heldout_residual);
  }
  if (rebase) {
    Rebase();
    report.rebased = true;
  }
  absl::ReaderMutexLock lock(&mu_);
  report.landmark_epoch = drift_.landmarks().epoch;
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
    drift_.NoteUpdate(update.model_step, "linear_map", /*lambda=*/0, /*heldout_residual=*/0,
                      /*stale_residual=*/0, /*fit_seconds=*/0,
                      drift_.summary().last_apply_seconds);
  }
  Rebase();
  const double seconds = Seconds(start);
  absl::WriterMutexLock lock(&mu_);
  drift_.NoteApplySeconds(seconds);
  return DriftReport{.kernel = "linear_map",
                     .rebased = true,
                     .landmark_epoch = drift_.landmarks().epoch,
                     .index_version = version_,
                     .apply_seconds = seconds};
}

DriftSummary StoreIndex::DriftInfo() const {
  absl::ReaderMutexLock lock(&mu_);
  DriftSummary s = drift_.summary();
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

}  // namespace

absl::StatusOr<std::string> StoreIndex::Snapshot() const {
  absl::MutexLock write_lock(&write_mu_);
  absl::ReaderMutexLock lock(&mu_);
  ByteWriter w;
  w.Put<uint8_t>(kSnapshotVersion);
  store_.Save(w);
  w.PutArray(inv_norms_);
  w.Put<uint64_t>(version_);
  drift_.Save(w);
  SaveExtraLocked(w);
  return std::move(w.bytes());
}

absl::Status StoreIndex::Restore(std::string_view snapshot) {
  ByteReader r(snapshot);
  EmbeddingStore store(options_.dim);
  std::vector<float> inv_norms;
  uint64_t version = 0;
  uint8_t format = 0;
  DriftState drift(options_.dim, options_.metric, options_.drift);
  bool ok = r.Get(&format) && format == kSnapshotVersion && store.Load(r) &&
            r.GetArray(&inv_norms) && r.Get(&version);
  const size_t rows = store.num_rows();
  ok = ok && drift.Load(r, rows) &&
       (options_.metric == Metric::kCosine ? inv_norms.size() >= store.size()
                                           : inv_norms.empty()) &&
       inv_norms.size() <= rows;
  if (!ok) {
    return absl::DataLossError(absl::StrCat(
        "an index snapshot of ", snapshot.size(),
        " bytes does not parse or is inconsistent with the collection (dim ", options_.dim,
        ")"));
  }
  absl::MutexLock write_lock(&write_mu_);
  absl::WriterMutexLock lock(&mu_);
  auto swap_all = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    std::swap(store_, store);
    std::swap(inv_norms_, inv_norms);
    std::swap(version_, version);
    std::swap(drift_, drift);
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
  const size_t num_hard = params.num_top();
  const size_t num_samples = params.num_samples();
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
