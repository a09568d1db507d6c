// The mining controls (core/mine_plan.h, StoreIndex::Search) against brute
// force over the scored vectors: positives, the score window and margins,
// SimANS, the dedupe, complete samples without replacement, and the counts.
// Every test runs on the exact index and the tree, fixed seeds throughout.
#include <algorithm>
#include <cmath>
#include <map>
#include <memory>
#include <numeric>
#include <set>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "core/index.h"
#include "tests/test_util.h"

namespace negmine {
namespace {

using ::negmine::testing::ChiSquare;
using ::negmine::testing::ChiSquareCritical;
using ::negmine::testing::RandomVectors;
using ::negmine::testing::StatusIs;
using ::testing::HasSubstr;

constexpr int kDim = 16;

struct Fixture {
  std::unique_ptr<Index> index;
  std::vector<uint64_t> ids;
  std::vector<float> scored;  // GetScored of ids, row by row
};

Fixture Make(IndexKind kind, Metric metric, size_t n, uint64_t seed, int dim = kDim) {
  Fixture f;
  IndexOptions o{.dim = dim, .metric = metric, .backend = Backend::kCpu, .kind = kind};
  o.tree.leaf_size = 16;
  o.tree.background_rebuild = false;
  f.index = *CreateIndex(o);
  f.ids.resize(n);
  std::iota(f.ids.begin(), f.ids.end(), 1000);
  EXPECT_TRUE(f.index->Upsert(f.ids, RandomVectors(n, dim, seed), 0).ok());
  EXPECT_TRUE(f.index->GetScored(f.ids, &f.scored).ok());
  return f;
}

// The oracle's scores of one query against every target (double precision,
// in scoring space: a cosine query normalized).
std::vector<double> Scores(const Fixture& f, const float* q, Metric metric, int dim = kDim) {
  double norm = 1;
  if (metric == Metric::kCosine) norm = std::sqrt(testing::Dot(q, q, dim));
  std::vector<double> s(f.ids.size());
  for (size_t i = 0; i < f.ids.size(); ++i) {
    s[i] = testing::Dot(q, f.scored.data() + i * dim, dim) / norm;
  }
  return s;
}

// The oracle's eligibility: the window the filters leave, given s_pos.
struct Window {
  double lo, hi;
  bool In(double s) const { return s >= lo && s <= hi; }
};
Window Of(const MineFilters& m, double s_pos) {
  double hi = m.max_score;
  if (!std::isnan(m.absolute_margin)) hi = std::min(hi, s_pos - m.absolute_margin);
  if (!std::isnan(m.relative_margin)) hi = std::min(hi, s_pos - std::abs(s_pos) * m.relative_margin);
  return {m.min_score, hi};
}

// A score this close to a window's edge is not checked (float rounding).
constexpr double kEdge = 1e-4;

class FilterTest : public ::testing::TestWithParam<std::tuple<IndexKind, Metric>> {};

// TOP_K with the window, both margins and two positives per query: the
// result is the oracle's best eligible targets (the margins from the lower
// positive score), and the counts add up and match the oracle's.
TEST_P(FilterTest, TopKHonoursEveryFilterAndCountsAddUp) {
  const auto [kind, metric] = GetParam();
  Fixture f = Make(kind, metric, 3000, 7);
  const size_t nq = 24;
  const std::vector<float> queries = RandomVectors(nq, kDim, 8);
  std::vector<std::vector<uint64_t>> positives(nq), exclude(nq);
  std::vector<std::vector<double>> oracle(nq);
  for (size_t i = 0; i < nq; ++i) {
    oracle[i] = Scores(f, queries.data() + i * kDim, metric);
    // Positives: the 3rd and the 40th best targets; exclusions: 5 others.
    std::vector<size_t> order(f.ids.size());
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(),
              [&](size_t a, size_t b) { return oracle[i][a] > oracle[i][b]; });
    positives[i] = {f.ids[order[2]], f.ids[order[39]]};
    for (size_t j = 100; j < 105; ++j) exclude[i].push_back(f.ids[order[j]]);
  }
  for (int variant = 0; variant < 3; ++variant) {
    SearchParams p{.k = 20};
    if (variant == 0) p.filters.relative_margin = 0.1f;
    if (variant == 1) p.filters.absolute_margin = 0.05f;
    if (variant == 2) {
      p.filters.max_score = metric == Metric::kCosine ? 0.5f : 3.0f;
      p.filters.min_score = metric == Metric::kCosine ? 0.2f : 1.0f;
      p.filters.relative_margin = 0.02f;
    }
    p.positives = positives;
    absl::StatusOr<SearchResult> r = f.index->Search(queries, exclude, p);
    ASSERT_TRUE(r.ok()) << r.status();
    for (size_t i = 0; i < nq; ++i) {
      const QueryResult& got = r->queries[i];
      const std::set<uint64_t> out(exclude[i].begin(), exclude[i].end());
      ASSERT_EQ(got.positive_scores.size(), 2u);
      const double s_pos = std::min(got.positive_scores[0], got.positive_scores[1]);
      EXPECT_NEAR(s_pos, std::min(oracle[i][positives[i][0] - 1000], oracle[i][positives[i][1] - 1000]), 1e-4);
      const Window w = Of(p.filters, s_pos);
      // The oracle: eligible targets by descending score; and the counts.
      std::vector<std::pair<double, uint64_t>> eligible;
      FilterCounts want;
      for (size_t t = 0; t < f.ids.size(); ++t) {
        const double s = oracle[i][t];
        const uint64_t id = f.ids[t];
        if (id == positives[i][0] || id == positives[i][1]) { ++want.positives; continue; }
        if (out.count(id)) { ++want.excluded; continue; }
        if (s > p.filters.max_score) { ++want.max_score; continue; }
        if (s < p.filters.min_score) { ++want.min_score; continue; }
        if (!std::isnan(p.filters.absolute_margin) && s > s_pos - p.filters.absolute_margin) { ++want.absolute_margin; continue; }
        if (!w.In(s)) { ++want.relative_margin; continue; }
        eligible.push_back({s, id});
      }
      std::sort(eligible.begin(), eligible.end(),
                [](const auto& a, const auto& b) { return a.first > b.first; });
      ASSERT_EQ(got.ids.size(), std::min<size_t>(20, eligible.size()));
      for (size_t j = 0; j < got.ids.size(); ++j) {
        EXPECT_NEAR(got.scores[j], eligible[j].first, 1e-4) << "query " << i << " rank " << j;
        if (std::abs(eligible[j].first - (j + 1 < eligible.size() ? eligible[j + 1].first : -1e9)) > kEdge &&
            (j == 0 || std::abs(eligible[j].first - eligible[j - 1].first) > kEdge)) {
          EXPECT_EQ(got.ids[j], eligible[j].second) << "query " << i << " rank " << j;
        }
      }
      // The counts add up, and (away from the window's edges) match.
      const FilterCounts& c = got.removed;
      EXPECT_EQ(c.excluded + c.positives + c.max_score + c.min_score + c.absolute_margin +
                    c.relative_margin + got.num_eligible,
                f.ids.size());
      EXPECT_EQ(c.excluded, want.excluded);
      EXPECT_EQ(c.positives, want.positives);
      auto near = [](size_t a, size_t b) { return a > b ? a - b : b - a; };
      EXPECT_LE(near(c.max_score, want.max_score), 1u);
      EXPECT_LE(near(c.min_score, want.min_score), 1u);
      EXPECT_LE(near(c.absolute_margin, want.absolute_margin), 1u);
      EXPECT_LE(near(c.relative_margin, want.relative_margin), 1u);
      EXPECT_LE(near(got.num_eligible, eligible.size()), 1u);
    }
  }
}

// SAMPLE with replacement under a margin: exact draws follow the softmax
// restricted to the eligible targets (chi-square), and log q is that
// distribution's; the tree's proposal draws only eligible targets and
// follows its own log q.
TEST_P(FilterTest, SamplesFollowTheRestrictedSoftmax) {
  const auto [kind, metric] = GetParam();
  Fixture f = Make(kind, metric, 400, 11);
  const std::vector<float> q = RandomVectors(1, kDim, 12);
  const std::vector<double> s = Scores(f, q.data(), metric);
  std::vector<size_t> order(s.size());
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return s[a] > s[b]; });
  const std::vector<std::vector<uint64_t>> positives = {{f.ids[order[5]]}};
  const double tau = metric == Metric::kCosine ? 0.1 : 1.0;
  for (Sampler sampler : {Sampler::kExact, Sampler::kProposal}) {
    SCOPED_TRACE(sampler == Sampler::kExact ? "exact sampler" : "proposal sampler");
    SearchParams p{.mode = MineMode::kSample, .sampler = sampler, .k = 300,
                   .temperature = static_cast<float>(tau), .with_replacement = true};
    p.filters.relative_margin = 0.05f;
    p.positives = positives;
    const Window w = Of(p.filters, s[order[5]]);
    std::vector<double> logits(s.size(), -1e300);
    double max_logit = -1e300;
    for (size_t t = 0; t < s.size(); ++t) {
      if (t != order[5] && w.In(s[t])) max_logit = std::max(max_logit, logits[t] = s[t] / tau);
    }
    std::vector<double> prob(s.size());
    double z = 0;
    for (size_t t = 0; t < s.size(); ++t) z += prob[t] = std::exp(logits[t] - max_logit);
    for (double& v : prob) v /= z;
    const double log_z = max_logit + std::log(z);
    // The exact index draws exactly whatever the sampler; the tree's
    // proposal has its own log q.
    const bool softmax = sampler == Sampler::kExact || kind == IndexKind::kExact;
    std::vector<int64_t> counts(s.size(), 0);
    std::vector<QueryResult> all;
    int64_t draws = 0;
    for (uint64_t seed = 1; seed <= 40; ++seed) {
      p.seed = seed;
      absl::StatusOr<SearchResult> r = f.index->Search(q, {}, p);
      ASSERT_TRUE(r.ok()) << r.status();
      const QueryResult& got = r->queries[0];
      ASSERT_EQ(got.ids.size(), 300u);
      for (size_t j = 0; j < got.ids.size(); ++j) {
        const size_t t = got.ids[j] - 1000;
        ASSERT_TRUE(w.In(s[t]) || std::abs(s[t] - w.hi) < kEdge) << s[t];
        ASSERT_NE(t, order[5]);
        if (softmax) {
          EXPECT_NEAR(got.log_q[j], s[t] / tau - log_z, 2e-2);
        }
        ++counts[t];
        ++draws;
      }
      all.push_back(got);
    }
    if (softmax) {
      const auto [stat, df] = ChiSquare(counts, prob, draws);
      EXPECT_LT(stat, ChiSquareCritical(df)) << "df " << df;
    } else {
      const testing::LogQFrequencies lq = testing::LogQFrequencyTest(all, 1e-4);
      EXPECT_EQ(lq.inconsistent, 0u);
      EXPECT_LE(lq.seen_mass, 1.0 + 1e-3);
      EXPECT_LT(lq.stat, ChiSquareCritical(lq.df)) << "df " << lq.df;
    }
  }
}

