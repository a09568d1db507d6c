// DriftState: the drift correction of one collection's scoring vectors, kept
// apart from the index that serves them (docs/ARCHITECTURE.md, "Drift").
//
// Until the first update the index scores the stored vectors. From then on it
// scores `served`, one corrected vector per row, materialized by one pass over
// the targets per update:
//   served(y) = normalize?( E(y) + corr_t(E(y)) + o(y) ),
// with E = the frame (the served vectors of the last re-base, at step s_F),
// corr_t(x) = k(x, L) C_t the current model's correction (core/drift/drift.h),
// and o(y) an offset for targets re-encoded since the re-base.
//
// Re-encoded targets. A target upserted at model step s carries the drift up
// to s already; it must receive only the drift after s. Let corr_s be the
// correction "as of step s": 0 at s_F, the update's own at each update step,
// linear in the step between two updates (the drift is taken to accrue evenly
// between updates). Then E(y) = g_s(y) and o(y) = -corr_s(g_s(y)), so at t = s
// the target is served exactly as sent and later it receives corr_t - corr_s.
// When s lies beyond the last update, corr_s is not known yet: the target is
// served as sent and stays "pending" until the next update t, which
// interpolates between the last update and t. E(y) + o(y) is a virtual base,
// kept as a sparse offset so that the kernel is still evaluated at the real
// embedding. The models of the last kHistory updates are kept for late
// upserts (steps older than those interpolate from s_F to the oldest kept).
//
// At the first update the frame is the stored vectors, s_F is the lowest
// model_step among them, and the targets stored at a later step are pending.
// A re-base makes the served vectors the new frame at the update's step,
// drops the offsets and the history; the index then chooses new landmarks
// (k-means++ on a sample, a new epoch). It happens after a linear map, when a
// fit's held-out residual exceeds IndexOptions::Drift::rebase_residual, or
// every rebase_every_steps.
//
// Memory: once active, the frame and the served vectors add 2 x dim floats
// per row to the stored vectors.
//
// Thread safety: none. The owning index guards it with its reader-writer
// lock: const methods under the shared lock, the others under the exclusive
// one (core/store_index.h).
#ifndef NEGMINE_CORE_DRIFT_DRIFT_STATE_H_
#define NEGMINE_CORE_DRIFT_DRIFT_STATE_H_

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "core/drift/drift.h"
#include "core/index.h"
#include "core/persist/bytes.h"
#include "core/store/embedding_store.h"
#include "core/store/point_source.h"

namespace negmine {

class DriftState {
 public:
  DriftState(int dim, Metric metric, const IndexOptions::Drift& options);

  // ---- What searches read.
  bool active() const { return active_; }
  // num_rows x dim, valid when active().
  const float* served() const { return served_.data(); }
  const DriftSummary& summary() const { return summary_; }
  const LandmarkSet& landmarks() const { return landmarks_; }
  // Host bytes of the frame and the served vectors.
  size_t MemoryBytes() const;

  // ---- Writes of targets (only when active()).
  // The frame, served and offset rows of an upsert of `vectors` (inverse
  // norms `inv` for cosine, else empty) at `step`; `offset` is empty when
  // every offset is zero.
  struct NewRows {
    std::vector<float> frame, served, offset;
  };
  NewRows RowsFor(absl::Span<const float> vectors, absl::Span<const float> inv,
                  int64_t step) const;
  // Grows the per-row arrays to `num_rows`.
  void Resize(size_t num_rows);
  // Installs position `i` of `rows` as row `row`, written at `step`.
  void PutRow(uint32_t row, size_t i, int64_t step, const NewRows& rows);
  // Forgets the offset and pending step of a deleted row.
  void EraseRow(uint32_t row);

  // ---- Landmarks.
  // The landmarks' count for this collection.
  int NumLandmarks() const;
  // A new landmark set (the next epoch) over the live rows of `store`,
  // scored by `points`, preferring rows whose frame is at the frame's step.
  //   FAILED_PRECONDITION: the store is empty.
  struct LandmarkChoice {
    LandmarkSet set;
    RowMatrixF frame;  // m x dim: the landmarks' frame rows
  };
  absl::StatusOr<LandmarkChoice> ChooseLandmarks(const EmbeddingStore& store,
                                                 const PointSource& points) const;
  void SetLandmarks(LandmarkChoice choice);

