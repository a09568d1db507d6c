// The tree index against brute force (the exact index), with fixed seeds.
#include "core/tree/tree_index.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <map>
#include <numeric>
#include <set>
#include <thread>
#include <vector>

#include "core/exact_index.h"
#include "core/random.h"
#include "core/store/drift_bench.h"
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
using ::negmine::testing::StatusIs;
using ::testing::HasSubstr;

// float32 GEMM vs float32 dot loops: scores agree to this, and ids may differ
// only between targets whose scores agree to this.
constexpr double kScoreTol = 1e-4;

std::vector<float> Clustered(size_t n, int dim, uint64_t seed) {
  DriftBench bench({.num_targets = n, .num_queries = 0, .dim = dim, .latent_dim = 8,
                    .hidden_dim = 32, .num_clusters = 40, .seed = seed});
  return bench.Targets(0);
}

std::vector<uint64_t> Ids(size_t n, uint64_t base = 100) {
  std::vector<uint64_t> ids(n);
  for (size_t i = 0; i < n; ++i) ids[i] = base + 3 * i;
  return ids;
}

struct Pair {
  std::unique_ptr<Index> tree, exact;
  TreeIndex* tree_index() { return static_cast<TreeIndex*>(tree.get()); }
};

Pair MakePair(int dim, Metric metric, int leaf_size = 16, int branching = 4) {
  IndexOptions o{.dim = dim, .metric = metric, .backend = Backend::kCpu,
                 .kind = IndexKind::kTree};
  o.tree.leaf_size = leaf_size;
  o.tree.branching = branching;
  o.tree.background_rebuild = false;
  Pair p;
  p.tree = CreateIndex(o).value();
  o.kind = IndexKind::kExact;
  p.exact = CreateIndex(o).value();
  return p;
}

void Upsert(Pair& p, absl::Span<const uint64_t> ids, absl::Span<const float> x,
            int64_t step = 0) {
  ASSERT_THAT(p.tree->Upsert(ids, x, step), IsOk());
  ASSERT_THAT(p.exact->Upsert(ids, x, step), IsOk());
}

// Top-k of the tree equals the exact index's, up to near-ties.
void ExpectSameTopK(Pair& p, const std::vector<float>& q, int dim, int k,
                    const std::vector<std::vector<uint64_t>>& exclude = {},
                    int rank_offset = 0) {
  SearchParams sp{.mode = MineMode::kTopK, .k = k, .rank_offset = rank_offset};
  auto got = p.tree->Search(q, exclude, sp);
  auto want = p.exact->Search(q, exclude, sp);
  ASSERT_THAT(got.status(), IsOk());
  ASSERT_THAT(want.status(), IsOk());
  EXPECT_EQ(got->index_version, want->index_version);
  for (size_t i = 0; i < q.size() / dim; ++i) {
    const QueryResult& g = got->queries[i];
    const QueryResult& w = want->queries[i];
    ASSERT_EQ(g.ids.size(), w.ids.size()) << "query " << i;
    for (size_t j = 0; j < g.ids.size(); ++j) {
      ASSERT_NEAR(g.scores[j], w.scores[j], kScoreTol) << "query " << i << " rank " << j;
      if (g.ids[j] != w.ids[j]) {
        // Only a near-tie may swap: the tree's id must be in the exact list
        // with a score within the tolerance.
        auto it = std::find(w.ids.begin(), w.ids.end(), g.ids[j]);
        if (it == w.ids.end()) {
          ASSERT_NEAR(g.scores[j], w.scores.back(), kScoreTol)
              << "query " << i << ": id " << g.ids[j] << " is not in the exact top";
        } else {
          ASSERT_NEAR(w.scores[it - w.ids.begin()], w.scores[j], kScoreTol);
        }
      }
    }
  }
}

class TreeTopKTest : public ::testing::TestWithParam<std::tuple<bool, Metric>> {};