// SimANS: draws from exp(-a (s - s_pos - b)^2) over the top K eligible, with
// the exact log q.
TEST_P(FilterTest, SimansFollowsItsDistributionOverTheTopK) {
  const auto [kind, metric] = GetParam();
  Fixture f = Make(kind, metric, 2000, 21);
  const std::vector<float> q = RandomVectors(1, kDim, 22);
  const std::vector<double> s = Scores(f, q.data(), metric);
  std::vector<size_t> order(s.size());
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return s[a] > s[b]; });
  const std::vector<std::vector<uint64_t>> positives = {{f.ids[order[0]]}};
  SearchParams p{.mode = MineMode::kSample, .k = 200, .with_replacement = true};
  p.distribution = SampleDistribution::kSimans;
  p.simans = {.a = metric == Metric::kCosine ? 40.0f : 2.0f, .b = 0.0f, .candidates = 300};
  p.positives = positives;
  // The pool: ranks 1..300 (rank 0 is the positive).
  const double s_pos = s[order[0]];
  std::vector<double> prob(s.size(), 0);
  double z = 0;
  for (size_t r = 1; r <= 300; ++r) {
    const double d = s[order[r]] - s_pos - p.simans.b;
    z += prob[order[r]] = std::exp(-p.simans.a * d * d);
  }
  for (double& v : prob) v /= z;
  std::vector<int64_t> counts(s.size(), 0);
  int64_t draws = 0;
  for (uint64_t seed = 1; seed <= 50; ++seed) {
    p.seed = seed;
    absl::StatusOr<SearchResult> r = f.index->Search(q, {}, p);
    ASSERT_TRUE(r.ok()) << r.status();
    const QueryResult& got = r->queries[0];
    ASSERT_EQ(got.ids.size(), 200u);
    for (size_t j = 0; j < got.ids.size(); ++j) {
      const size_t t = got.ids[j] - 1000;
      ASSERT_GT(prob[t], 0) << "outside the pool: " << got.ids[j];
      EXPECT_NEAR(got.log_q[j], std::log(prob[t]), 1e-3);
      ++counts[t];
      ++draws;
    }
  }
  const auto [stat, df] = ChiSquare(counts, prob, draws);
  EXPECT_LT(stat, ChiSquareCritical(df)) << "df " << df;
}

