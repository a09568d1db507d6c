// StoreIndex: the part every host-memory index shares. It owns the
// EmbeddingStore, validates and applies writes (Upsert, Delete), serves Get,
// keeps the version, and for cosine the per-row inverse norms. A subclass adds
// its structure through two hooks that run under the writer lock.
//
// Thread safety: as the Index contract. `mu_` is a reader-writer lock:
// writes hold it exclusively, Search and Get hold it shared.
#ifndef NEGMINE_CORE_STORE_INDEX_H_
#define NEGMINE_CORE_STORE_INDEX_H_

#include <vector>

#include "absl/synchronization/mutex.h"
#include "core/index.h"
#include "core/store/embedding_store.h"
#include "core/tree/tree.h"

namespace negmine {

class StoreIndex : public Index {
 public:
  explicit StoreIndex(const IndexOptions& options);

  const IndexOptions& options() const override { return options_; }
  IndexStats Stats() const override;
  absl::Status Upsert(absl::Span<const uint64_t> ids,
                      absl::Span<const float> vectors,
                      int64_t model_step) override;
  absl::StatusOr<size_t> Delete(absl::Span<const uint64_t> ids,
                                bool allow_missing) override;
  absl::Status Get(absl::Span<const uint64_t> ids, std::vector<float>* vectors,
                   std::vector<int64_t>* steps) const override;
  // Checks the queries' shape and values and the params against the
  // collection, then runs SearchLocked under the reader lock.
  absl::StatusOr<SearchResult> Search(
      absl::Span<const float> queries,
      absl::Span<const std::vector<uint64_t>> exclude,
      const SearchParams& params) const final;

 protected:
  // The search proper, on validated input: `n` queries (n x dim), `exclude`
  // empty or n lists, params valid for the collection (which is not empty).
  virtual absl::StatusOr<SearchResult> SearchLocked(
      absl::Span<const float> queries, size_t n,
      absl::Span<const std::vector<uint64_t>> exclude,
      const SearchParams& params) const ABSL_SHARED_LOCKS_REQUIRED(mu_) = 0;

  // After the store took new rows (`inserted`) and overwrote others
  // (`updated`).
  virtual void OnUpsertLocked(absl::Span<const uint32_t> /*inserted*/,
                              absl::Span<const uint32_t> /*updated*/)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {}
  // After the store freed `rows`.
  virtual void OnDeleteLocked(absl::Span<const uint32_t> /*rows*/)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {}
  // Bytes held beyond the store.
  virtual size_t ExtraMemoryLocked() const ABSL_SHARED_LOCKS_REQUIRED(mu_) {
    return 0;
  }

  // The scoring-space view of the store (cosine: rows scaled by 1/||x||).
  PointSource Points() const ABSL_SHARED_LOCKS_REQUIRED(mu_);

  const IndexOptions options_;
  mutable absl::Mutex mu_;
  EmbeddingStore store_ ABSL_GUARDED_BY(mu_);
  // Cosine only: 1 / ||x(row)||, per row.
  std::vector<float> inv_norms_ ABSL_GUARDED_BY(mu_);
  uint64_t version_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace negmine

#endif  // NEGMINE_CORE_STORE_INDEX_H_