TEST_P(TreeTopKTest, EqualsBruteForceBeforeAndAfterTenThousandChanges) {
  const auto [clustered, metric] = GetParam();
  const int dim = 12;
  const size_t n = 4000;
  Pair p = MakePair(dim, metric);
  auto x = clustered ? Clustered(n, dim, 1) : RandomVectors(n, dim, 1);
  auto ids = Ids(n);
  Upsert(p, ids, x);
  ASSERT_THAT(p.tree_index()->CheckInvariants(), IsOk());
  const auto q = clustered ? Clustered(30, dim, 1) : RandomVectors(30, dim, 2);
  ExpectSameTopK(p, q, dim, 10);

  // 10k interleaved inserts, deletes and in-place updates, in small batches.
  Rng rng(7, 7);
  std::vector<uint64_t> live = ids;
  uint64_t next_id = 1000000;
  const auto pool = clustered ? Clustered(20000, dim, 3) : RandomVectors(20000, dim, 3);
  size_t pool_pos = 0;
  for (int op = 0; op < 10000; op += 5) {
    const int kind = static_cast<int>(rng.Below(3));
    std::vector<uint64_t> batch;
    std::vector<float> vecs;
    if (kind == 0 || live.size() < 100) {  // insert 5
      for (int i = 0; i < 5; ++i) {
        batch.push_back(next_id++);
        live.push_back(batch.back());
      }
    } else {
      std::set<uint64_t> chosen;
      while (chosen.size() < 5) chosen.insert(live[rng.Below(live.size())]);
      batch.assign(chosen.begin(), chosen.end());
      if (kind == 1) {  // delete 5
        ASSERT_THAT(p.tree->Delete(batch, false).status(), IsOk());
        ASSERT_THAT(p.exact->Delete(batch, false).status(), IsOk());
        for (uint64_t id : batch) live.erase(std::find(live.begin(), live.end(), id));
        continue;
      }
    }
    // insert or update (re-encoded: a vector from elsewhere in the data)
    for (size_t i = 0; i < batch.size(); ++i) {
      vecs.insert(vecs.end(), pool.begin() + (pool_pos % 20000) * dim,
                  pool.begin() + (pool_pos % 20000 + 1) * dim);
      ++pool_pos;
    }
    Upsert(p, batch, vecs, op);
    if (op % 1000 == 0) {
      ASSERT_THAT(p.tree_index()->CheckInvariants(), IsOk()) << "op " << op;
    }
  }
  ASSERT_THAT(p.tree_index()->CheckInvariants(), IsOk());
  EXPECT_EQ(p.tree->Stats().num_targets, live.size());
  ExpectSameTopK(p, q, dim, 10);
  // Exclusions and the rank window.
  std::vector<std::vector<uint64_t>> exclude(30);
  for (size_t i = 0; i < 30; ++i) {
    for (int j = 0; j < 4; ++j) exclude[i].push_back(live[rng.Below(live.size())]);
  }
  ExpectSameTopK(p, q, dim, 10, exclude, 3);
  // A rebuild keeps the answers.
  p.tree_index()->RebuildNow();
  ASSERT_THAT(p.tree_index()->CheckInvariants(), IsOk());
  ExpectSameTopK(p, q, dim, 10, exclude);
}

INSTANTIATE_TEST_SUITE_P(
    Data, TreeTopKTest,
    ::testing::Combine(::testing::Bool(),
                       ::testing::Values(Metric::kInnerProduct, Metric::kCosine)));

TEST(TreeTest, StatsDescribeTheTree) {
  Pair p = MakePair(8, Metric::kInnerProduct, /*leaf_size=*/32, /*branching=*/8);
  Upsert(p, Ids(5000), Clustered(5000, 8, 2));
  const TreeSummary s = *p.tree_index()->TreeInfo();
  EXPECT_GT(s.depth, 1);
  EXPECT_GT(s.num_leaves, 5000u / 32 / 2);
  EXPECT_LE(s.max_leaf, 32u);
  EXPECT_GE(s.looseness, 1.0);
  EXPECT_LT(s.looseness, 1.001) << "a fresh build is tight";
  size_t leaves = 0;
  for (size_t c : s.leaf_size_histogram) leaves += c;
  EXPECT_EQ(leaves, s.num_leaves);
}