// Without replacement, at a low temperature over 50,000 targets, every
// query gets its k = 64 results, for both samplers; MIXED too.
TEST_P(FilterTest, WithoutReplacementIsNeverShort) {
  const auto [kind, metric] = GetParam();
  Fixture f = Make(kind, metric, 50000, 31, 32);
  const std::vector<float> queries = RandomVectors(16, 32, 32);
  for (Sampler sampler : {Sampler::kProposal, Sampler::kExact}) {
    for (MineMode mode : {MineMode::kSample, MineMode::kMixed}) {
      SearchParams p{.mode = mode, .sampler = sampler, .k = 64, .temperature = 0.02f,
                     .num_hard = mode == MineMode::kMixed ? 8 : 0, .seed = 5};
      absl::StatusOr<SearchResult> r = f.index->Search(queries, {}, p);
      ASSERT_TRUE(r.ok()) << r.status();
      for (const QueryResult& got : r->queries) {
        EXPECT_EQ(got.ids.size(), 64u) << got.shortfall;
        EXPECT_EQ(std::set<uint64_t>(got.ids.begin(), got.ids.end()).size(), got.ids.size());
        EXPECT_EQ(got.shortfall, "");
      }
    }
  }
}

// The dedupe: targets planted as near-copies of others. No result is within
// the threshold of a positive or of an earlier result, and TOP_K equals the
// greedy oracle (best first, a near-duplicate of what is kept dropped).
TEST_P(FilterTest, DedupeDropsNearDuplicatesAndCountsThem) {
  const auto [kind, metric] = GetParam();
  IndexOptions o{.dim = kDim, .metric = metric, .backend = Backend::kCpu, .kind = kind};
  o.tree.leaf_size = 16;
  o.tree.background_rebuild = false;
  std::unique_ptr<Index> index = *CreateIndex(o);
  std::vector<float> v = RandomVectors(1000, kDim, 41);
  const std::vector<float> noise = RandomVectors(1000, kDim, 42);
  // Rows 500.. copy rows 0.. with a little noise.
  for (size_t i = 500; i < 1000; ++i) {
    for (int j = 0; j < kDim; ++j) v[i * kDim + j] = v[(i - 500) * kDim + j] + 0.01f * noise[i * kDim + j];
  }
  std::vector<uint64_t> ids(1000);
  std::iota(ids.begin(), ids.end(), 0);
  ASSERT_TRUE(index->Upsert(ids, v, 0).ok());
  std::vector<float> scored;
  ASSERT_TRUE(index->GetScored(ids, &scored).ok());
  auto cosine = [&](uint64_t a, uint64_t b) {
    const float* x = scored.data() + a * kDim;
    const float* y = scored.data() + b * kDim;
    return testing::Dot(x, y, kDim) / std::sqrt(testing::Dot(x, x, kDim) * testing::Dot(y, y, kDim));
  };
  const std::vector<float> queries = RandomVectors(8, kDim, 43);
  for (MineMode mode : {MineMode::kTopK, MineMode::kSample, MineMode::kMixed}) {
    SearchParams p{.mode = mode, .k = 30, .temperature = 0.2f, .num_hard = 10, .seed = 3};
    p.filters.dedupe_cosine = 0.99f;
    std::vector<std::vector<uint64_t>> positives(8);
    std::vector<double> s0;
    for (size_t i = 0; i < 8; ++i) {
      Fixture f0;
      f0.ids = ids;
      f0.scored = scored;
      std::vector<double> s = Scores(f0, queries.data() + i * kDim, metric);
      positives[i] = {static_cast<uint64_t>(std::max_element(s.begin(), s.end()) - s.begin())};
    }
    p.positives = positives;
    absl::StatusOr<SearchResult> r = index->Search(queries, {}, p);
    ASSERT_TRUE(r.ok()) << r.status();
    size_t dropped = 0;
    for (size_t i = 0; i < 8; ++i) {
      const QueryResult& got = r->queries[i];
      ASSERT_EQ(got.ids.size(), 30u) << got.shortfall;
      dropped += got.removed.dedupe;
      for (size_t a = 0; a < got.ids.size(); ++a) {
        EXPECT_LT(cosine(got.ids[a], positives[i][0]), 0.99 + 1e-4);
        for (size_t b = 0; b < a; ++b) EXPECT_LT(cosine(got.ids[a], got.ids[b]), 0.99 + 1e-4);
      }
      if (mode == MineMode::kTopK) {
        Fixture f0;
        f0.ids = ids;
        f0.scored = scored;
        std::vector<double> s = Scores(f0, queries.data() + i * kDim, metric);
        std::vector<uint64_t> order(ids);
        std::sort(order.begin(), order.end(), [&](uint64_t a, uint64_t b) { return s[a] > s[b]; });
        std::vector<uint64_t> kept;
        size_t want_dropped = 0;
        for (uint64_t id : order) {
          if (kept.size() == 30) break;
          if (id == positives[i][0]) continue;
          bool dup = cosine(id, positives[i][0]) >= 0.99;
          for (uint64_t k : kept) dup = dup || cosine(id, k) >= 0.99;
          if (dup) { ++want_dropped; continue; }
          kept.push_back(id);
        }
        EXPECT_EQ(got.ids, kept) << "query " << i;
        EXPECT_EQ(got.removed.dedupe, want_dropped);
      }
    }
    EXPECT_GT(dropped, 0u) << "mode " << static_cast<int>(mode);
  }
}

