// Drift correction: the model (core/drift/drift.h) and the index's drift
// updates, against brute force over the current model's embeddings.
#include "core/drift/drift.h"

#include <algorithm>
#include <cmath>
#include <memory>
#include <numeric>
#include <set>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "core/exact_index.h"
#include "core/store/drift_bench.h"
#include "core/tree/tree_index.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace negmine {
namespace {

using ::negmine::testing::ChiSquare;
using ::negmine::testing::ChiSquareCritical;
using ::negmine::testing::IsOk;
using ::negmine::testing::RandomVectors;
using ::negmine::testing::Softmax;
using ::negmine::testing::StatusIs;
using ::testing::HasSubstr;

using RowMatrix = RowMatrixF;

// Brute-force top-k ids of each query over `targets` (inner product; the
// drift bench's vectors are unit length).
std::vector<std::vector<uint64_t>> TopK(const std::vector<float>& targets,
                                        const std::vector<float>& queries,
                                        int dim, int k) {
  const size_t n = targets.size() / dim, q = queries.size() / dim;
  Eigen::Map<const RowMatrix> t(targets.data(), n, dim), qs(queries.data(), q, dim);
  const RowMatrix s = qs * t.transpose();
  std::vector<std::vector<uint64_t>> out(q);
  std::vector<uint64_t> idx(n);
  for (size_t i = 0; i < q; ++i) {
    std::iota(idx.begin(), idx.end(), 0);
    std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), [&](uint64_t a, uint64_t b) {
      return s(i, a) > s(i, b) || (s(i, a) == s(i, b) && a < b);
    });
    out[i].assign(idx.begin(), idx.begin() + k);
  }
  return out;
}

double Recall(const std::vector<std::vector<uint64_t>>& got,
              const std::vector<std::vector<uint64_t>>& truth) {
  double sum = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    absl::flat_hash_set<uint64_t> t(truth[i].begin(), truth[i].end());
    for (uint64_t id : got[i]) sum += t.contains(id);
  }
  return sum / (got.size() * truth[0].size());
}

std::vector<uint64_t> Iota(size_t n) {
  std::vector<uint64_t> ids(n);
  std::iota(ids.begin(), ids.end(), 0);
  return ids;
}

std::vector<float> Normalized(std::vector<float> x, int dim) {
  NormalizeRows(x.data(), x.size() / dim, dim);
  return x;
}

// A smooth displacement of the rows of x: normalize(x + 0.3 tanh(x W)).
std::vector<float> SmoothlyMoved(const std::vector<float>& x, int dim, uint64_t seed) {
  const size_t n = x.size() / dim;
  const std::vector<float> w = RandomVectors(dim, dim, seed);
  Eigen::Map<const RowMatrix> xs(x.data(), n, dim), ws(w.data(), dim, dim);
  RowMatrix out = xs + 0.3f * (xs * ws).array().tanh().matrix();
  NormalizeRows(out.data(), n, dim);
  return std::vector<float>(out.data(), out.data() + out.size());
}

double RelativeError(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (double{a[i]} - b[i]) * (double{a[i]} - b[i]);
    den += double{b[i]} * b[i];
  }
  return std::sqrt(num / den);
}

RowMatrix AsMatrix(const std::vector<float>& x, int dim) {
  return Eigen::Map<const RowMatrix>(x.data(), x.size() / dim, dim);
}

// ---------------------------------------------------------------- the model

TEST(FitDriftTest, NoDisplacementChoosesNoCorrection) {
  const int d = 8;
  const RowMatrix e = AsMatrix(Normalized(RandomVectors(40, d, 1), d), d);
  absl::StatusOr<DriftFit> fit = FitDrift(e, e, /*normalize=*/true);
  ASSERT_THAT(fit, IsOk());
  EXPECT_TRUE(fit->model.is_identity());
  EXPECT_EQ(fit->heldout_residual, 0);
  EXPECT_EQ(fit->stale_residual, 0);
}

// A smooth displacement is learned: the held-out residual and the error on
// points that are not landmarks both fall well below no correction.
TEST(FitDriftTest, LearnsASmoothDisplacement) {
  const int d = 8;
  const std::vector<float> lm = Normalized(RandomVectors(300, d, 2), d);
  const std::vector<float> other = Normalized(RandomVectors(2000, d, 3), d);
  absl::StatusOr<DriftFit> fit =
      FitDrift(AsMatrix(lm, d), AsMatrix(SmoothlyMoved(lm, d, 4), d), true);
  ASSERT_THAT(fit, IsOk());
  EXPECT_FALSE(fit->model.is_identity());
  EXPECT_LT(fit->heldout_residual, 0.5 * fit->stale_residual);
  const std::vector<float> truth = SmoothlyMoved(other, d, 4);
  std::vector<float> corrected(other.size());
  fit->model.Apply(other.data(), 2000, /*normalize=*/true, corrected.data());
  EXPECT_LT(RelativeError(corrected, truth), 0.5 * RelativeError(other, truth));
}

// Unpredictable displacements (noise per landmark) are shrunk away: the
// correction does not make points that are not landmarks worse.
TEST(FitDriftTest, ShrinksNoiseTowardNoCorrection) {
  const int d = 8;
  const std::vector<float> lm = Normalized(RandomVectors(300, d, 5), d);
  std::vector<float> noisy = RandomVectors(300, d, 6);
  for (size_t i = 0; i < noisy.size(); ++i) noisy[i] = lm[i] + 0.2f * noisy[i];
  noisy = Normalized(noisy, d);
  absl::StatusOr<DriftFit> fit = FitDrift(AsMatrix(lm, d), AsMatrix(noisy, d), true);
  ASSERT_THAT(fit, IsOk());
  EXPECT_LE(fit->heldout_residual, fit->stale_residual);
  // The truth for other points is no movement at all.
  const std::vector<float> other = Normalized(RandomVectors(2000, d, 7), d);
  std::vector<float> corrected(other.size());
  fit->model.Apply(other.data(), 2000, true, corrected.data());
  EXPECT_LT(RelativeError(corrected, other), 0.1 * fit->stale_residual);
}