TEST(TreeTest, ApproximateRecallGrowsWithBeamWidth) {
  const int dim = 16;
  Pair p = MakePair(dim, Metric::kInnerProduct, 16, 4);
  Upsert(p, Ids(6000), Clustered(6000, dim, 4));
  const auto q = Clustered(64, dim, 4);
  auto exact = p.exact->Search(q, {}, {.k = 10});
  ASSERT_THAT(exact.status(), IsOk());
  double prev = -1;
  for (int width : {1, 4, 64, 100000}) {
    auto r = p.tree->Search(q, {}, {.k = 10, .approximate = true, .beam_width = width});
    ASSERT_THAT(r.status(), IsOk());
    size_t hits = 0;
    for (size_t i = 0; i < 64; ++i) {
      std::set<uint64_t> t(exact->queries[i].ids.begin(), exact->queries[i].ids.end());
      for (uint64_t id : r->queries[i].ids) hits += t.count(id);
    }
    const double recall = hits / 640.0;
    EXPECT_GE(recall, prev) << "width " << width;
    prev = recall;
  }
  EXPECT_EQ(prev, 1.0) << "a beam over every leaf is exhaustive";
}

// Exact sampling: 10^5 draws against the exact softmax, and log q. With a
// tight log Z width the frontier is refined to exact leaves up front (log q
// exact); with a loose one, most draws are rejections from bound nodes.
class TreeExactSamplingTest
    : public ::testing::TestWithParam<std::tuple<float, double>> {};

TEST_P(TreeExactSamplingTest, MatchesTheSoftmaxAndLogQIsExact) {
  const auto [tau, width] = GetParam();
  const int dim = 8;
  const size_t n = 1500;
  Pair p = MakePair(dim, Metric::kCosine, 16, 4);
  const auto x = Clustered(n, dim, 5);
  const auto ids = Ids(n);
  Upsert(p, ids, x);
  const auto q1 = Clustered(1, dim, 6);
  // 1000 copies, 100 draws each with replacement: 10^5 draws.
  std::vector<float> q;
  for (int i = 0; i < 1000; ++i) q.insert(q.end(), q1.begin(), q1.end());
  std::vector<std::vector<uint64_t>> exclude(1000, {ids[0], ids[1]});
  SearchParams sp{.mode = MineMode::kSample, .sampler = Sampler::kExact, .k = 100,
                  .temperature = tau, .with_replacement = true, .want_log_z = true,
                  .log_z_width = width, .seed = 99};
  auto r = p.tree->Search(q, exclude, sp);
  ASSERT_THAT(r.status(), IsOk());

  // The oracle: exact softmax over the eligible targets, in double.
  std::map<uint64_t, size_t> pos;
  std::vector<double> s;
  const double qn = std::sqrt(Dot(q1.data(), q1.data(), dim));
  for (size_t i = 2; i < n; ++i) {
    const float* xi = &x[i * dim];
    pos[ids[i]] = s.size();
    s.push_back(Dot(q1.data(), xi, dim) / (qn * std::sqrt(Dot(xi, xi, dim))));
  }
  const auto probs = ::negmine::testing::Softmax(s, tau);
  std::vector<int64_t> counts(s.size(), 0);
  for (const QueryResult& res : r->queries) {
    ASSERT_EQ(res.ids.size(), 100u);
    EXPECT_LE(res.log_z_hi - res.log_z_lo, width + 1e-9);
    for (size_t j = 0; j < res.ids.size(); ++j) {
      ASSERT_TRUE(pos.count(res.ids[j])) << "excluded id " << res.ids[j] << " drawn";
      const size_t i = pos[res.ids[j]];
      ++counts[i];
      // log q = s/tau - the interval's midpoint: within half its width.
      ASSERT_NEAR(res.log_q[j], std::log(probs[i]), width / 2 + 1e-4);
    }
  }
  auto [stat, df] = ChiSquare(counts, probs, 100000);
  EXPECT_LT(stat, ChiSquareCritical(df)) << "df " << df;
}

INSTANTIATE_TEST_SUITE_P(
    Temperatures, TreeExactSamplingTest,
    ::testing::Combine(::testing::Values(0.05f, 0.1f, 1.0f),
                       ::testing::Values(1e-5, 50.0)));

// The proposal sampler's log q is the true probability of its proposal:
// frequencies match exp(log q), and the same id always has the same log q.
// With leaves of 16 every coarse group is expanded into its leaves; with
// leaves of 4 most groups are not, and a drawn group draws its leaf.
class ProposalLogQTest : public ::testing::TestWithParam<int> {};

