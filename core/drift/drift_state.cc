#include "core/drift/drift_state.h"

#include <algorithm>
#include <climits>
#include <limits>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "core/linalg.h"
#include "core/random.h"

namespace negmine {

DriftState::DriftState(int dim, Metric metric, const IndexOptions::Drift& options)
    : dim_(dim), metric_(metric), options_(options) {}

size_t DriftState::MemoryBytes() const {
  return (served_.capacity() + frame_.capacity()) * sizeof(float);
}

DriftState::NewRows DriftState::RowsFor(absl::Span<const float> vectors,
                                        absl::Span<const float> inv, int64_t step) const {
  const int dim = dim_;
  const size_t n = vectors.size() / dim, total = vectors.size();
  NewRows rows;
  rows.frame.assign(vectors.begin(), vectors.end());
  for (size_t i = 0; i < inv.size(); ++i) {
    for (int j = 0; j < dim; ++j) rows.frame[i * dim + j] *= inv[i];
  }
  // served = x + corr_latest(x) - corr_s(x), offset = -corr_s(x); a step at
  // or beyond the latest update is served as sent, with offset
  // -corr_latest(x) (pending if beyond).
  std::vector<float> corr_latest(total, 0.0f);
  if (!history_.empty()) {
    history_.back().second->Apply(rows.frame.data(), n, /*normalize=*/false,
                                  corr_latest.data());
    for (size_t i = 0; i < total; ++i) corr_latest[i] -= rows.frame[i];
  }
  const bool past = step < LatestStep();
  std::vector<float> corr_s = corr_latest;
  if (past) CorrectionAt(step, rows.frame.data(), n, corr_s.data());
  rows.served = rows.frame;
  rows.offset.resize(total);
  for (size_t i = 0; i < total; ++i) rows.offset[i] = -corr_s[i];
  if (past) {
    for (size_t i = 0; i < total; ++i) rows.served[i] += corr_latest[i] - corr_s[i];
    if (metric_ == Metric::kCosine) NormalizeRows(rows.served.data(), n, dim);
  }
  if (std::all_of(rows.offset.begin(), rows.offset.end(), [](float v) { return v == 0; })) {
    rows.offset.clear();
  }
  return rows;
}

void DriftState::Resize(size_t num_rows) {
  frame_.resize(num_rows * dim_);
  served_.resize(num_rows * dim_);
}

void DriftState::PutRow(uint32_t row, size_t i, int64_t step, const NewRows& rows) {
  const int dim = dim_;
  std::copy_n(rows.frame.data() + i * dim, dim, frame_.data() + size_t{row} * dim);
  std::copy_n(rows.served.data() + i * dim, dim, served_.data() + size_t{row} * dim);
  if (rows.offset.empty()) {
    offsets_.erase(row);
  } else {
    offsets_[row].assign(rows.offset.begin() + i * dim, rows.offset.begin() + (i + 1) * dim);
  }
  if (step > LatestStep()) {
    pending_[row] = step;
  } else {
    pending_.erase(row);
  }
}

void DriftState::EraseRow(uint32_t row) {
  offsets_.erase(row);
  pending_.erase(row);
}

void DriftState::CorrectionAt(int64_t step, const float* x, size_t n, float* out) const {
  const size_t total = n * dim_;
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

int DriftState::NumLandmarks() const {
  return options_.num_landmarks > 0 ? options_.num_landmarks : std::max(64, 4 * dim_);
}

absl::StatusOr<DriftState::LandmarkChoice> DriftState::ChooseLandmarks(
    const EmbeddingStore& store, const PointSource& points) const {
  const int dim = dim_;
  // Landmarks come from the rows whose frame vector is at the frame's step:
  // a target re-encoded since then would show only part of the drift.
  int64_t min_step = std::numeric_limits<int64_t>::max();
  for (uint32_t r = 0; r < store.num_rows(); ++r) {
    if (store.live(r)) min_step = std::min(min_step, store.model_step(r));
  }
  std::vector<uint32_t> live, reencoded;
  live.reserve(store.size());
  for (uint32_t r = 0; r < store.num_rows(); ++r) {
    if (!store.live(r)) continue;
    const bool at_frame = active_ ? !offsets_.contains(r) && !pending_.contains(r)
                                  : store.model_step(r) == min_step;
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
  Rng rng(options_.seed, epoch);
  const size_t sample = std::min(live.size(), std::max<size_t>(16 * size_t(m), 4096));
  for (size_t i = 0; i < sample; ++i) {
    std::swap(live[i], live[i + rng.Below(live.size() - i)]);
  }
  std::vector<float> x(sample * dim);
  for (size_t i = 0; i < sample; ++i) points.Get(live[i], x.data() + i * dim);
  const std::vector<size_t> chosen =
      KMeansPlusPlus(x.data(), sample, dim, m, Mix64(options_.seed + epoch));
  LandmarkChoice out;
  out.frame.resize(m, dim);
  for (int i = 0; i < m; ++i) {
    out.set.ids.push_back(store.id(live[chosen[i]]));
    std::copy_n(x.data() + chosen[i] * dim, dim, out.frame.row(i).data());
  }
  out.set.epoch = epoch;
  return out;
}

void DriftState::SetLandmarks(LandmarkChoice choice) {
  landmarks_ = std::move(choice.set);
  landmark_frame_ = std::move(choice.frame);
  summary_.landmark_epoch = landmarks_.epoch;
  summary_.num_landmarks = landmarks_.ids.size();
}

absl::Status DriftState::CheckStep(int64_t step) const {
  if (active_ && step < summary_.step) {
    return absl::FailedPreconditionError(
        absl::StrCat("model_step ", step, " is below the last drift update's step ",
                     summary_.step, "; steps must not go backwards"));
  }
  return absl::OkStatus();
}

absl::StatusOr<RowMatrixF> DriftState::LandmarkEmbeddings(const DriftUpdate& update) const {
  const int dim = dim_;
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
  if (absl::Status s = CheckFinite(update.landmark_embeddings, dim, "landmark_embeddings");
      !s.ok()) {
    return s;
  }
  RowMatrixF current = Eigen::Map<const RowMatrixF>(update.landmark_embeddings.data(), m, dim);
  if (metric_ == Metric::kCosine) {
    for (size_t i = 0; i < m; ++i) {
      if (current.row(i).squaredNorm() == 0) {
        return absl::InvalidArgumentError(absl::StrCat(
            "landmark_embeddings: row ", i, " (id ", landmarks_.ids[i],
            ") has zero norm, which a cosine collection cannot score"));
      }
    }
    NormalizeRows(current.data(), m, dim);
  }
  return current;
}

absl::StatusOr<DriftFit> DriftState::Fit(const RowMatrixF& current) const {
  return FitDrift(landmark_frame_, current, metric_ == Metric::kCosine);
}

void DriftState::Activate(std::vector<float> frame, const EmbeddingStore& store,
                          int64_t step) {
  frame_step_ = step;
  for (uint32_t r = 0; r < store.num_rows(); ++r) {
    if (store.live(r)) frame_step_ = std::min(frame_step_, store.model_step(r));
  }
  pending_.clear();
  for (uint32_t r = 0; r < store.num_rows(); ++r) {
    if (store.live(r) && store.model_step(r) > frame_step_) pending_[r] = store.model_step(r);
  }
  frame_.swap(frame);
}

DriftState::Materialized DriftState::Materialize(int64_t step, const DriftModel& model,
                                                 const BulkCorrect& bulk) const {
  const int dim = dim_;
  const size_t rows = frame_.size() / dim;
  Materialized out;
  std::vector<float>& served = out.served;
  served.resize(frame_.size());
  const bool done = !model.is_identity() && bulk && bulk(model, frame_.data(), rows,
                                                          served.data());
  if (!done) model.Apply(frame_.data(), rows, /*normalize=*/false, served.data());
  for (const auto& [row, offset] : offsets_) {
    if (pending_.contains(row)) continue;
    for (int j = 0; j < dim; ++j) served[size_t{row} * dim + j] += offset[j];
  }
  // A pending row at step s, with offset o = -corr_last(x): served
  // x + (1 - alpha) (corr_t(x) + o), and its new offset -corr_s(x) =
  // (1 - alpha) o - alpha corr_t(x), alpha = (s - last) / (t - last) <= 1.
  const int64_t last = LatestStep();
  for (const auto& [row, s] : pending_) {
    const double alpha = step > last ? std::min(1.0, double(s - last) / double(step - last)) : 1.0;
    auto it = offsets_.find(row);
    std::vector<float> o = it == offsets_.end() ? std::vector<float>(dim, 0.0f) : it->second;
    float* dst = served.data() + size_t{row} * dim;
    const float* xr = frame_.data() + size_t{row} * dim;
    for (int j = 0; j < dim; ++j) {
      const double corr_t = double{dst[j]} - xr[j];
      dst[j] = static_cast<float>(xr[j] + (1 - alpha) * (corr_t + o[j]));
      o[j] = static_cast<float>((1 - alpha) * o[j] - alpha * corr_t);
    }
    out.resolved.emplace_back(row, std::move(o));
  }
  if (metric_ == Metric::kCosine) NormalizeRows(served.data(), rows, dim);
  return out;
}

void DriftState::InstallServed(std::vector<float> served) {
  served_.swap(served);
  active_ = true;
}

void DriftState::Resolve(int64_t step, std::shared_ptr<const DriftModel> model,
                         std::vector<std::pair<uint32_t, std::vector<float>>> resolved) {
  for (auto& [row, offset] : resolved) {
    if (pending_[row] <= step) pending_.erase(row);
    offsets_[row] = std::move(offset);
  }
  history_.emplace_back(step, std::move(model));
  if (history_.size() > kHistory) history_.pop_front();
}

void DriftState::NoteUpdate(int64_t step, const char* kernel, double lambda,
                            double heldout_residual, double stale_residual,
                            double fit_seconds, double apply_seconds) {
  DriftSummary& s = summary_;
  s.active = true;
  s.step = step;
  s.kernel = kernel;
  s.lambda = lambda;
  s.heldout_residual = heldout_residual;
  s.stale_residual = stale_residual;
  ++s.updates;
  s.last_fit_seconds = fit_seconds;
  s.last_apply_seconds = apply_seconds;
}

bool DriftState::WantsRebase(int64_t step, double heldout_residual) const {
  return (options_.rebase_residual > 0 && heldout_residual > options_.rebase_residual) ||
         (options_.rebase_every_steps > 0 && step - frame_step_ >= options_.rebase_every_steps);
}

void DriftState::Rebase(std::vector<float> frame) {
  frame_.swap(frame);
  offsets_.clear();
  history_.clear();
  frame_step_ = summary_.step;
  // Rows from beyond the new frame's step stay pending, served as sent.
  absl::erase_if(pending_, [&](const auto& p) { return p.second <= frame_step_; });
}

void DriftState::NoteRebase() {
  ++summary_.rebases;
  summary_.landmark_epoch = landmarks_.epoch;
  summary_.num_landmarks = landmarks_.ids.size();
}

// ---------------------------------------------------------------- snapshot

namespace {

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

void DriftState::Save(ByteWriter& w) const {
  w.Put<uint8_t>(active_ ? 1 : 0);
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
  const DriftSummary& d = summary_;
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
}

bool DriftState::Load(ByteReader& r, size_t rows) {
  const int dim = dim_;
  uint8_t active = 0;
  uint64_t count = 0;
  bool ok = r.Get(&active) && active <= 1 && r.GetArray(&served_) && r.GetArray(&frame_) &&
            r.Get(&count) &&
            (active ? served_.size() == rows * dim && frame_.size() == rows * dim
                    : served_.empty() && frame_.empty());
  active_ = active != 0;
  offsets_.clear();
  for (uint64_t i = 0; ok && i < count; ++i) {
    uint32_t row = 0;
    std::vector<float> v;
    ok = r.Get(&row) && r.GetArray(&v) && row < rows && v.size() == size_t(dim);
    if (ok) offsets_[row] = std::move(v);
  }
  pending_.clear();
  ok = ok && r.Get(&count);
  for (uint64_t i = 0; ok && i < count; ++i) {
    uint32_t row = 0;
    int64_t step = 0;
    ok = r.Get(&row) && r.Get(&step) && row < rows;
    if (ok) pending_[row] = step;
  }
  ok = ok && r.GetArray(&landmarks_.ids) && r.Get(&landmarks_.epoch) &&
       GetMatrix(r, &landmark_frame_) && r.Get(&frame_step_) && r.Get(&count) &&
       (landmarks_.ids.empty() ||
        (landmark_frame_.rows() == Eigen::Index(landmarks_.ids.size()) &&
         landmark_frame_.cols() == dim));
  history_.clear();
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
    history_.emplace_back(step, std::move(m));
  }
  DriftSummary& d = summary_;
  d = DriftSummary{};
  uint8_t summary_active = 0;
  std::string kernel;
  ok = ok && r.Get(&summary_active) && r.Get(&d.step) && r.Get(&d.landmark_epoch) &&
       r.Get(&d.num_landmarks) && r.GetString(&kernel) && r.Get(&d.lambda) &&
       r.Get(&d.heldout_residual) && r.Get(&d.stale_residual) && r.Get(&d.updates) &&
       r.Get(&d.rebases) && r.Get(&d.last_fit_seconds) && r.Get(&d.last_apply_seconds) &&
       (d.kernel = KernelNameFromString(kernel)) != nullptr;
  d.active = summary_active != 0;
  return ok;
}

}  // namespace negmine
