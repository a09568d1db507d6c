// GCBS batch assignment: reverse Cuthill-McKee on known graphs, the
// partition property, the objective against random batches, and the sparse
// (kNN) method against the paper's dense one.
#include "core/batches/gcbs.h"

#include <algorithm>
#include <numeric>
#include <set>
#include <vector>

#include "core/random.h"
#include "core/store/drift_bench.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace negmine {
namespace {

using ::negmine::testing::IsOk;
using ::negmine::testing::RandomVectors;
using ::negmine::testing::StatusIs;
using ::testing::HasSubstr;

using Adjacency = std::vector<std::vector<uint32_t>>;

Adjacency FromEdges(size_t n, const std::vector<std::pair<uint32_t, uint32_t>>& edges) {
  Adjacency adj(n);
  for (auto [a, b] : edges) {
    adj[a].push_back(b);
    adj[b].push_back(a);
  }
  return adj;
}

void ExpectPermutation(const std::vector<uint32_t>& order, size_t n) {
  ASSERT_EQ(order.size(), n);
  std::vector<uint32_t> sorted = order;
  std::sort(sorted.begin(), sorted.end());
  for (size_t i = 0; i < n; ++i) ASSERT_EQ(sorted[i], i);
}

// A path whose nodes are labelled at random: RCM recovers bandwidth 1.
TEST(ReverseCuthillMcKeeTest, ShuffledPathGetsBandwidthOne) {
  const size_t n = 500;
  std::vector<uint32_t> label(n);
  std::iota(label.begin(), label.end(), 0);
  Rng rng(1, 0);
  for (size_t i = n - 1; i > 0; --i) std::swap(label[i], label[rng.Below(i + 1)]);
  std::vector<std::pair<uint32_t, uint32_t>> edges;
  for (size_t i = 0; i + 1 < n; ++i) edges.emplace_back(label[i], label[i + 1]);
  const Adjacency adj = FromEdges(n, edges);
  size_t components = 0;
  const std::vector<uint32_t> order = ReverseCuthillMcKee(adj, 7, &components);
  ExpectPermutation(order, n);
  EXPECT_EQ(components, 1u);
  std::vector<uint32_t> identity(n);
  std::iota(identity.begin(), identity.end(), 0);
  EXPECT_GT(Bandwidth(adj, identity), 100);
  EXPECT_EQ(Bandwidth(adj, order), 1);
}

// A 20 x 30 grid, labelled at random: the bandwidth of RCM is that of the
// row-major order of the short side (20), give or take one.
TEST(ReverseCuthillMcKeeTest, GridGetsItsNaturalBandwidth) {
  const int rows = 20, cols = 30, n = rows * cols;
  std::vector<uint32_t> label(n);
  std::iota(label.begin(), label.end(), 0);
  Rng rng(2, 0);
  for (int i = n - 1; i > 0; --i) std::swap(label[i], label[rng.Below(i + 1)]);
  std::vector<std::pair<uint32_t, uint32_t>> edges;
  for (int r = 0; r < rows; ++r) {
    for (int c = 0; c < cols; ++c) {
      if (r + 1 < rows) edges.emplace_back(label[r * cols + c], label[(r + 1) * cols + c]);
      if (c + 1 < cols) edges.emplace_back(label[r * cols + c], label[r * cols + c + 1]);
    }
  }
  const Adjacency adj = FromEdges(n, edges);
  size_t components = 0;
  const std::vector<uint32_t> order = ReverseCuthillMcKee(adj, 3, &components);
  ExpectPermutation(order, n);
  EXPECT_LE(Bandwidth(adj, order), rows + 1);
}

// Components (two triangles and isolated nodes) are each contiguous, and
// the isolated nodes come last.
TEST(ReverseCuthillMcKeeTest, ComponentsAreContiguousAndIsolatedNodesLast) {
  const Adjacency adj = FromEdges(9, {{0, 4}, {4, 8}, {8, 0}, {1, 5}, {5, 7}, {7, 1}});
  size_t components = 0;
  const std::vector<uint32_t> order = ReverseCuthillMcKee(adj, 1, &components);
  ExpectPermutation(order, 9);
  EXPECT_EQ(components, 5u);  // two triangles and 2, 3, 6
  EXPECT_EQ(std::set<uint32_t>(order.begin() + 6, order.end()), (std::set<uint32_t>{2, 3, 6}));
  const std::set<uint32_t> first(order.begin(), order.begin() + 3);
  EXPECT_TRUE(first == (std::set<uint32_t>{0, 4, 8}) || first == (std::set<uint32_t>{1, 5, 7}));
  EXPECT_EQ(Bandwidth(adj, order), 2);
}

// (query, positive) pairs with cluster structure: positives are drift-bench
// targets, queries their noisy copies.
struct Examples {
  std::vector<float> queries, positives;
};

Examples MakeExamples(size_t n, int dim, uint64_t seed) {
  DriftBench bench({.num_targets = n, .num_queries = 0, .dim = dim, .latent_dim = 8,
                    .hidden_dim = 32, .num_clusters = 64, .seed = seed});
  Examples e{.positives = bench.Targets(0)};
  const std::vector<float> noise = RandomVectors(n, dim, seed + 100);
  e.queries.resize(n * dim);
  for (size_t i = 0; i < n * dim; ++i) e.queries[i] = e.positives[i] + 0.3f * noise[i];
  return e;
}

void ExpectPartition(const BatchAssignment& a, size_t n, size_t batch_size) {
  std::vector<int> seen(n, 0);
  for (size_t b = 0; b < a.batches.size(); ++b) {
    EXPECT_LE(a.batches[b].size(), batch_size);
    for (uint32_t i : a.batches[b]) {
      ASSERT_LT(i, n);
      ++seen[i];
    }
  }
  EXPECT_EQ(a.batches.size(), (n + batch_size - 1) / batch_size);
  for (size_t i = 0; i < n; ++i) ASSERT_EQ(seen[i], 1) << "example " << i;
  size_t short_batches = 0;
  for (const auto& b : a.batches) short_batches += b.size() < batch_size;
  EXPECT_LE(short_batches, 1u);
}

TEST(AssignBatchesTest, APartitionThatBeatsRandomBatchesByAWideMargin) {
  const size_t n = 20000;
  const int dim = 32, b = 64;
  const Examples e = MakeExamples(n, dim, 1);
  std::vector<double> progress;
  absl::StatusOr<BatchAssignment> a = AssignBatches(
      e.queries, e.positives, dim,
      {.batch_size = b, .threads = 2, .progress = [&](double f) {
         progress.push_back(f);
         return true;
       }});
  ASSERT_THAT(a.status(), IsOk());
  ExpectPartition(*a, n, b);
  // The input order is random (the examples are i.i.d.): "before" is random
  // batching.
  std::printf("in-batch similarity: random %.0f, GCBS %.0f; bandwidth %lld -> %lld; "
              "%zu edges, %zu components\n",
              a->in_batch_similarity_before, a->in_batch_similarity_after,
              static_cast<long long>(a->bandwidth_before),
              static_cast<long long>(a->bandwidth_after), a->edges, a->components);
  EXPECT_GT(a->in_batch_similarity_after, 3 * a->in_batch_similarity_before);
  EXPECT_LT(a->bandwidth_after, a->bandwidth_before);
  ASSERT_FALSE(progress.empty());
  EXPECT_EQ(progress.front(), 0.0);
  EXPECT_EQ(progress.back(), 1.0);
  EXPECT_TRUE(std::is_sorted(progress.begin(), progress.end()));
  // Deterministic in the seed; another seed shuffles the batches differently.
  absl::StatusOr<BatchAssignment> again =
      AssignBatches(e.queries, e.positives, dim, {.batch_size = b, .threads = 2});
  ASSERT_THAT(again.status(), IsOk());
  EXPECT_EQ(again->batches, a->batches);
  absl::StatusOr<BatchAssignment> other =
      AssignBatches(e.queries, e.positives, dim, {.batch_size = b, .seed = 2});
  ASSERT_THAT(other.status(), IsOk());
  EXPECT_NE(other->batches, a->batches);
}

// The sparse kNN method against the paper's dense method (X Y^T thresholded
// at its 0.99 quantile) on small N: its in-batch similarity is within 10% of
// the dense method's, with the same quantile applied to its kNN edges.
TEST(AssignBatchesTest, SparseIsCloseToTheDenseReference) {
  const size_t n = 3000;
  const int dim = 32, b = 32;
  const Examples e = MakeExamples(n, dim, 5);
  const BatchOptions o{.batch_size = b, .neighbors = 64, .quantile = 0.99, .beam_width = 64};
  absl::StatusOr<BatchAssignment> dense = AssignBatchesDense(e.queries, e.positives, dim, o);
  absl::StatusOr<BatchAssignment> sparse = AssignBatches(e.queries, e.positives, dim, o);
  ASSERT_THAT(dense.status(), IsOk());
  ASSERT_THAT(sparse.status(), IsOk());
  ExpectPartition(*dense, n, b);
  ExpectPartition(*sparse, n, b);
  std::printf("in-batch similarity: random %.0f, dense %.0f (%zu edges), sparse %.0f (%zu edges)\n",
              dense->in_batch_similarity_before, dense->in_batch_similarity_after,
              dense->edges, sparse->in_batch_similarity_after, sparse->edges);
  EXPECT_DOUBLE_EQ(sparse->in_batch_similarity_before, dense->in_batch_similarity_before);
  EXPECT_GT(sparse->in_batch_similarity_after, 0.9 * dense->in_batch_similarity_after);
  EXPECT_GT(dense->in_batch_similarity_after, 3 * dense->in_batch_similarity_before);
}

// With a beam over every leaf the tree's kNN lists are exact, so the sparse
// method builds the dense method's k-nearest graph and returns the same
// batches.
TEST(AssignBatchesTest, ExactNeighboursGiveTheDenseKnnBatches) {
  const size_t n = 1500;
  const int dim = 16;
  const Examples e = MakeExamples(n, dim, 7);
  const BatchOptions o{.batch_size = 16, .neighbors = 8, .beam_width = 1 << 20};
  absl::StatusOr<BatchAssignment> dense = AssignBatchesDense(e.queries, e.positives, dim, o);
  absl::StatusOr<BatchAssignment> sparse = AssignBatches(e.queries, e.positives, dim, o);
  ASSERT_THAT(dense.status(), IsOk());
  ASSERT_THAT(sparse.status(), IsOk());
  EXPECT_EQ(sparse->edges, dense->edges);
  EXPECT_EQ(sparse->batches, dense->batches);
  EXPECT_EQ(sparse->bandwidth_after, dense->bandwidth_after);
}

TEST(AssignBatchesTest, SmallAndDegenerateInputs) {
  const int dim = 4;
  // One example; batches larger than N; N not a multiple of B.
  const std::vector<float> one = RandomVectors(1, dim, 1);
  absl::StatusOr<BatchAssignment> a = AssignBatches(one, one, dim, {.batch_size = 8});
  ASSERT_THAT(a.status(), IsOk());
  EXPECT_EQ(a->batches, (std::vector<std::vector<uint32_t>>{{0}}));
  const std::vector<float> x = RandomVectors(10, dim, 2), y = RandomVectors(10, dim, 3);
  a = AssignBatches(x, y, dim, {.batch_size = 3, .neighbors = 2});
  ASSERT_THAT(a.status(), IsOk());
  ExpectPartition(*a, 10, 3);
}

TEST(AssignBatchesTest, ProgressCanCancel) {
  const Examples e = MakeExamples(20000, 16, 3);
  int calls = 0;
  EXPECT_THAT(AssignBatches(e.queries, e.positives, 16,
                            {.batch_size = 8, .progress = [&](double) { return ++calls < 3; }}),
              StatusIs(absl::StatusCode::kCancelled, HasSubstr("cancelled")));
  EXPECT_EQ(calls, 3);
}

TEST(AssignBatchesTest, BadInputGetsClearErrors) {
  const int dim = 4;
  const std::vector<float> x = RandomVectors(10, dim, 2), y = RandomVectors(10, dim, 3);
  EXPECT_THAT(AssignBatches(x, y, dim, {.batch_size = 0}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("batch_size = 0")));
  EXPECT_THAT(AssignBatches(x, absl::MakeConstSpan(y).subspan(4), dim, {.batch_size = 2}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("positives hold 36")));
  EXPECT_THAT(AssignBatches({}, {}, dim, {.batch_size = 2}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("queries hold 0")));
  EXPECT_THAT(AssignBatches(x, y, dim, {.batch_size = 2, .quantile = 1.0}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("quantile = 1")));
  std::vector<float> bad = x;
  bad[5] = std::nanf("");
  EXPECT_THAT(AssignBatches(bad, y, dim, {.batch_size = 2}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("queries")));
  std::vector<float> zero = y;
  std::fill_n(zero.begin() + 2 * dim, dim, 0.0f);
  EXPECT_THAT(AssignBatches(x, zero, dim, {.batch_size = 2}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("positives: row 2 is zero")));
}

}  // namespace
}  // namespace negmine
