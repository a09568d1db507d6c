// Global contrastive batch sampling (GCBS; DESIGN.md idea 3): order the
// training examples so that each batch holds examples that are hard negatives
// of each other, then cut the order into batches.
//
// Example i is a (query x_i, positive y_i) pair, both L2-normalized here.
// The similarity of examples i and j is s_ij = <x_i, y_j>: how hard y_j is
// as an in-batch negative for x_i. The paper (Sachidananda et al., ICML 2023)
// thresholds the dense N x N matrix X Y^T at its 0.999 quantile, orders the
// resulting 0/1 graph by Cuthill-McKee and cuts consecutive blocks: O(N^2).
//
// The sparse version here never forms X Y^T:
//   1. kNN graph: each example's `neighbors` most similar examples
//      (j != i) from negmine's own tree index over the positives, searched
//      with the queries (beam search, approximate; the graph is a
//      heuristic, so exactness buys nothing). With `quantile` > 0 only the
//      edges above that quantile of all N^2 similarities are kept (the
//      quantile estimated from 10^6 uniformly sampled pairs), as in the
//      paper; otherwise the fixed k.
//   2. Symmetrize: i ~ j if either lists the other.
//   3. Reverse Cuthill-McKee, per connected component: start from a
//      pseudo-peripheral node (the George-Liu search from a minimum-degree
//      node), breadth-first, neighbours by increasing degree, ties broken by
//      a seeded random key; the concatenated order is reversed. Components
//      come in order of their smallest-degree start; isolated examples
//      (no edges) last, in seeded random order.
//   4. Cut into batches of `batch_size` (the last may be smaller), and
//      optionally shuffle the order of the batches (not their content).
//
// Objectives reported: the bandwidth of the graph under the input order and
// under the new one (max |pos(i) - pos(j)| over edges), and the in-batch
// similarity sum_batches sum_{i != j in batch} s_ij (exact, from the
// vectors) for the input order's batches and for the new ones.
//
// AssignBatchesDense is the paper's O(N^2) method, the reference for tests.
//
// Thread safety: the functions are pure; `progress` is called from the
// calling thread.
#ifndef NEGMINE_CORE_BATCHES_GCBS_H_
#define NEGMINE_CORE_BATCHES_GCBS_H_

#include <cstdint>
#include <functional>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace negmine {

struct BatchOptions {
  int batch_size = 0;       // B >= 1
  int neighbors = 16;       // k of the kNN graph, >= 1
  double quantile = 0;      // in [0, 1): 0 keeps the k neighbours
  int beam_width = 32;      // tree leaves searched per query
  bool shuffle_batches = true;
  uint64_t seed = 1;
  int threads = 1;          // for the kNN search
  // Called with the fraction done, in [0, 1]; may be empty. Returning false
  // stops the work: the call then returns CANCELLED.
  std::function<bool(double)> progress;
};

struct BatchAssignment {
  std::vector<std::vector<uint32_t>> batches;  // example indices
  size_t edges = 0;                            // undirected edges of the graph
  size_t components = 0;                       // including isolated examples
  int64_t bandwidth_before = 0, bandwidth_after = 0;
  double in_batch_similarity_before = 0, in_batch_similarity_after = 0;
};

// The sparse GCBS above over n examples: queries and positives are n x dim.
//   INVALID_ARGUMENT: bad sizes or options, NaN/Inf, a zero vector.
//   CANCELLED: `progress` returned false.
absl::StatusOr<BatchAssignment> AssignBatches(absl::Span<const float> queries,
                                              absl::Span<const float> positives,
                                              int dim, const BatchOptions& options);

// The paper's dense method: threshold X Y^T (diagonal excluded) at
// `options.quantile` (the exact quantile), then steps 2-4. O(n^2) time and
// memory: for tests and small n.
absl::StatusOr<BatchAssignment> AssignBatchesDense(
    absl::Span<const float> queries, absl::Span<const float> positives, int dim,
    const BatchOptions& options);

// Reverse Cuthill-McKee of an undirected graph (adjacency lists, each edge
// in both lists, no self loops). Returns the order (a permutation of the
// nodes) and the number of connected components.
std::vector<uint32_t> ReverseCuthillMcKee(
    const std::vector<std::vector<uint32_t>>& adjacency, uint64_t seed,
    size_t* components);

// max |pos[i] - pos[j]| over the edges, where pos is the inverse of `order`.
int64_t Bandwidth(const std::vector<std::vector<uint32_t>>& adjacency,
                  const std::vector<uint32_t>& order);

// sum over batches of sum_{i != j in batch} <x_i, y_j> for unit rows.
double InBatchSimilarity(const std::vector<std::vector<uint32_t>>& batches,
                         const float* x, const float* y, int dim);

}  // namespace negmine

#endif  // NEGMINE_CORE_BATCHES_GCBS_H_