TEST_P(ProposalLogQTest, LogQIsTheProposalsProbability) {
  const int dim = 8;
  Pair p = MakePair(dim, Metric::kInnerProduct, GetParam(), 4);
  Upsert(p, Ids(1200), Clustered(1200, dim, 8));
  const auto q1 = Clustered(1, dim, 9);
  std::vector<float> q;
  for (int i = 0; i < 1000; ++i) q.insert(q.end(), q1.begin(), q1.end());
  auto r = p.tree->Search(q, {}, {.mode = MineMode::kSample, .k = 100, .temperature = 0.1f,
                                  .with_replacement = true, .seed = 5});
  ASSERT_THAT(r.status(), IsOk());
  for (const QueryResult& res : r->queries) ASSERT_EQ(res.ids.size(), 100u);
  const testing::LogQFrequencies f = testing::LogQFrequencyTest(r->queries, 1e-5);
  EXPECT_EQ(f.inconsistent, 0u);
  EXPECT_LE(f.seen_mass, 1.0 + 1e-4);
  ASSERT_GT(f.bins, 20u);
  EXPECT_LT(f.stat, ChiSquareCritical(f.df)) << "df " << f.df;
}

INSTANTIATE_TEST_SUITE_P(LeafSizes, ProposalLogQTest, ::testing::Values(16, 4));

// The seed's measure: the self-normalized estimate of grad_q log Z (E_p[x])
// from k proposal samples beats the brute-force top-k estimate.
TEST(TreeTest, ProposalGradientEstimateBeatsTopK) {
  const int dim = 16, k = 64;
  const size_t n = 20000;
  const float tau = 0.05f;
  Pair p = MakePair(dim, Metric::kInnerProduct, 32, 8);
  const auto x = Clustered(n, dim, 10);
  const auto ids = Ids(n);
  Upsert(p, ids, x);
  DriftBench qb({.num_targets = 0, .num_queries = 20, .dim = dim, .latent_dim = 8,
                 .hidden_dim = 32, .num_clusters = 40, .seed = 10});
  const auto q = qb.Queries(0);
  std::map<uint64_t, size_t> row;
  for (size_t i = 0; i < n; ++i) row[ids[i]] = i;
  double err_top = 0, err_sample = 0;
  for (int qi = 0; qi < 20; ++qi) {
    const float* qv = &q[qi * dim];
    std::vector<double> s(n);
    for (size_t i = 0; i < n; ++i) s[i] = Dot(qv, &x[i * dim], dim);
    const auto prob = ::negmine::testing::Softmax(s, tau);
    std::vector<double> g(dim, 0);
    for (size_t i = 0; i < n; ++i) {
      for (int j = 0; j < dim; ++j) g[j] += prob[i] * x[i * dim + j];
    }
    auto rel_err = [&](const QueryResult& r, bool use_log_q) {
      std::vector<double> e(dim, 0);
      double wsum = 0;
      const double m = *std::max_element(r.scores.begin(), r.scores.end());
      for (size_t i = 0; i < r.ids.size(); ++i) {
        const double w = std::exp((r.scores[i] - m) / tau - (use_log_q ? r.log_q[i] : 0));
        wsum += w;
        for (int j = 0; j < dim; ++j) e[j] += w * x[row[r.ids[i]] * dim + j];
      }
      double d = 0, gn = 0;
      for (int j = 0; j < dim; ++j) {
        d += std::pow(e[j] / wsum - g[j], 2);
        gn += g[j] * g[j];
      }
      return std::sqrt(d / gn);
    };
    auto top = p.exact->Search({qv, size_t(dim)}, {}, {.k = k});
    auto smp = p.tree->Search({qv, size_t(dim)}, {},
                              {.mode = MineMode::kSample, .k = k, .temperature = tau,
                               .with_replacement = true, .seed = uint64_t(qi + 1)});
    ASSERT_TRUE(top.ok() && smp.ok());
    err_top += rel_err(top->queries[0], false) / 20;
    err_sample += rel_err(smp->queries[0], true) / 20;
  }
  EXPECT_LT(err_sample, err_top) << "proposal " << err_sample << " vs top-k " << err_top;
}

