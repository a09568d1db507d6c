// ExactIndex against plain-loop oracles, with fixed seeds.
#include "core/exact_index.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <set>
#include <vector>

#include "core/random.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace negmine {
namespace {

using ::negmine::testing::ChiSquare;
using ::negmine::testing::ChiSquareCritical;
using ::negmine::testing::Dot;
using ::negmine::testing::IsOk;
using ::negmine::testing::RandomVectors;
using ::negmine::testing::Softmax;
using ::negmine::testing::StatusIs;
using ::testing::HasSubstr;

// Scores of a float32 GEMM and of the double oracle differ by rounding; ids
// may then differ only where the oracle's scores are this close.
constexpr double kScoreTol = 1e-4;

std::vector<uint64_t> Ids(size_t n, uint64_t base = 1000) {
  std::vector<uint64_t> ids(n);
  std::iota(ids.begin(), ids.end(), base);
  return ids;
}

std::unique_ptr<Index> MakeIndex(int dim, Metric metric = Metric::kInnerProduct) {
  auto index = CreateIndex({.dim = dim, .metric = metric, .backend = Backend::kCpu});
  EXPECT_THAT(index.status(), IsOk());
  return std::move(index).value();
}

struct OracleHit {
  double score;
  uint64_t id;
};

// Brute force in double over the vectors as given.
std::vector<OracleHit> OracleRanking(const std::vector<float>& targets,
                                     const std::vector<uint64_t>& ids,
                                     const float* q, int dim, Metric metric,
                                     const std::set<uint64_t>& excluded) {
  std::vector<OracleHit> hits;
  const double qn = std::sqrt(Dot(q, q, dim));
  for (size_t i = 0; i < ids.size(); ++i) {
    if (excluded.count(ids[i])) continue;
    const float* x = targets.data() + i * dim;
    double s = Dot(q, x, dim);
    if (metric == Metric::kCosine) s /= qn * std::sqrt(Dot(x, x, dim));
    hits.push_back({s, ids[i]});
  }
  std::sort(hits.begin(), hits.end(), [](const OracleHit& a, const OracleHit& b) {
    return a.score > b.score || (a.score == b.score && a.id < b.id);
  });
  return hits;
}

void ExpectSameRanking(const QueryResult& got,
                       const std::vector<OracleHit>& want, size_t offset,
                       size_t k) {
  ASSERT_EQ(got.ids.size(), std::min(k, want.size() - offset));
  for (size_t i = 0; i < got.ids.size(); ++i) {
    const OracleHit& w = want[offset + i];
    EXPECT_NEAR(got.scores[i], w.score, kScoreTol) << "rank " << i;
    if (got.ids[i] != w.id) {
      // Only a near-tie may swap ids.
      EXPECT_NEAR(got.scores[i], w.score, kScoreTol) << "rank " << i;
      const auto it = std::find_if(want.begin(), want.end(), [&](const OracleHit& h) {
        return h.id == got.ids[i];
      });
      ASSERT_NE(it, want.end());
      EXPECT_NEAR(it->score, w.score, kScoreTol) << "rank " << i;
    }
  }
}

class ExactTopKTest : public ::testing::TestWithParam<Metric> {};

TEST_P(ExactTopKTest, EqualsBruteForceWithExclusionsAndRankWindow) {
  const int dim = 24;
  const size_t n = 3000, nq = 40;
  const Metric metric = GetParam();
  auto index = MakeIndex(dim, metric);
  const auto targets = RandomVectors(n, dim, 1);
  const auto ids = Ids(n);
  ASSERT_THAT(index->Upsert(ids, targets, 0), IsOk());
  const auto queries = RandomVectors(nq, dim, 2);

  // Each query excludes its own current top 3 and one unknown id.
  std::vector<std::vector<uint64_t>> exclude(nq);
  for (size_t qi = 0; qi < nq; ++qi) {
    auto full = OracleRanking(targets, ids, &queries[qi * dim], dim, metric, {});
    for (int j = 0; j < 3; ++j) exclude[qi].push_back(full[j].id);
    exclude[qi].push_back(999999);
  }
  for (int rank_offset : {0, 5}) {
    SearchParams p{.mode = MineMode::kTopK, .k = 17, .rank_offset = rank_offset};
    auto r = index->Search(queries, exclude, p);
    ASSERT_THAT(r.status(), IsOk());
    ASSERT_EQ(r->queries.size(), nq);
    for (size_t qi = 0; qi < nq; ++qi) {
      std::set<uint64_t> ex(exclude[qi].begin(), exclude[qi].end());
      auto want = OracleRanking(targets, ids, &queries[qi * dim], dim, metric, ex);
      const QueryResult& got = r->queries[qi];
      EXPECT_EQ(got.num_top, 17);
      for (uint64_t id : got.ids) EXPECT_EQ(ex.count(id), 0u) << "excluded id returned";
      ExpectSameRanking(got, want, rank_offset, 17);
      for (float lq : got.log_q) EXPECT_EQ(lq, 0.0f);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Metrics, ExactTopKTest,
                         ::testing::Values(Metric::kInnerProduct, Metric::kCosine));

TEST(ExactIndexTest, DeletesAndReusedRowsAreServedCorrectly) {
  const int dim = 8;
  auto index = MakeIndex(dim);
  auto targets = RandomVectors(200, dim, 3);
  auto ids = Ids(200);
  ASSERT_THAT(index->Upsert(ids, targets, 0), IsOk());
  // Delete the first 50, insert 20 new ones (reusing rows).
  std::vector<uint64_t> gone(ids.begin(), ids.begin() + 50);
  ASSERT_THAT(index->Delete(gone, false), ::negmine::testing::IsOkAndHolds(50u));
  auto fresh = RandomVectors(20, dim, 4);
  auto fresh_ids = Ids(20, 5000);
  ASSERT_THAT(index->Upsert(fresh_ids, fresh, 1), IsOk());

  std::vector<float> live(targets.begin() + 50 * dim, targets.end());
  std::vector<uint64_t> live_ids(ids.begin() + 50, ids.end());
  live.insert(live.end(), fresh.begin(), fresh.end());
  live_ids.insert(live_ids.end(), fresh_ids.begin(), fresh_ids.end());
  EXPECT_EQ(index->Stats().num_targets, 170u);

  const auto queries = RandomVectors(10, dim, 5);
  auto r = index->Search(queries, {}, {.k = 170});
  ASSERT_THAT(r.status(), IsOk());
  for (size_t qi = 0; qi < 10; ++qi) {
    auto want = OracleRanking(live, live_ids, &queries[qi * dim], dim,
                              Metric::kInnerProduct, {});
    ExpectSameRanking(r->queries[qi], want, 0, 170);
  }
}

TEST(ExactIndexTest, GetReturnsStoredVectorsBitExactly) {
  auto index = MakeIndex(3, Metric::kCosine);
  std::vector<float> v = {0.1f, -2.5f, 3e-7f, 1, 1, 1};
  ASSERT_THAT(index->Upsert({7, 9}, v, 42), IsOk());
  std::vector<float> got;
  std::vector<int64_t> steps;
  ASSERT_THAT(index->Get({9, 7}, &got, &steps), IsOk());
  EXPECT_EQ(got, (std::vector<float>{1, 1, 1, 0.1f, -2.5f, 3e-7f}));
  EXPECT_EQ(steps, (std::vector<int64_t>{42, 42}));
  EXPECT_THAT(index->Get({8}, &got, &steps),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("8")));
}

// Softmax draws with replacement: frequencies match the exact softmax.
TEST(ExactIndexTest, SamplingWithReplacementMatchesSoftmax) {
  const int dim = 6;
  const size_t n = 60;
  const float tau = 0.5f;
  auto index = MakeIndex(dim);
  auto targets = RandomVectors(n, dim, 6);
  for (float& x : targets) x *= 0.4f;
  auto ids = Ids(n);
  ASSERT_THAT(index->Upsert(ids, targets, 0), IsOk());
  const auto q = RandomVectors(1, dim, 7);
  const std::set<uint64_t> ex = {ids[3], ids[10]};

  // k <= size: draw n per call, over many calls.
  SearchParams p{.mode = MineMode::kSample, .k = static_cast<int>(n),
                 .temperature = tau, .with_replacement = true,
                 .want_log_z = true};
  std::vector<int64_t> counts(n, 0);
  int64_t draws = 0;
  auto want = OracleRanking(targets, ids, q.data(), dim, Metric::kInnerProduct, ex);
  std::vector<double> scores;
  for (auto& h : want) scores.push_back(h.score);
  const auto probs = Softmax(scores, tau);
  double log_z = 0;
  {
    const double m = scores[0];
    double z = 0;
    for (double s : scores) z += std::exp((s - m) / tau);
    log_z = m / tau + std::log(z);
  }
  for (int call = 0; call < 400; ++call) {
    p.seed = 1000 + call;
    auto r = index->Search(q, {{ex.begin(), ex.end()}}, p);
    ASSERT_THAT(r.status(), IsOk());
    const QueryResult& got = r->queries[0];
    ASSERT_EQ(got.ids.size(), n);
    EXPECT_EQ(got.num_top, 0);
    EXPECT_NEAR(got.log_z_lo, log_z, 1e-3);
    EXPECT_EQ(got.log_z_lo, got.log_z_hi);
    for (size_t i = 0; i < got.ids.size(); ++i) {
      ASSERT_EQ(ex.count(got.ids[i]), 0u);
      const size_t pos = std::find_if(want.begin(), want.end(), [&](auto& h) {
                           return h.id == got.ids[i];
                         }) - want.begin();
      ++counts[pos];
      ++draws;
      EXPECT_NEAR(got.log_q[i], want[pos].score / tau - log_z, 1e-3);
    }
  }
  counts.resize(want.size());
  auto [stat, df] = ChiSquare(counts, probs, draws);
  EXPECT_LT(stat, ChiSquareCritical(df)) << "df " << df;
}

// Without replacement: ids are distinct, and the first draw follows the
// softmax (Gumbel-top-k is sequential sampling without replacement).
TEST(ExactIndexTest, SamplingWithoutReplacementIsDistinctAndFirstDrawIsSoftmax) {
  const int dim = 5;
  const size_t n = 40;
  const float tau = 0.3f;
  auto index = MakeIndex(dim);
  auto targets = RandomVectors(n, dim, 8);
  for (float& x : targets) x *= 0.3f;
  auto ids = Ids(n);
  ASSERT_THAT(index->Upsert(ids, targets, 0), IsOk());
  // 4000 copies of one query: each gets its own random stream.
  const auto q1 = RandomVectors(1, dim, 9);
  std::vector<float> queries;
  for (int i = 0; i < 4000; ++i) queries.insert(queries.end(), q1.begin(), q1.end());

  auto r = index->Search(queries, {},
                         {.mode = MineMode::kSample, .k = 8, .temperature = tau, .seed = 3});
  ASSERT_THAT(r.status(), IsOk());
  auto want = OracleRanking(targets, ids, q1.data(), dim, Metric::kInnerProduct, {});
  std::vector<double> scores;
  for (auto& h : want) scores.push_back(h.score);
  const auto probs = Softmax(scores, tau);
  std::vector<int64_t> counts(n, 0);
  for (const QueryResult& got : r->queries) {
    ASSERT_EQ(got.ids.size(), 8u);
    EXPECT_EQ(std::set<uint64_t>(got.ids.begin(), got.ids.end()).size(), 8u);
    const size_t pos = std::find_if(want.begin(), want.end(), [&](auto& h) {
                         return h.id == got.ids[0];
                       }) - want.begin();
    ++counts[pos];
  }
  auto [stat, df] = ChiSquare(counts, probs, 4000);
  EXPECT_LT(stat, ChiSquareCritical(df)) << "df " << df;
}

TEST(ExactIndexTest, SameSeedSameSamplesDifferentSeedDifferent) {
  auto index = MakeIndex(4);
  ASSERT_THAT(index->Upsert(Ids(500), RandomVectors(500, 4, 1), 0), IsOk());
  const auto q = RandomVectors(3, 4, 2);
  SearchParams p{.mode = MineMode::kSample, .k = 10, .temperature = 1, .seed = 5};
  auto a = index->Search(q, {}, p), b = index->Search(q, {}, p);
  p.seed = 6;
  auto c = index->Search(q, {}, p);
  ASSERT_TRUE(a.ok() && b.ok() && c.ok());
  EXPECT_EQ(a->queries[1].ids, b->queries[1].ids);
  EXPECT_NE(a->queries[1].ids, c->queries[1].ids);
}

TEST(ExactIndexTest, MixedIsTopThenSamplesFromTheRest) {
  const int dim = 8;
  auto index = MakeIndex(dim);
  auto targets = RandomVectors(300, dim, 12);
  auto ids = Ids(300);
  ASSERT_THAT(index->Upsert(ids, targets, 0), IsOk());
  const auto q = RandomVectors(5, dim, 13);
  auto r = index->Search(q, {}, {.mode = MineMode::kMixed, .k = 12, .temperature = 0.2f,
                                 .num_hard = 4, .seed = 1});
  ASSERT_THAT(r.status(), IsOk());
  for (size_t qi = 0; qi < 5; ++qi) {
    const QueryResult& got = r->queries[qi];
    auto want = OracleRanking(targets, ids, &q[qi * dim], dim, Metric::kInnerProduct, {});
    ASSERT_EQ(got.ids.size(), 12u);
    EXPECT_EQ(got.num_top, 4);
    QueryResult top = got;
    top.ids.resize(4);
    top.scores.resize(4);
    ExpectSameRanking(top, want, 0, 4);
    std::set<uint64_t> all(got.ids.begin(), got.ids.end());
    EXPECT_EQ(all.size(), 12u) << "samples must not repeat the top part";
    for (int i = 4; i < 12; ++i) EXPECT_LT(got.log_q[i], 0.0f);
  }
}

TEST(ExactIndexTest, RejectsBadInputWithNamedFieldAndValue) {
  auto index = MakeIndex(4, Metric::kCosine);
  EXPECT_THAT(index->Search({1, 2, 3, 4}, {}, {.k = 1}),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("no targets")));
  ASSERT_THAT(index->Upsert(Ids(10), RandomVectors(10, 4, 1), 0), IsOk());
  const std::vector<float> q = {1, 2, 3, 4};
  EXPECT_THAT(index->Search(q, {}, {.k = 0}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("params.k = 0")));
  EXPECT_THAT(index->Search(q, {}, {.k = 11}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("params.k = 11")));
  EXPECT_THAT(index->Search(q, {}, {.mode = MineMode::kSample, .k = 2, .temperature = 0}),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("params.temperature = 0")));
  EXPECT_THAT(index->Search(q, {}, {.mode = MineMode::kMixed, .k = 2, .num_hard = 3}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("params.num_hard = 3")));
  EXPECT_THAT(index->Search({1, 2, 3}, {}, {.k = 1}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("dim 4")));
  EXPECT_THAT(index->Search({1, NAN, 3, 4}, {}, {.k = 1}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("queries[0][1] = nan")));
  EXPECT_THAT(index->Search(q, {{}, {}}, {.k = 1}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("exclude has 2")));
  EXPECT_THAT(index->Upsert({1, 2, 1}, std::vector<float>(12, 1.0f), 0),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("duplicate id 1")));
  EXPECT_THAT(index->Upsert({1}, {1, INFINITY, 0, 0}, 0),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("vectors[0][1] = inf")));
  EXPECT_THAT(index->Upsert({1}, {0, 0, 0, 0}, 0),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("zero norm")));
  EXPECT_THAT(index->Delete({1000, 77}, false),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("unknown id 77")));
  EXPECT_EQ(index->Stats().num_targets, 10u) << "a failed delete deletes nothing";
  EXPECT_THAT(index->Delete({1000, 77}, true), ::negmine::testing::IsOkAndHolds(1u));
  EXPECT_THAT(CreateIndex({.dim = 0}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("dim = 0")));
}

TEST(ExactIndexTest, CudaBackendWithoutDeviceIsAClearError) {
  auto r = CreateIndex({.dim = 4, .backend = Backend::kCuda});
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(r.status().code() == absl::StatusCode::kUnimplemented ||
              r.status().code() == absl::StatusCode::kFailedPrecondition)
      << r.status();
  EXPECT_THAT(r.status().message(), HasSubstr("cuda"));
}

}  // namespace
}  // namespace negmine