TEST(FitDriftTest, RejectsMismatchedShapes) {
  const RowMatrix a = RowMatrix::Zero(4, 3), b = RowMatrix::Zero(5, 3);
  EXPECT_THAT(FitDrift(a, b, false), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("5 x 3")));
  EXPECT_THAT(FitDrift(RowMatrix(0, 3), RowMatrix(0, 3), false),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("no landmarks")));
}

TEST(KMeansPlusPlusTest, DistinctDeterministicAndSpread) {
  // 10 tight clusters far apart: 10 seeds land one per cluster.
  const int d = 4, per = 50;
  std::vector<float> x;
  const std::vector<float> centers = RandomVectors(10, d, 8);
  const std::vector<float> noise = RandomVectors(10 * per, d, 9);
  for (int c = 0; c < 10; ++c) {
    for (int i = 0; i < per; ++i) {
      for (int j = 0; j < d; ++j) x.push_back(100 * centers[c * d + j] + 0.01f * noise[(c * per + i) * d + j]);
    }
  }
  const std::vector<size_t> a = KMeansPlusPlus(x.data(), 10 * per, d, 10, 1);
  EXPECT_EQ(a, KMeansPlusPlus(x.data(), 10 * per, d, 10, 1));
  std::set<size_t> clusters;
  for (size_t i : a) clusters.insert(i / per);
  EXPECT_EQ(clusters.size(), 10u);
  // More seeds than distinct points: still distinct indices.
  std::vector<float> same(20 * d, 1.0f);
  const std::vector<size_t> b = KMeansPlusPlus(same.data(), 20, d, 20, 2);
  EXPECT_EQ(std::set<size_t>(b.begin(), b.end()).size(), 20u);
}

// ---------------------------------------------------------- drift-bench recall

std::unique_ptr<Index> MakeIndex(IndexKind kind, int dim, Metric metric,
                                 IndexOptions::Drift drift = {}) {
  IndexOptions o{.dim = dim, .metric = metric, .backend = Backend::kCpu, .kind = kind};
  o.tree.background_rebuild = false;
  o.drift = drift;
  return CreateIndex(o).value();
}

// Re-encodes the current landmarks at `step` and applies them.
absl::StatusOr<DriftReport> Update(Index& index, const DriftBench& bench, int64_t step) {
  absl::StatusOr<LandmarkSet> lm = index.GetLandmarks();
  if (!lm.ok()) return lm.status();
  std::vector<size_t> rows(lm->ids.begin(), lm->ids.end());
  const std::vector<float> g = bench.EncodeTargets(step, rows);
  return index.ApplyDrift({.model_step = step, .landmark_epoch = lm->epoch,
                           .landmark_embeddings = g});
}

std::vector<std::vector<uint64_t>> SearchTopK(const Index& index,
                                              const std::vector<float>& queries, int k) {
  SearchResult r = index.Search(queries, {}, {.k = k}).value();
  std::vector<std::vector<uint64_t>> out;
  for (const QueryResult& q : r.queries) out.push_back(q.ids);
  return out;
}

// The setup: drift-bench with nonlinear drift, m landmarks
// re-encoded per step and no other re-encoding. Recall@64 of the corrected
// tree's exact top-k against brute force over the current model's targets.
TEST(DriftRecallTest, CorrectionRecoversLostRecallAndRisesWithM) {
  constexpr int kDim = 64, kK = 64;
  const DriftBench bench({.num_targets = 20000, .num_queries = 256, .dim = kDim,
                          .drift_sigma = 0.02, .seed = 11});
  const std::vector<float> t0 = bench.Targets(0);
  const std::vector<int> ms = {2 * kDim, 8 * kDim};
  std::vector<std::unique_ptr<Index>> indexes;
  for (int m : ms) {
    indexes.push_back(MakeIndex(IndexKind::kTree, kDim, Metric::kCosine, {.num_landmarks = m}));
    ASSERT_THAT(indexes.back()->Upsert(Iota(20000), t0, 0), IsOk());
  }
  for (int step : {5, 10, 20}) {
    const std::vector<float> queries = bench.Queries(step);
    const auto truth = TopK(bench.Targets(step), queries, kDim, kK);
    const double stale = Recall(TopK(t0, queries, kDim, kK), truth);
    std::vector<double> corrected;
    for (auto& index : indexes) {
      ASSERT_THAT(Update(*index, bench, step), IsOk());
      corrected.push_back(Recall(SearchTopK(*index, queries, kK), truth));
    }
    const double lost = 1 - stale;
    std::printf("step %d: stale %.3f  m=2d %.3f (%.0f%% of lost)  m=8d %.3f (%.0f%%)\n",
                step, stale, corrected[0], 100 * (corrected[0] - stale) / lost,
                corrected[1], 100 * (corrected[1] - stale) / lost);
    EXPECT_GE(corrected[0], stale) << "step " << step;
    EXPECT_GE(corrected[1], corrected[0]) << "step " << step;
    if (step == 20) {
      EXPECT_GE(corrected[0] - stale, 0.40 * lost);
      EXPECT_GE(corrected[1] - stale, 0.50 * lost);
    }
  }
}

}  // namespace
}  // namespace negmine
