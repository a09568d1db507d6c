// Re-encoded targets under drift corrections, across several updates, against
// brute force over the simulated encoder's exact current embeddings.
//
// The trainer's use: a rolling budget re-encodes a share of the targets every
// step, and drift updates come every few steps. Three indexes see the same
// stream: "rolling" takes the re-encodings only, "corrected" the drift
// updates only, "both" takes both. Both must do at least as well as the
// better of the other two.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <numeric>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "core/drift/drift.h"
#include "core/index.h"
#include "core/random.h"
#include "core/store/drift_bench.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace negmine {
namespace {

using ::negmine::testing::BruteForceTopK;
using ::negmine::testing::IsOk;
using ::negmine::testing::Recall;

std::vector<uint64_t> Iota(size_t n) {
  std::vector<uint64_t> ids(n);
  std::iota(ids.begin(), ids.end(), 0);
  return ids;
}

std::unique_ptr<Index> MakeExact(int dim, int landmarks) {
  IndexOptions o{.dim = dim, .metric = Metric::kCosine, .backend = Backend::kCpu,
                 .kind = IndexKind::kExact};
  o.drift.num_landmarks = landmarks;
  return CreateIndex(o).value();
}

absl::Status Update(Index& index, const DriftBench& bench, int64_t step) {
  absl::StatusOr<LandmarkSet> lm = index.GetLandmarks();
  if (!lm.ok()) return lm.status();
  const std::vector<float> g =
      bench.EncodeTargets(step, std::vector<size_t>(lm->ids.begin(), lm->ids.end()));
  return index.ApplyDrift({.model_step = step, .landmark_epoch = lm->epoch,
                           .landmark_embeddings = g})
      .status();
}

// Mean squared distance of the served vectors of `rows` to the truth.
double ServedError(const Index& index, const std::vector<float>& truth,
                   const std::vector<size_t>& rows, int dim) {
  std::vector<float> x;
  EXPECT_THAT(index.GetScored(std::vector<uint64_t>(rows.begin(), rows.end()), &x), IsOk());
  double err = 0;
  for (size_t i = 0; i < rows.size(); ++i) {
    for (int j = 0; j < dim; ++j) err += std::pow(x[i * dim + j] - truth[rows[i] * dim + j], 2);
  }
  return err / rows.size();
}

struct Case {
  uint64_t seed;
  double sigma;       // drift per step
  int update_every;   // steps between drift updates
  int steps;
};

// Recall@64 of exact top-k, and the re-encoded targets' own error, after
// each update. 1% of the targets re-encoded per step (round-robin over a
// fixed random order), updates with m = 4d landmarks.
void RunCase(const Case& c) {
  constexpr int kDim = 32, kK = 64;
  constexpr size_t kN = 10000, kPerStep = kN / 100;
  const DriftBench bench({.num_targets = kN, .num_queries = 200, .dim = kDim,
                          .latent_dim = 16, .hidden_dim = 64, .num_clusters = 64,
                          .drift_sigma = c.sigma, .seed = c.seed});
  const std::vector<float> t0 = bench.Targets(0);
  auto rolling = MakeExact(kDim, 4 * kDim);
  auto corrected = MakeExact(kDim, 4 * kDim);
  auto both = MakeExact(kDim, 4 * kDim);
  for (Index* idx : {rolling.get(), corrected.get(), both.get()}) {
    ASSERT_THAT(idx->Upsert(Iota(kN), t0, 0), IsOk());
  }
  std::vector<size_t> order(kN);
  std::iota(order.begin(), order.end(), 0);
  Rng rng(c.seed, 5);
  for (size_t i = kN - 1; i > 0; --i) std::swap(order[i], order[rng.Below(i + 1)]);
  std::vector<int64_t> encoded_at(kN, 0);
  size_t cursor = 0;
  for (int step = 1; step <= c.steps; ++step) {
    std::vector<size_t> rows(kPerStep);
    for (size_t i = 0; i < kPerStep; ++i) rows[i] = order[(cursor + i) % kN];
    cursor += kPerStep;
    const std::vector<float> enc = bench.EncodeTargets(step, rows);
    for (Index* idx : {rolling.get(), both.get()}) {
      ASSERT_THAT(idx->Upsert(std::vector<uint64_t>(rows.begin(), rows.end()), enc, step),
                  IsOk());
    }
    for (size_t r : rows) encoded_at[r] = step;
    if (step % c.update_every != 0) continue;
    ASSERT_THAT(Update(*corrected, bench, step), IsOk());
    ASSERT_THAT(Update(*both, bench, step), IsOk());
    const std::vector<float> truth = bench.Targets(step);
    const std::vector<float> queries = bench.Queries(step);
    const auto top = BruteForceTopK(truth, queries, kDim, kK);
    auto recall = [&](const Index& idx) {
      SearchResult r = idx.Search(queries, {}, {.k = kK}).value();
      std::vector<std::vector<uint64_t>> got;
      for (const QueryResult& q : r.queries) got.push_back(q.ids);
      return Recall(got, top);
    };
    const double r_stale = Recall(BruteForceTopK(t0, queries, kDim, kK), top);
    const double r_roll = recall(*rolling), r_corr = recall(*corrected), r_both = recall(*both);
    // Targets re-encoded before the last few steps: their sent vectors have
    // gone stale, which the correction should make up for.
    std::vector<size_t> old_reencoded;
    for (size_t r = 0; r < kN; ++r) {
      if (encoded_at[r] > 0 && encoded_at[r] <= step - c.update_every) old_reencoded.push_back(r);
    }
    std::printf("sigma %.3f step %3d: recall stale %.3f rolling %.3f corrected %.3f both %.3f",
                c.sigma, step, r_stale, r_roll, r_corr, r_both);
    if (!old_reencoded.empty()) {
      const double e_roll = ServedError(*rolling, truth, old_reencoded, kDim);
      const double e_both = ServedError(*both, truth, old_reencoded, kDim);
      std::printf("; re-encoded (%zu) error rolling %.5f both %.5f", old_reencoded.size(),
                  e_roll, e_both);
      EXPECT_LE(e_both, e_roll) << "step " << step;
    }
    std::printf("\n");
    // Tolerance: 0.01 of recall (200 queries x 64: one standard error of a
    // recall difference is ~0.003 here).
    EXPECT_GE(r_both, std::max(r_roll, r_corr) - 0.01) << "step " << step;
  }
}

TEST(DriftReencodeTest, RollingPlusCorrectionAtLeastTheBetterOfEither) {
  RunCase({.seed = 31, .sigma = 0.02, .update_every = 5, .steps = 40});
}

}  // namespace
}  // namespace negmine