TEST(TreeTest, LogZIntervalContainsTheExactLogZ) {
  const int dim = 8;
  Pair p = MakePair(dim, Metric::kInnerProduct, 16, 4);
  const auto x = Clustered(3000, dim, 11);
  const auto ids = Ids(3000);
  Upsert(p, ids, x);
  const auto q = Clustered(10, dim, 12);
  std::vector<std::vector<uint64_t>> exclude(10, {ids[5], ids[6], ids[7]});
  for (float tau : {0.02f, 0.1f, 1.0f}) {
    for (double width : {0.0, 1e-3, 0.5, 5.0}) {
      SearchParams sp{.mode = MineMode::kTopK, .k = 3, .temperature = tau,
                      .rank_offset = 2, .want_log_z = true, .log_z_width = width};
      auto got = p.tree->Search(q, exclude, sp);
      auto want = p.exact->Search(q, exclude, sp);
      ASSERT_TRUE(got.ok() && want.ok());
      for (size_t i = 0; i < 10; ++i) {
        const double z = want->queries[i].log_z_lo;
        const QueryResult& g = got->queries[i];
        const double tol = 1e-5 * (1 + std::abs(z));
        EXPECT_LE(g.log_z_lo, z + tol) << "tau " << tau << " width " << width;
        EXPECT_GE(g.log_z_hi, z - tol) << "tau " << tau << " width " << width;
        EXPECT_LE(g.log_z_hi - g.log_z_lo, width + 1e-9);
      }
    }
  }
}

// Without replacement, asking for every eligible target makes the sampler
// draw again for the duplicates (in rounds) until each one is taken once.
// Every query's draws come from its own stream (seed, i): the same query
// alone or inside a batch gets the same samples.
TEST(TreeTest, ProposalWithoutReplacementTakesEveryEligibleTargetOnce) {
  const int dim = 8;
  Pair p = MakePair(dim, Metric::kInnerProduct, 16, 4);
  const auto ids = Ids(300);
  Upsert(p, ids, Clustered(300, dim, 21));
  const auto q = Clustered(6, dim, 22);
  std::vector<std::vector<uint64_t>> exclude(6);
  for (size_t i = 0; i < 6; ++i) {
    for (size_t j = 0; j < 20; ++j) exclude[i].push_back(ids[(7 * i + 13 * j) % 300]);
  }
  // A high temperature: at a low one the last targets are too unlikely for
  // the capped attempts (200 per sample) to reach.
  SearchParams sp{.mode = MineMode::kSample, .k = 280, .temperature = 2.0f, .seed = 9};
  auto all = p.tree->Search(q, exclude, sp);
  ASSERT_THAT(all.status(), IsOk());
  for (size_t i = 0; i < 6; ++i) {
    const QueryResult& r = all->queries[i];
    std::set<uint64_t> got(r.ids.begin(), r.ids.end());
    EXPECT_EQ(r.ids.size(), 280u);
    EXPECT_EQ(got.size(), 280u) << "no target twice";
    for (uint64_t id : exclude[i]) EXPECT_FALSE(got.count(id)) << "excluded " << id;
  }
  // Query 3 alone: the seed's stream 0 is query 3's stream only if it is
  // first, so compare with a batch that starts with it.
  const std::vector<float> q3(q.begin() + 3 * dim, q.begin() + 4 * dim);
  std::vector<float> q3_first = q3;
  q3_first.insert(q3_first.end(), q.begin(), q.end());
  std::vector<std::vector<uint64_t>> ex3 = {exclude[3]};
  ex3.insert(ex3.end(), exclude.begin(), exclude.end());
  SearchParams small = sp;
  small.k = 40;
  small.temperature = 0.05f;
  auto alone = p.tree->Search(q3, {{exclude[3]}}, small);
  auto batch = p.tree->Search(q3_first, ex3, small);
  ASSERT_TRUE(alone.ok() && batch.ok());
  EXPECT_EQ(alone->queries[0].ids, batch->queries[0].ids);
  ASSERT_EQ(alone->queries[0].log_q.size(), batch->queries[0].log_q.size());
  for (size_t j = 0; j < alone->queries[0].log_q.size(); ++j) {
    // Scores in a batch may come from a matrix product, alone from dot
    // products: equal up to rounding.
    EXPECT_NEAR(alone->queries[0].log_q[j], batch->queries[0].log_q[j], 1e-4);
  }
}

