// StoreIndex: the part every host-memory index shares. It owns the
// EmbeddingStore, validates and applies writes (Upsert, Delete), serves Get,
// keeps the version, for cosine the per-row inverse norms, and the drift
// state. A subclass adds its structure through hooks that run under the
// writer lock.
//
// Drift: a DriftState (core/drift/drift_state.h) holds the frame, the
// corrected ("served") vectors, the offsets, pending steps, history and
// landmarks; once active, the index scores its served vectors. A tree index
// rebuilds in the background after a re-base (OnRebase).
//
// Backend kCuda: a DeviceMirror (core/cuda/device_mirror.h) holds a copy of
// the scoring vectors on the GPU (and, for a tree, its leaf level). Writes
// mark rows dirty; the next search uploads them. Search runs on the device
// what the device does (exact top-k, approximate top-k of a tree, sampling
// without replacement by Gumbel-top-k, MIXED, the rank window, exclusions,
// log Z) and the rest on the host: sampling with replacement, and a tree's
// proposal and rejection samplers (on a GPU collection both sampler kinds
// draw exactly from the softmax by Gumbel-top-k, a full scan). A drift
// update's bulk correction (Materialize) runs on the device too. Lock
// order: write_mu_, mu_, device_mu_.
//
// Thread safety: as the Index contract. Writers (Upsert, Delete, GetLandmarks,
// ApplyDrift, a subclass installing a rebuild) first take `write_mu_`, so they
// run one at a time. `mu_` is a reader-writer lock over the store and the
// drift state: a writer holds it exclusively only to install its change,
// Search and Get hold it shared. The slow parts of ApplyDrift (the fit, the
// bulk correction) run under write_mu_ and mu_ shared, so queries go on
// meanwhile.
#ifndef NEGMINE_CORE_STORE_INDEX_H_
#define NEGMINE_CORE_STORE_INDEX_H_

#include <deque>
#include <memory>
#include <optional>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "core/cuda/device_mirror.h"
#include "core/drift/drift_state.h"
#include "core/index.h"
#include "core/mine_plan.h"
#include "core/store/embedding_store.h"
#include "core/tree/tree.h"

namespace negmine {

class StoreIndex : public Index {
 public:
  explicit StoreIndex(const IndexOptions& options);

  const IndexOptions& options() const override { return options_; }
  IndexStats Stats() const override;
  uint64_t version() const override;
  absl::Status Upsert(absl::Span<const uint64_t> ids,
                      absl::Span<const float> vectors,
                      int64_t model_step) override;
  absl::StatusOr<size_t> Delete(absl::Span<const uint64_t> ids,
                                bool allow_missing) override;
  absl::Status Get(absl::Span<const uint64_t> ids, std::vector<float>* vectors,
                   std::vector<int64_t>* steps) const override;
  absl::Status GetScored(absl::Span<const uint64_t> ids,
                         std::vector<float>* vectors) const override;
  absl::StatusOr<LandmarkSet> GetLandmarks() override;
  absl::StatusOr<DriftReport> ApplyDrift(const DriftUpdate& update) override;
  DriftSummary DriftInfo() const override;
  absl::StatusOr<std::string> Snapshot() const override;
  absl::Status Restore(std::string_view snapshot) override;
  Backend active_backend() const override {
    return device_ ? Backend::kCuda : Backend::kCpu;
  }
  // Makes this a CUDA index (called once, by CreateIndex, before use).
  void AttachDevice(std::unique_ptr<DeviceMirror> device) {
    device_ = std::move(device);
  }
  // Checks the queries' shape and values and the params against the
  // collection, then runs the search on the device when it can, otherwise
  // SearchLocked under the reader lock.
  absl::StatusOr<SearchResult> Search(
      absl::Span<const float> queries,
      absl::Span<const std::vector<uint64_t>> exclude,
      const SearchParams& params) const final;

