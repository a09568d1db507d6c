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
// Thread safety: as the Index contract (see StoreIndex).
#ifndef NEGMINE_CORE_EXACT_INDEX_H_
#define NEGMINE_CORE_EXACT_INDEX_H_

#include <memory>
#include <vector>

#include "core/store_index.h"

namespace negmine {

class ExactIndex final : public StoreIndex {
 public:
  explicit ExactIndex(const IndexOptions& options) : StoreIndex(options) {}

  absl::StatusOr<SearchResult> SearchLocked(absl::Span<const QueryPlan> plans,
                                            const SearchParams& params,
                                            std::vector<std::vector<size_t>>* above) const override
      ABSL_SHARED_LOCKS_REQUIRED(mu_);

 private:
  // Mines one query whose scores against every row are in `scores`
  // (modified in place); with `above`, counts for plan.count_above (as
  // SearchLocked's `above`).
  QueryResult MineOne(float* scores, const QueryPlan& plan, const SearchParams& params,
                      uint64_t stream, std::vector<size_t>* above) const
      ABSL_SHARED_LOCKS_REQUIRED(mu_);
};

}  // namespace negmine

#endif  // NEGMINE_CORE_EXACT_INDEX_H_
