#include "core/store/drift_bench.h"

#include <cmath>
#include <cstdio>
#include <vector>

#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace negmine {
namespace {

using ::negmine::testing::Dot;
using ::negmine::testing::StatusIs;
using ::testing::HasSubstr;

DriftBenchConfig Small(uint64_t seed) {
  return {.num_targets = 2000, .num_queries = 50, .dim = 16, .latent_dim = 8,
          .hidden_dim = 32, .num_clusters = 20, .seed = seed};
}

TEST(DriftBenchTest, DeterministicInSeedAndNormalized) {
  DriftBench a(Small(3)), b(Small(3)), c(Small(4));
  const auto ta = a.Targets(0);
  EXPECT_EQ(ta, b.Targets(0));
  EXPECT_NE(ta, c.Targets(0));
  EXPECT_EQ(a.Queries(2), b.Queries(2));
  ASSERT_EQ(ta.size(), 2000u * 16);
  for (size_t i = 0; i < 2000; ++i) {
    EXPECT_NEAR(Dot(&ta[i * 16], &ta[i * 16], 16), 1.0, 1e-5);
  }
}

TEST(DriftBenchTest, EncodeTargetsMatchesTargetsRows) {
  DriftBench bench(Small(5));
  const auto all = bench.Targets(3);
  const auto some = bench.EncodeTargets(3, {7, 1999, 0});
  for (int j = 0; j < 16; ++j) {
    EXPECT_NEAR(some[0 * 16 + j], all[7 * 16 + j], 1e-6);
    EXPECT_NEAR(some[1 * 16 + j], all[1999 * 16 + j], 1e-6);
    EXPECT_NEAR(some[2 * 16 + j], all[0 * 16 + j], 1e-6);
  }
}

// Embeddings move further from step 0 as the step grows.
TEST(DriftBenchTest, DriftGrowsWithStep) {
  DriftBench bench(Small(6));
  const auto t0 = bench.Targets(0);
  double prev = 0;
  for (double step : {1.0, 5.0, 20.0}) {
    const auto t = bench.Targets(step);
    double mean_cos = 0;
    for (size_t i = 0; i < 2000; ++i) mean_cos += Dot(&t0[i * 16], &t[i * 16], 16);
    mean_cos /= 2000;
    const double moved = 1 - mean_cos;
    EXPECT_GT(moved, prev) << "step " << step;
    prev = moved;
  }
  EXPECT_LT(prev, 1.0);  // still correlated with the start at step 20
}

TEST(DriftBenchTest, ParsesPresets) {
  EXPECT_EQ(ParseDriftBenchPreset("easy").value(), DriftBenchPreset::kEasy);
  EXPECT_EQ(ParseDriftBenchPreset("hard").value(), DriftBenchPreset::kHard);
  EXPECT_THAT(ParseDriftBenchPreset("medium"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("'medium'")));
  EXPECT_EQ(DriftBenchPresetName(DriftBenchPreset::kHard), "hard");
  // The easy preset is the default config.
  const DriftBenchConfig easy = DriftBenchPresetConfig(DriftBenchPreset::kEasy);
  const DriftBenchConfig defaults;
  EXPECT_EQ(easy.latent_dim, defaults.latent_dim);
  EXPECT_EQ(easy.num_clusters, defaults.num_clusters);
  EXPECT_EQ(easy.cluster_spread, defaults.cluster_spread);
}

// A preset's mixture at a test size: 20000 targets, 200 queries, d = 32.
DriftBenchConfig PresetAt(DriftBenchPreset preset, uint64_t seed) {
  DriftBenchConfig c = DriftBenchPresetConfig(preset);
  c.num_targets = 20000;
  c.num_queries = 200;
  c.dim = 32;
  c.seed = seed;
  return c;
}

TEST(DriftBenchTest, HardPresetDeterministicInSeedAndNormalized) {
  DriftBench a(PresetAt(DriftBenchPreset::kHard, 3)), b(PresetAt(DriftBenchPreset::kHard, 3)),
      c(PresetAt(DriftBenchPreset::kHard, 4));
  const auto ta = a.Targets(0);
  EXPECT_EQ(ta, b.Targets(0));
  EXPECT_NE(ta, c.Targets(0));
  EXPECT_EQ(a.Queries(1), b.Queries(1));
  EXPECT_EQ(a.target_clusters(), b.target_clusters());
  EXPECT_EQ(a.query_clusters(), b.query_clusters());
  ASSERT_EQ(ta.size(), 20000u * 32);
  ASSERT_EQ(a.target_clusters().size(), 20000u);
  ASSERT_EQ(a.query_clusters().size(), 200u);
  for (size_t i = 0; i < 20000; ++i) {
    EXPECT_NEAR(Dot(&ta[i * 32], &ta[i * 32], 32), 1.0, 1e-5);
    ASSERT_GE(a.target_clusters()[i], 0);
    ASSERT_LT(a.target_clusters()[i], a.config().num_clusters);
  }
}

// Cluster overlap, measured by brute force: the fraction of queries whose
// exact top-1 target (inner product over all targets) was drawn from another
// mixture component than the query. Well-separated clusters keep it small;
// overlapping ones push it up. Measured at this size (20000 targets, 200
// queries, d = 32), seeds 1 and 2: easy 0.000 and 0.000, hard 0.695 and
// 0.655. Thresholds: easy < 0.05; hard > 0.4 (about 8 binomial standard
// deviations below the measured values) and at least 0.3 above easy.
double ForeignTop1Fraction(const DriftBench& bench) {
  const auto x = bench.Targets(0);
  const auto q = bench.Queries(0);
  const int d = bench.config().dim;
  const size_t n = bench.config().num_targets, nq = bench.config().num_queries;
  size_t foreign = 0;
  for (size_t i = 0; i < nq; ++i) {
    size_t best = 0;
    double best_s = -1e30;
    for (size_t y = 0; y < n; ++y) {
      const double s = Dot(&q[i * d], &x[y * d], d);
      if (s > best_s) best_s = s, best = y;
    }
    foreign += bench.target_clusters()[best] != bench.query_clusters()[i];
  }
  return static_cast<double>(foreign) / nq;
}

TEST(DriftBenchTest, HardPresetClustersOverlapMoreThanEasy) {
  for (uint64_t seed : {1, 2}) {
    const double easy = ForeignTop1Fraction(DriftBench(PresetAt(DriftBenchPreset::kEasy, seed)));
    const double hard = ForeignTop1Fraction(DriftBench(PresetAt(DriftBenchPreset::kHard, seed)));
    std::printf("seed %d: foreign top-1 fraction easy %.3f hard %.3f\n", static_cast<int>(seed),
                easy, hard);
    EXPECT_LT(easy, 0.05) << "seed " << seed;
    EXPECT_GT(hard, 0.4) << "seed " << seed;
    EXPECT_GT(hard, easy + 0.3) << "seed " << seed;
  }
}

}  // namespace
}  // namespace negmine