INSTANTIATE_TEST_SUITE_P(Kinds, FilterTest,
                         ::testing::Combine(::testing::Values(IndexKind::kExact, IndexKind::kTree),
                                            ::testing::Values(Metric::kInnerProduct,
                                                              Metric::kCosine)));

// A short result says why.
TEST(FilterCountsTest, ShortResultSaysWhy) {
  Fixture f = Make(IndexKind::kTree, Metric::kCosine, 500, 51);
  const std::vector<float> q = RandomVectors(1, kDim, 52);
  SearchParams p{.k = 50};
  p.filters.min_score = 0.6f;
  absl::StatusOr<SearchResult> r = f.index->Search(q, {}, p);
  ASSERT_TRUE(r.ok()) << r.status();
  const QueryResult& got = r->queries[0];
  ASSERT_LT(got.ids.size(), 50u);
  EXPECT_EQ(got.ids.size(), got.num_eligible);
  EXPECT_THAT(got.shortfall, HasSubstr("below min_score"));
  for (float s : got.scores) EXPECT_GE(s, 0.6f);
}

TEST(FilterValidationTest, BadValuesNameTheField) {
  Fixture f = Make(IndexKind::kTree, Metric::kCosine, 300, 61);
  const std::vector<float> q = RandomVectors(1, kDim, 62);
  const std::vector<std::vector<uint64_t>> pos = {{1000}};
  auto search = [&](SearchParams p, bool with_positives = true) {
    if (with_positives) p.positives = pos;
    return f.index->Search(q, {}, p).status();
  };
  SearchParams p{.k = 10};
  p.filters.absolute_margin = -0.1f;
  EXPECT_THAT(search(p), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("absolute_margin")));
  p = SearchParams{.k = 10};
  p.filters.relative_margin = -1;
  EXPECT_THAT(search(p), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("relative_margin")));
  p = SearchParams{.k = 10};
  p.filters.min_score = 0.5f;
  p.filters.max_score = 0.2f;
  EXPECT_THAT(search(p), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("min_score")));
  p = SearchParams{.k = 10};
  p.filters.relative_margin = 0.05f;
  EXPECT_THAT(search(p, false), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("positives")));
  p = SearchParams{.mode = MineMode::kSample, .k = 10};
  p.distribution = SampleDistribution::kSimans;
  p.simans.candidates = 5;
  EXPECT_THAT(search(p), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("simans.candidates")));
  p = SearchParams{.k = 10};
  p.filters.dedupe_cosine = 1.5f;
  EXPECT_THAT(search(p), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("dedupe_cosine")));
  p = SearchParams{.k = 10};
  const std::vector<std::vector<uint64_t>> missing = {{77}};
  p.positives = missing;
  EXPECT_THAT(f.index->Search(q, {}, p).status(),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("positives[0][0] = 77")));
}

}  // namespace
}  // namespace negmine