TEST(TreeTest, MixedModeAndRankWindow) {
  const int dim = 8;
  Pair p = MakePair(dim, Metric::kCosine, 16, 4);
  const auto ids = Ids(2000);
  Upsert(p, ids, Clustered(2000, dim, 13));
  const auto q = Clustered(8, dim, 14);
  std::vector<std::vector<uint64_t>> exclude(8, {ids[10]});
  for (Sampler sampler : {Sampler::kProposal, Sampler::kExact}) {
    SearchParams sp{.mode = MineMode::kMixed, .sampler = sampler, .k = 12,
                    .temperature = 0.1f, .num_hard = 5, .rank_offset = 2, .seed = 3};
    auto got = p.tree->Search(q, exclude, sp);
    auto top = p.exact->Search(q, exclude, {.k = 7});
    ASSERT_TRUE(got.ok() && top.ok());
    for (size_t i = 0; i < 8; ++i) {
      const QueryResult& g = got->queries[i];
      ASSERT_EQ(g.ids.size(), 12u);
      EXPECT_EQ(g.num_top, 5);
      const std::vector<uint64_t> want_top(top->queries[i].ids.begin() + 2,
                                           top->queries[i].ids.end());
      EXPECT_EQ(std::vector<uint64_t>(g.ids.begin(), g.ids.begin() + 5), want_top);
      std::set<uint64_t> all(g.ids.begin(), g.ids.end());
      EXPECT_EQ(all.size(), 12u) << "samples repeat neither the top nor each other";
      EXPECT_FALSE(all.count(ids[10])) << "excluded";
      EXPECT_FALSE(all.count(top->queries[i].ids[0])) << "in the rank window";
      EXPECT_FALSE(all.count(top->queries[i].ids[1])) << "in the rank window";
    }
  }
}