  // ---- An update.
  // FAILED_PRECONDITION when `step` is below the last update's.
  absl::Status CheckStep(int64_t step) const;
  // The landmark embeddings of `update` checked against the current set and
  // brought to scoring space (cosine: unit rows).
  //   FAILED_PRECONDITION: no set yet, or another epoch.
  //   INVALID_ARGUMENT: a bad shape, a NaN or Inf, or (cosine) a zero row.
  absl::StatusOr<RowMatrixF> LandmarkEmbeddings(const DriftUpdate& update) const;
  // Fits the model from the landmarks' frame rows to `current`.
  absl::StatusOr<DriftFit> Fit(const RowMatrixF& current) const;
  // First activation: the frame is `frame` (the scoring copy of `store`), at
  // the lowest step of the live targets (at most `step`); later ones are
  // pending.
  void Activate(std::vector<float> frame, const EmbeddingStore& store, int64_t step);
  // Computes E + corr(E) for the rows of the frame (x, n rows, into out); a
  // device may do it. Returns false to let the host compute it.
  using BulkCorrect = std::function<bool(const DriftModel& model, const float* x,
                                         size_t n, float* out)>;
  // The served vectors of every row for the update (`step`, `model`), from
  // the frame and the offsets, and the new offsets of the pending rows
  // (row, offset). `bulk` may be empty.
  struct Materialized {
    std::vector<float> served;
    std::vector<std::pair<uint32_t, std::vector<float>>> resolved;
  };
  Materialized Materialize(int64_t step, const DriftModel& model,
                           const BulkCorrect& bulk) const;
  // Serves `served` from now on (num_rows x dim, scoring space).
  void InstallServed(std::vector<float> served);
  // After InstallServed of a landmark update: the resolved offsets, and the
  // model joins the history.
  void Resolve(int64_t step, std::shared_ptr<const DriftModel> model,
               std::vector<std::pair<uint32_t, std::vector<float>>> resolved);
  // Records an update in the summary.
  void NoteUpdate(int64_t step, const char* kernel, double lambda, double heldout_residual,
                  double stale_residual, double fit_seconds, double apply_seconds);
  void NoteApplySeconds(double seconds) { summary_.last_apply_seconds = seconds; }
  // Whether an update at `step` with `heldout_residual` ends with a re-base.
  bool WantsRebase(int64_t step, double heldout_residual) const;
  // A re-base: `frame` (a copy of the served vectors) becomes the frame at
  // the last update's step; offsets and history go. The caller then chooses
  // new landmarks and calls NoteRebase.
  void Rebase(std::vector<float> frame);
  void NoteRebase();
  // A copy of the served vectors (for Rebase).
  std::vector<float> ServedCopy() const { return served_; }

  // ---- Snapshot: the drift part, written after the store's.
  void Save(ByteWriter& w) const;
  // Reads what Save wrote, for a store of `num_rows` rows; false when it does
  // not parse or does not fit (this state is then unspecified).
  bool Load(ByteReader& r, size_t num_rows);

 private:
  static constexpr size_t kHistory = 64;

  // The step of the last update since the re-base, or s_F.
  int64_t LatestStep() const {
    return history_.empty() ? frame_step_ : history_.back().first;
  }
  // corr_s(x) for the n rows of x, into out (n x dim), for a step s at or
  // before the last update.
  void CorrectionAt(int64_t step, const float* x, size_t n, float* out) const;

  int dim_;
  Metric metric_;
  IndexOptions::Drift options_;

  bool active_ = false;
  std::vector<float> served_;  // num_rows x dim
  std::vector<float> frame_;   // num_rows x dim
  absl::flat_hash_map<uint32_t, std::vector<float>> offsets_;
  LandmarkSet landmarks_;
  RowMatrixF landmark_frame_;
  int64_t frame_step_ = 0;  // s_F
  // Rows upserted at a step beyond the last update: row -> step.
  absl::flat_hash_map<uint32_t, int64_t> pending_;
  // (step, model) of the updates since the re-base, oldest first.
  std::deque<std::pair<int64_t, std::shared_ptr<const DriftModel>>> history_;
  DriftSummary summary_;
};

}  // namespace negmine

#endif  // NEGMINE_CORE_DRIFT_DRIFT_STATE_H_
