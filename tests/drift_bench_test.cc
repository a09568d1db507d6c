#include "core/store/drift_bench.h"

#include <cmath>
#include <vector>

#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace negmine {
namespace {

using ::negmine::testing::Dot;

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

}  // namespace
}  // namespace negmine