TEST(TreeTest, BackgroundRebuildAfterChurnKeepsAnswers) {
  const int dim = 8;
  IndexOptions o{.dim = dim, .kind = IndexKind::kTree};
  o.tree.leaf_size = 16;
  auto index = CreateIndex(o).value();
  auto* tree = static_cast<TreeIndex*>(index.get());
  const auto ids = Ids(3000);
  ASSERT_THAT(index->Upsert(ids, Clustered(3000, dim, 15), 0), IsOk());
  // Re-encode everything twice: churn past half the size.
  ASSERT_THAT(index->Upsert(ids, Clustered(3000, dim, 16), 1), IsOk());
  ASSERT_THAT(index->Upsert(ids, Clustered(3000, dim, 17), 2), IsOk());
  // The rebuild runs in the background; wait for it (bounded).
  for (int i = 0; i < 600 && tree->TreeInfo()->rebuilds == 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_GE(tree->TreeInfo()->rebuilds, 1u);
  EXPECT_THAT(tree->CheckInvariants(), IsOk());
  auto r = index->Search(Clustered(4, dim, 17), {}, {.k = 5});
  ASSERT_THAT(r.status(), IsOk());
  EXPECT_NEAR(r->queries[0].scores[0], 1.0, 1e-4) << "finds itself after the rebuild";
}

// Deletes leave radii loose (a radius never shrinks). Deleting a shell
// around one target (ranks 5% to 40% by distance, keeping the core) makes the
// nodes there much looser than a fresh build would be.
std::vector<uint64_t> ShellAround(const std::vector<float>& x, const std::vector<uint64_t>& ids,
                                  int dim) {
  std::vector<std::pair<double, uint64_t>> by_distance;
  for (size_t i = 0; i < ids.size(); ++i) {
    double d = 0;
    for (int j = 0; j < dim; ++j) d += (x[i * dim + j] - x[j]) * (x[i * dim + j] - x[j]);
    by_distance.push_back({d, ids[i]});
  }
  std::sort(by_distance.begin(), by_distance.end());
  std::vector<uint64_t> shell;
  for (size_t r = ids.size() / 20; r < ids.size() * 2 / 5; ++r) shell.push_back(by_distance[r].second);
  return shell;
}

// The repair rebuilds only the loose subtrees: the looseness falls to the
// threshold, no full rebuild happens, and top-k still equals brute force.
TEST(TreeTest, LooseSubtreesAreRebuiltAlone) {
  const int dim = 8;
  Pair p = MakePair(dim, Metric::kInnerProduct, 16, 4);
  const auto ids = Ids(4000);
  const auto x = Clustered(4000, dim, 31);
  Upsert(p, ids, x);
  const std::vector<uint64_t> shell = ShellAround(x, ids, dim);
  ASSERT_THAT(p.tree->Delete(shell, false).status(), IsOk());
  ASSERT_THAT(p.exact->Delete(shell, false).status(), IsOk());
  TreeIndex* tree = p.tree_index();
  const double before = tree->TreeInfo()->looseness;
  ASSERT_GT(before, TreeIndex::kMaxLooseness) << "the deletes should loosen the tree";

  const std::optional<size_t> repaired = tree->RepairNow();
  ASSERT_TRUE(repaired.has_value()) << "the loose part is small: no full rebuild";
  EXPECT_GT(*repaired, 0u);
  const TreeSummary after = *tree->TreeInfo();
  EXPECT_LE(after.looseness, TreeIndex::kMaxLooseness);
  EXPECT_EQ(after.rebuilds, 0u);
  EXPECT_EQ(after.subtree_rebuilds, *repaired);
  EXPECT_THAT(tree->CheckInvariants(), IsOk());
  ExpectSameTopK(p, Clustered(32, dim, 32), dim, 10);
  EXPECT_EQ(tree->RepairNow(), 0u) << "nothing is loose any more";
}

// The background thread checks the looseness after enough writes and
// repairs what it finds.
TEST(TreeTest, BackgroundRepairAfterDeletes) {
  const int dim = 8;
  IndexOptions o{.dim = dim, .kind = IndexKind::kTree};
  o.tree.leaf_size = 16;
  o.tree.branching = 4;
  auto index = CreateIndex(o).value();
  auto* tree = static_cast<TreeIndex*>(index.get());
  const auto ids = Ids(4000);
  const auto x = Clustered(4000, dim, 31);
  ASSERT_THAT(index->Upsert(ids, x, 0), IsOk());
  ASSERT_THAT(index->Delete(ShellAround(x, ids, dim), false).status(), IsOk());
  // The repair runs in the background; wait for it (bounded).
  for (int i = 0; i < 600 && tree->TreeInfo()->subtree_rebuilds == 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  const TreeSummary info = *tree->TreeInfo();
  EXPECT_GE(info.subtree_rebuilds, 1u);
  EXPECT_EQ(info.rebuilds, 0u);
  EXPECT_LE(info.looseness, TreeIndex::kMaxLooseness);
  EXPECT_THAT(tree->CheckInvariants(), IsOk());
}

TEST(TreeTest, RejectsBadTreeOptions) {
  IndexOptions o{.dim = 4, .kind = IndexKind::kTree};
  o.tree.leaf_size = 1;
  EXPECT_THAT(CreateIndex(o), StatusIs(absl::StatusCode::kInvalidArgument,
                                       HasSubstr("tree.leaf_size = 1")));
}

// A search polls params.cancelled and stops with CANCELLED; before it is
// cancelled, the same search answers.
TEST(CancellationTest, BothIndexesStopWhenCancelled) {
  Pair p = MakePair(8, Metric::kCosine);
  const auto x = Clustered(500, 8, 3);
  Upsert(p, Ids(500), x);
  const auto q = Clustered(20, 8, 4);
  int polls = 0;
  for (Index* index : {p.tree.get(), p.exact.get()}) {
    for (SearchParams sp : {SearchParams{.k = 5},
                            SearchParams{.mode = MineMode::kSample, .sampler = Sampler::kExact,
                                         .k = 5, .temperature = 0.5f}}) {
      EXPECT_THAT(index->Search(q, {}, sp).status(), IsOk());
      sp.cancelled = [&polls] { return ++polls > 0; };
      EXPECT_THAT(index->Search(q, {}, sp),
                  StatusIs(absl::StatusCode::kCancelled, HasSubstr("cancelled")));
    }
  }
  EXPECT_GT(polls, 0);
}

}  // namespace
}  // namespace negmine
