// ExactIndex: brute force over every stored target, on the CPU.
//
// It is the oracle for every other index: top-k is exact (ties broken by
// ascending id), and both samplers draw exactly from the softmax over the
// eligible targets (Sampler::kProposal and kExact coincide here, because the
// exact softmax is itself a proposal with a cheap exact log q).
//
// Cost per query: one pass over all N x dim stored components (a GEMM for a
// batch of queries) plus O(N) selection.
//
// Thread safety: as the Index contract. A reader-writer lock guards the
// store; Search holds it shared.
#ifndef NEGMINE_CORE_EXACT_INDEX_H_
#define NEGMINE_CORE_EXACT_INDEX_H_

#include <memory>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "core/index.h"
#include "core/store/embedding_store.h"

namespace negmine {

class ExactIndex final : public Index {
 public:
  explicit ExactIndex(const IndexOptions& options);

  const IndexOptions& options() const override { return options_; }
  IndexStats Stats() const override;
  absl::Status Upsert(absl::Span<const uint64_t> ids,
                      absl::Span<const float> vectors,
                      int64_t model_step) override;
  absl::StatusOr<size_t> Delete(absl::Span<const uint64_t> ids,
                                bool allow_missing) override;
  absl::Status Get(absl::Span<const uint64_t> ids, std::vector<float>* vectors,
                   std::vector<int64_t>* steps) const override;
  absl::StatusOr<SearchResult> Search(
      absl::Span<const float> queries,
      absl::Span<const std::vector<uint64_t>> exclude,
      const SearchParams& params) const override;

 private:
  // Mines one query whose scores against every row are in `scores`
  // (num_rows entries, modified in place).
  QueryResult MineOne(float* scores, absl::Span<const uint64_t> exclude,
                      const SearchParams& params, uint64_t stream) const
      ABSL_SHARED_LOCKS_REQUIRED(mu_);

  const IndexOptions options_;
  mutable absl::Mutex mu_;
  EmbeddingStore store_ ABSL_GUARDED_BY(mu_);
  // Cosine only: 1 / ||x(row)||, per row.
  std::vector<float> inv_norms_ ABSL_GUARDED_BY(mu_);
  uint64_t version_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace negmine

#endif  // NEGMINE_CORE_EXACT_INDEX_H_