 protected:
  // The search proper, on validated input: one plan per query
  // (core/mine_plan.h: the query, its excluded rows and score window), params
  // valid for the collection (which is not empty). It ignores params'
  // positives, dedupe and distribution (Search runs those above it) and
  // leaves the counts to Search, except that with `above` non-null it sets
  // (*above)[i][j] = the live targets not in plans[i].excluded whose score
  // exceeds plans[i].count_above[j] (above has one entry per plan).
  virtual absl::StatusOr<SearchResult> SearchLocked(
      absl::Span<const QueryPlan> plans, const SearchParams& params,
      std::vector<std::vector<size_t>>* above) const
      ABSL_SHARED_LOCKS_REQUIRED(mu_) = 0;

  // After the store took new rows (`inserted`) and overwrote others
  // (`updated`).
  virtual void OnUpsertLocked(absl::Span<const uint32_t> /*inserted*/,
                              absl::Span<const uint32_t> /*updated*/)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {}
  // After the store freed `rows`.
  virtual void OnDeleteLocked(absl::Span<const uint32_t> /*rows*/)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {}
  // A drift update, in two steps. PrepareDrift sees the new scoring vectors
  // of every row (`after`) under the reader lock, so queries go on while it
  // works; OnDriftLocked then installs its result under the writer lock.
  // No other write comes between the two (the caller holds write_mu_).
  virtual void PrepareDrift(const PointSource& /*after*/)
      ABSL_SHARED_LOCKS_REQUIRED(mu_) ABSL_EXCLUSIVE_LOCKS_REQUIRED(write_mu_) {}
  virtual void OnDriftLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_, write_mu_) {}
  // A subclass's own part of a snapshot (after the store's), and its
  // restore, run after the store's state is in place: `r` holds what
  // SaveExtraLocked wrote, or nothing for a snapshot without it. It must
  // consume all of `r`, and return false (changing nothing) if the bytes do
  // not parse or do not fit the restored state.
  virtual void SaveExtraLocked(ByteWriter& /*w*/) const ABSL_SHARED_LOCKS_REQUIRED(mu_) {}
  virtual bool RestoreExtraLocked(ByteReader& r) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return r.done();
  }
  // After a drift re-base (the scoring vectors did not change).
  virtual void OnRebase() ABSL_EXCLUSIVE_LOCKS_REQUIRED(write_mu_) {}
  // Uploads the tree's leaf level to `device` when it changed since the last
  // upload (or `force`). Runs under the reader lock and device_mu_.
  virtual absl::Status SyncDeviceTreeLocked(DeviceMirror& /*device*/, bool /*force*/) const
      ABSL_SHARED_LOCKS_REQUIRED(mu_) ABSL_EXCLUSIVE_LOCKS_REQUIRED(device_mu_) {
    return absl::OkStatus();
  }
  // After a search on the device: the rows scored (and, for a beam, leaves
  // routed) per query, for TreeSummary::visits_per_query.
  virtual void NoteDeviceVisits(double /*per_query*/) const {}
  // Bytes held beyond the store.
  virtual size_t ExtraMemoryLocked() const ABSL_SHARED_LOCKS_REQUIRED(mu_) {
    return 0;
  }

  // CANCELLED when params.cancelled says so (search loops poll it).
  static absl::Status CheckCancelled(const SearchParams& params) {
    if (params.cancelled && params.cancelled()) {
      return absl::CancelledError("the call was cancelled; its search stopped");
    }
    return absl::OkStatus();
  }

  // The scoring-space view of the store (cosine: rows scaled by 1/||x||).
  PointSource Points() const ABSL_SHARED_LOCKS_REQUIRED(mu_);

  const IndexOptions options_;
  // Acquired before mu_ by every writer.
  mutable absl::Mutex write_mu_ ABSL_ACQUIRED_BEFORE(mu_);
  mutable absl::Mutex mu_;
  EmbeddingStore store_ ABSL_GUARDED_BY(mu_);
  // Cosine only: 1 / ||x(row)||, per row.
  std::vector<float> inv_norms_ ABSL_GUARDED_BY(mu_);
  uint64_t version_ ABSL_GUARDED_BY(mu_) = 0;
  // Serializes the use of device_ (one stream), after mu_.
  mutable absl::Mutex device_mu_ ABSL_ACQUIRED_AFTER(mu_);

 private:
  // Marks rows (or all rows) for upload to the device; a no-op on the CPU.
  void MarkDeviceRows(absl::Span<const uint32_t> rows) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void MarkDeviceAll() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Uploads what changed since the last search.
  absl::Status SyncDeviceLocked() const ABSL_SHARED_LOCKS_REQUIRED(mu_)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(device_mu_);
  // The search on the device; nullopt when `params` asks for what only the
  // host does.
  std::optional<absl::StatusOr<SearchResult>> DeviceSearchLocked(
      absl::Span<const float> queries, size_t n,
      absl::Span<const std::vector<uint64_t>> exclude, const SearchParams& params) const
      ABSL_SHARED_LOCKS_REQUIRED(mu_);

  // Search's parts (core/store_search.cc). The plan of every query: its
  // excluded rows, its positives (scored) and its score window.
  absl::StatusOr<std::vector<QueryPlan>> PlanLocked(
      absl::Span<const float> queries, size_t n,
      absl::Span<const std::vector<uint64_t>> exclude, const SearchParams& params) const
      ABSL_SHARED_LOCKS_REQUIRED(mu_);
  // SearchLocked in work units (SearchParams::work_unit_queries).
  absl::StatusOr<SearchResult> UnitsLocked(absl::Span<const QueryPlan> plans,
                                           const SearchParams& params,
                                           std::vector<std::vector<size_t>>* above = nullptr) const
      ABSL_SHARED_LOCKS_REQUIRED(mu_);
  // Query i alone, with its own stream (for a refill).
  absl::StatusOr<QueryResult> OneLocked(size_t i, const QueryPlan& plan,
                                        const SearchParams& params) const
      ABSL_SHARED_LOCKS_REQUIRED(mu_);
  // The mining controls above the backends (the dedupe, SimANS): a top list,
  // then draws, each walked in order.
  absl::StatusOr<SearchResult> StagedLocked(absl::Span<const QueryPlan> plans,
                                            const SearchParams& params,
                                            std::vector<std::vector<size_t>>* above) const
      ABSL_SHARED_LOCKS_REQUIRED(mu_);
  // Fills each result's counts (from `above`, SearchLocked's), positive
  // scores and shortfall.
  void CountLocked(absl::Span<const QueryPlan> plans, const SearchParams& params, bool staged,
                   const std::vector<std::vector<size_t>>& above, SearchResult* result) const
      ABSL_SHARED_LOCKS_REQUIRED(mu_);

  // Chooses a new landmark set from the current frame and installs it.
  absl::Status ChooseLandmarks() ABSL_EXCLUSIVE_LOCKS_REQUIRED(write_mu_);
  // Serves `served` from now on: the subclass moves its structure, the
  // version goes up.
  void InstallServed(std::vector<float> served) ABSL_EXCLUSIVE_LOCKS_REQUIRED(write_mu_);
  // Makes the served vectors the frame and chooses new landmarks.
  void Rebase() ABSL_EXCLUSIVE_LOCKS_REQUIRED(write_mu_);
  absl::StatusOr<DriftReport> ApplyLinearMap(const DriftUpdate& update)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(write_mu_);
  // The stored vectors in scoring space (cosine: unit rows), num_rows x dim.
  std::vector<float> ScoringCopy() const ABSL_SHARED_LOCKS_REQUIRED(mu_);

  DriftState drift_ ABSL_GUARDED_BY(mu_);

  std::unique_ptr<DeviceMirror> device_;
  mutable std::vector<uint32_t> device_dirty_ ABSL_GUARDED_BY(device_mu_);
  mutable bool device_all_dirty_ ABSL_GUARDED_BY(device_mu_) = true;
};

}  // namespace negmine

#endif  // NEGMINE_CORE_STORE_INDEX_H_
