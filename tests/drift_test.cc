// Drift correction: the model (core/drift/drift.h) and the index's drift
// updates, against brute force over the current model's embeddings.
#include "core/drift/drift.h"

#include <algorithm>
#include <cmath>
#include <memory>
#include <numeric>
#include <set>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "core/exact_index.h"
#include "core/random.h"
#include "core/store/drift_bench.h"
#include "core/tree/tree_index.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace negmine {
namespace {

using ::negmine::testing::ChiSquare;
using ::negmine::testing::BruteForceTopK;
using ::negmine::testing::ChiSquareCritical;
using ::negmine::testing::IsOk;
using ::negmine::testing::RandomVectors;
using ::negmine::testing::Recall;
using ::negmine::testing::Softmax;
using ::negmine::testing::StatusIs;
using ::testing::HasSubstr;

using RowMatrix = RowMatrixF;

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
  const std::vector<int> ms = {kDim / 4, 2 * kDim, 8 * kDim};
  std::vector<std::unique_ptr<Index>> indexes;
  for (int m : ms) {
    indexes.push_back(MakeIndex(IndexKind::kTree, kDim, Metric::kCosine, {.num_landmarks = m}));
    ASSERT_THAT(indexes.back()->Upsert(Iota(20000), t0, 0), IsOk());
  }
  for (int step : {5, 10, 20}) {
    const std::vector<float> queries = bench.Queries(step);
    const auto truth = BruteForceTopK(bench.Targets(step), queries, kDim, kK);
    const double stale = Recall(BruteForceTopK(t0, queries, kDim, kK), truth);
    std::vector<double> corrected;
    for (auto& index : indexes) {
      ASSERT_THAT(Update(*index, bench, step), IsOk());
      corrected.push_back(Recall(SearchTopK(*index, queries, kK), truth));
    }
    const double lost = 1 - stale;
    std::printf("step %2d: stale %.3f", step, stale);
    for (size_t i = 0; i < ms.size(); ++i) {
      std::printf("  m=%d %.3f (%.0f%% of lost)", ms[i], corrected[i],
                  100 * (corrected[i] - stale) / lost);
      EXPECT_GE(corrected[i], stale) << "step " << step << " m " << ms[i];
      if (i > 0) EXPECT_GE(corrected[i], corrected[i - 1]) << "step " << step << " m " << ms[i];
    }
    std::printf("\n");
    if (step == 20) {
      EXPECT_GE(corrected[1] - stale, 0.40 * lost);  // m = 2d
      EXPECT_GE(corrected[2] - stale, 0.50 * lost);  // m = 8d
    }
  }
}

// Re-encoding targets between drift updates only helps: the re-encoded
// targets end up closer to the current model than the others, and recall
// does not drop. Updates come every 4 steps, re-encodings every step, so
// most re-encoded targets are pending (their step is beyond the last update)
// when the next update interpolates for them.
TEST(DriftRecallTest, ReencodingBetweenUpdatesOnlyHelps) {
  constexpr int kDim = 64, kK = 64;
  constexpr size_t kN = 20000, kPerStep = 400;  // 2% per step
  const DriftBench bench({.num_targets = kN, .num_queries = 256, .dim = kDim, .seed = 12});
  const std::vector<float> t0 = bench.Targets(0);
  auto plain = MakeIndex(IndexKind::kTree, kDim, Metric::kCosine, {.num_landmarks = 2 * kDim});
  auto reenc = MakeIndex(IndexKind::kTree, kDim, Metric::kCosine, {.num_landmarks = 2 * kDim});
  ASSERT_THAT(plain->Upsert(Iota(kN), t0, 0), IsOk());
  ASSERT_THAT(reenc->Upsert(Iota(kN), t0, 0), IsOk());
  std::vector<char> is_reencoded(kN, 0);
  for (int step = 1; step <= 12; ++step) {
    std::vector<size_t> rows;
    for (size_t i = 0; i < kPerStep; ++i) rows.push_back((step * kPerStep + i) % kN);
    ASSERT_THAT(reenc->Upsert(std::vector<uint64_t>(rows.begin(), rows.end()),
                              bench.EncodeTargets(step, rows), step), IsOk());
    for (size_t r : rows) is_reencoded[r] = 1;
    if (step % 4 != 0) continue;
    ASSERT_THAT(Update(*plain, bench, step), IsOk());
    ASSERT_THAT(Update(*reenc, bench, step), IsOk());
    const std::vector<float> truth = bench.Targets(step);
    std::vector<float> a, b;
    ASSERT_THAT(plain->GetScored(Iota(kN), &a), IsOk());
    ASSERT_THAT(reenc->GetScored(Iota(kN), &b), IsOk());
    double err_plain = 0, err_reenc = 0;
    size_t count = 0;
    for (size_t i = 0; i < kN; ++i) {
      if (!is_reencoded[i]) continue;
      ++count;
      for (int j = 0; j < kDim; ++j) {
        err_plain += std::pow(a[i * kDim + j] - truth[i * kDim + j], 2);
        err_reenc += std::pow(b[i * kDim + j] - truth[i * kDim + j], 2);
      }
    }
    const std::vector<float> queries = bench.Queries(step);
    const auto truth_top = BruteForceTopK(truth, queries, kDim, kK);
    const double recall_plain = Recall(SearchTopK(*plain, queries, kK), truth_top);
    const double recall_reenc = Recall(SearchTopK(*reenc, queries, kK), truth_top);
    std::printf("step %2d: re-encoded targets' squared error %.5f vs %.5f without; "
                "recall %.4f vs %.4f\n", step, err_reenc / count, err_plain / count,
                recall_reenc, recall_plain);
    EXPECT_LT(err_reenc, 0.5 * err_plain) << "step " << step;
    EXPECT_GE(recall_reenc, recall_plain - 0.005) << "step " << step;
  }
}

// ------------------------------------------------ softmax of the corrected model

DriftBenchConfig SmallBench(uint64_t seed) {
  return {.num_targets = 2000, .num_queries = 64, .dim = 16, .latent_dim = 8,
          .hidden_dim = 32, .num_clusters = 20, .drift_sigma = 0.03, .seed = seed};
}

// Brute-force scores of `query` against the index's scoring vectors of ids.
std::vector<double> ScoredScores(const Index& index, const std::vector<uint64_t>& ids,
                                 const float* query, int dim) {
  std::vector<float> x;
  EXPECT_THAT(index.GetScored(ids, &x), IsOk());
  double qn = std::sqrt(::negmine::testing::Dot(query, query, dim));
  std::vector<double> s(ids.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    s[i] = ::negmine::testing::Dot(query, &x[i * dim], dim) / qn;
  }
  return s;
}

// Exact samples of the drifted tree follow the softmax of the corrected
// vectors (10^5 draws, chi-square at p = 0.001).
TEST(DriftSamplingTest, ExactSamplesFollowTheCorrectedSoftmax) {
  const DriftBench bench(SmallBench(21));
  const int dim = 16;
  auto index = MakeIndex(IndexKind::kTree, dim, Metric::kCosine, {.num_landmarks = 64});
  ASSERT_THAT(index->Upsert(Iota(2000), bench.Targets(0), 0), IsOk());
  ASSERT_THAT(Update(*index, bench, 10), IsOk());
  const std::vector<float> all_q = bench.Queries(10);
  const std::vector<float> q1(all_q.begin(), all_q.begin() + dim);
  std::vector<float> q;
  for (int i = 0; i < 1000; ++i) q.insert(q.end(), q1.begin(), q1.end());
  const double tau = 0.1;
  absl::StatusOr<SearchResult> r = index->Search(
      q, {}, {.mode = MineMode::kSample, .sampler = Sampler::kExact, .k = 100,
              .temperature = tau, .with_replacement = true, .seed = 5});
  ASSERT_THAT(r.status(), IsOk());
  const std::vector<double> probs = Softmax(ScoredScores(*index, Iota(2000), q1.data(), dim), tau);
  std::vector<int64_t> counts(2000, 0);
  for (const QueryResult& res : r->queries) {
    for (uint64_t id : res.ids) ++counts[id];
  }
  auto [stat, df] = ChiSquare(counts, probs, 100000);
  EXPECT_LT(stat, ChiSquareCritical(df)) << "df " << df;
}

// The corrected softmax is closer (in KL) to the current model's than the
// stale one is, at tau = 0.05, averaged over queries.
TEST(DriftSamplingTest, CorrectedSoftmaxIsCloserToTheCurrentModel) {
  const DriftBench bench(SmallBench(22));
  const int dim = 16;
  const double tau = 0.05;
  auto index = MakeIndex(IndexKind::kTree, dim, Metric::kCosine, {.num_landmarks = 64});
  const std::vector<float> t0 = bench.Targets(0), t20 = bench.Targets(20);
  ASSERT_THAT(index->Upsert(Iota(2000), t0, 0), IsOk());
  ASSERT_THAT(Update(*index, bench, 20), IsOk());
  const std::vector<float> queries = bench.Queries(20);
  double kl_stale = 0, kl_corrected = 0;
  for (size_t qi = 0; qi < 64; ++qi) {
    const float* q = &queries[qi * dim];
    std::vector<double> s_now(2000), s_stale(2000);
    for (size_t i = 0; i < 2000; ++i) {
      s_now[i] = ::negmine::testing::Dot(q, &t20[i * dim], dim);
      s_stale[i] = ::negmine::testing::Dot(q, &t0[i * dim], dim);
    }
    const auto p = Softmax(s_now, tau), ps = Softmax(s_stale, tau),
               pc = Softmax(ScoredScores(*index, Iota(2000), q, dim), tau);
    for (size_t i = 0; i < 2000; ++i) {
      kl_stale += p[i] * std::log(p[i] / ps[i]);
      kl_corrected += p[i] * std::log(p[i] / pc[i]);
    }
  }
  std::printf("mean KL: stale %.4f corrected %.4f\n", kl_stale / 64, kl_corrected / 64);
  EXPECT_LT(kl_corrected, 0.8 * kl_stale);
}

// ------------------------------------------------------------ exact linear map

// With an exact linear map, both indexes answer as brute force over the
// mapped embeddings: the same top-k scores (to float rounding, 1e-4), and the
// same ids wherever the scores are not that close.
TEST(DriftLinearMapTest, IdenticalToBruteForceOverTheMappedEmbeddings) {
  const int dim = 16, n = 3000, k = 20;
  const std::vector<float> x = RandomVectors(n, dim, 31), queries = RandomVectors(50, dim, 32);
  std::vector<float> a = RandomVectors(dim, dim, 33), b = RandomVectors(1, dim, 34);
  for (int i = 0; i < dim * dim; ++i) a[i] = 0.2f * a[i] + (i % (dim + 1) == 0 ? 1.0f : 0.0f);
  for (IndexKind kind : {IndexKind::kExact, IndexKind::kTree}) {
    for (Metric metric : {Metric::kInnerProduct, Metric::kCosine}) {
      // A cosine collection maps the unit-length embeddings.
      const std::vector<float> old =
          metric == Metric::kCosine ? Normalized(x, dim) : x;
      std::vector<float> mapped(n * dim);
      for (int r = 0; r < n; ++r) {
        for (int i = 0; i < dim; ++i) {
          double v = b[i];
          for (int j = 0; j < dim; ++j) v += double{a[i * dim + j]} * old[r * dim + j];
          mapped[r * dim + i] = static_cast<float>(v);
        }
      }
      auto index = MakeIndex(kind, dim, metric);
      auto oracle = MakeIndex(IndexKind::kExact, dim, metric);
      ASSERT_THAT(index->Upsert(Iota(n), x, 0), IsOk());
      ASSERT_THAT(oracle->Upsert(Iota(n), mapped, 0), IsOk());
      absl::StatusOr<DriftReport> rep =
          index->ApplyDrift({.model_step = 3, .linear_a = a, .linear_b = b});
      ASSERT_THAT(rep.status(), IsOk());
      EXPECT_TRUE(rep->rebased);
      const SearchResult got = index->Search(queries, {}, {.k = k}).value();
      const SearchResult want = oracle->Search(queries, {}, {.k = k}).value();
      for (size_t qi = 0; qi < 50; ++qi) {
        const QueryResult &g = got.queries[qi], &w = want.queries[qi];
        for (int j = 0; j < k; ++j) {
          ASSERT_NEAR(g.scores[j], w.scores[j], 1e-4) << IndexKindName(kind) << " q" << qi;
          const bool near_tie = (j > 0 && w.scores[j - 1] - w.scores[j] < 1e-4) ||
                                (j + 1 < k && w.scores[j] - w.scores[j + 1] < 1e-4);
          if (!near_tie) EXPECT_EQ(g.ids[j], w.ids[j]) << IndexKindName(kind) << " q" << qi;
        }
      }
    }
  }
}

// ------------------------------------------------------- upserts under drift

// A target re-encoded at the current step is served exactly as sent, and a
// later update that does not move the model does not move it either: the
// drift up to its step is not counted twice.
TEST(DriftUpsertTest, ReencodedTargetsAreNotCorrectedTwice) {
  const DriftBench bench(SmallBench(41));
  const int dim = 16;
  auto index = MakeIndex(IndexKind::kTree, dim, Metric::kCosine, {.num_landmarks = 64});
  ASSERT_THAT(index->Upsert(Iota(2000), bench.Targets(0), 0), IsOk());
  LandmarkSet lm = index->GetLandmarks().value();
  const std::vector<float> g5 =
      bench.EncodeTargets(5, std::vector<size_t>(lm.ids.begin(), lm.ids.end()));
  ASSERT_THAT(index->ApplyDrift({.model_step = 5, .landmark_epoch = lm.epoch,
                                 .landmark_embeddings = g5}).status(), IsOk());
  // Re-encode targets 7 and 8 at step 5, sent unnormalized (x 3).
  std::vector<float> sent = bench.EncodeTargets(5, {7, 8});
  for (float& v : sent) v *= 3;
  ASSERT_THAT(index->Upsert({7, 8}, sent, 5), IsOk());
  std::vector<float> before_other, served;
  ASSERT_THAT(index->GetScored({9}, &before_other), IsOk());
  ASSERT_THAT(index->GetScored({7, 8}, &served), IsOk());
  for (int j = 0; j < 2 * dim; ++j) EXPECT_NEAR(served[j], sent[j] / 3, 1e-5);
  // The same landmark embeddings again: the same model.
  ASSERT_THAT(index->ApplyDrift({.model_step = 5, .landmark_epoch = lm.epoch,
                                 .landmark_embeddings = g5}).status(), IsOk());
  std::vector<float> after, after_other;
  ASSERT_THAT(index->GetScored({7, 8}, &after), IsOk());
  ASSERT_THAT(index->GetScored({9}, &after_other), IsOk());
  for (int j = 0; j < 2 * dim; ++j) EXPECT_NEAR(after[j], sent[j] / 3, 1e-5);
  for (int j = 0; j < dim; ++j) EXPECT_NEAR(after_other[j], before_other[j], 1e-5);
  // Get still returns what was sent, bit-exactly, with its step.
  std::vector<float> got;
  std::vector<int64_t> steps;
  ASSERT_THAT(index->Get({7}, &got, &steps), IsOk());
  EXPECT_EQ(got, std::vector<float>(sent.begin(), sent.begin() + dim));
  EXPECT_EQ(steps[0], 5);
  const DriftSummary info = index->DriftInfo();
  EXPECT_TRUE(info.active);
  EXPECT_EQ(info.step, 5);
  EXPECT_EQ(info.updates, 2u);
  EXPECT_THAT(info.staleness_histogram, ::testing::ElementsAre(2, 1998, 0, 0, 0));
}

// ----------------------------------------------------------------- re-base

TEST(DriftRebaseTest, EveryRStepsBringsNewLandmarksAndKeepsTheServedVectors) {
  const DriftBench bench(SmallBench(51));
  const int dim = 16;
  auto index = MakeIndex(IndexKind::kTree, dim, Metric::kCosine,
                         {.num_landmarks = 64, .rebase_every_steps = 2});
  ASSERT_THAT(index->Upsert(Iota(2000), bench.Targets(0), 0), IsOk());
  absl::StatusOr<DriftReport> r1 = Update(*index, bench, 1);
  ASSERT_THAT(r1.status(), IsOk());
  EXPECT_FALSE(r1->rebased);
  const LandmarkSet before = index->GetLandmarks().value();
  std::vector<float> served_before;
  const std::vector<uint64_t> some = {0, 100, 1999};
  LandmarkSet lm = index->GetLandmarks().value();
  const std::vector<float> g3 =
      bench.EncodeTargets(3, std::vector<size_t>(lm.ids.begin(), lm.ids.end()));
  absl::StatusOr<DriftReport> r3 = index->ApplyDrift(
      {.model_step = 3, .landmark_epoch = lm.epoch, .landmark_embeddings = g3});
  ASSERT_THAT(r3.status(), IsOk());
  EXPECT_TRUE(r3->rebased);
  EXPECT_EQ(r3->landmark_epoch, before.epoch + 1);
  const LandmarkSet after = index->GetLandmarks().value();
  EXPECT_EQ(after.epoch, before.epoch + 1);
  EXPECT_NE(after.ids, before.ids);
  EXPECT_EQ(index->DriftInfo().rebases, 1u);
  // The old set's embeddings are refused, by name.
  EXPECT_THAT(index->ApplyDrift({.model_step = 4, .landmark_epoch = before.epoch,
                                 .landmark_embeddings = g3}),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("GetLandmarks")));
  // The re-base itself moves nothing, and the next update fits on the new frame.
  ASSERT_THAT(index->GetScored(some, &served_before), IsOk());
  const std::vector<float> g3_new =
      bench.EncodeTargets(3, std::vector<size_t>(after.ids.begin(), after.ids.end()));
  std::vector<float> frame_rows;
  ASSERT_THAT(index->GetScored(after.ids, &frame_rows), IsOk());
  ASSERT_THAT(index->ApplyDrift({.model_step = 3, .landmark_epoch = after.epoch,
                                 .landmark_embeddings = frame_rows}).status(), IsOk());
  std::vector<float> served_after;
  ASSERT_THAT(index->GetScored(some, &served_after), IsOk());
  for (size_t j = 0; j < served_after.size(); ++j) {
    EXPECT_NEAR(served_after[j], served_before[j], 1e-6);
  }
  EXPECT_THAT(static_cast<TreeIndex*>(index.get())->CheckInvariants(), IsOk());
}

// ------------------------------------------------------------------ errors

TEST(DriftErrorsTest, BadUpdatesGetClearErrorsAndChangeNothing) {
  const int dim = 8;
  auto index = MakeIndex(IndexKind::kTree, dim, Metric::kCosine, {.num_landmarks = 16});
  EXPECT_THAT(index->GetLandmarks(), StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("empty")));
  ASSERT_THAT(index->Upsert(Iota(500), RandomVectors(500, dim, 61), 0), IsOk());
  const std::vector<float> g = RandomVectors(16, dim, 62);
  EXPECT_THAT(index->ApplyDrift({.model_step = 1, .landmark_epoch = 1, .landmark_embeddings = g}),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("no landmark set")));
  const LandmarkSet lm = index->GetLandmarks().value();
  ASSERT_EQ(lm.ids.size(), 16u);
  EXPECT_EQ(index->GetLandmarks().value().ids, lm.ids);  // stable until a re-base
  const uint64_t version = index->Stats().version;
  EXPECT_THAT(index->ApplyDrift({.model_step = 1}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("either")));
  EXPECT_THAT(index->ApplyDrift({.model_step = 1, .landmark_embeddings = g, .linear_a = g}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("either")));
  EXPECT_THAT(index->ApplyDrift({.model_step = 1, .landmark_epoch = lm.epoch,
                                 .landmark_embeddings = absl::MakeSpan(g).subspan(8)}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("the set has 16 landmarks")));
  std::vector<float> bad = g;
  bad[5] = std::nanf("");
  EXPECT_THAT(index->ApplyDrift({.model_step = 1, .landmark_epoch = lm.epoch,
                                 .landmark_embeddings = bad}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("landmark_embeddings")));
  std::vector<float> zero = g;
  std::fill_n(zero.begin() + dim, dim, 0.0f);
  EXPECT_THAT(index->ApplyDrift({.model_step = 1, .landmark_epoch = lm.epoch,
                                 .landmark_embeddings = zero}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("zero norm")));
  EXPECT_THAT(index->ApplyDrift({.model_step = 1, .linear_a = absl::MakeSpan(g).subspan(1)}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("linear_map.a")));
  EXPECT_EQ(index->Stats().version, version);
  EXPECT_FALSE(index->DriftInfo().active);
  ASSERT_THAT(index->ApplyDrift({.model_step = 5, .landmark_epoch = lm.epoch,
                                 .landmark_embeddings = g}).status(), IsOk());
  EXPECT_THAT(index->ApplyDrift({.model_step = 4, .landmark_epoch = lm.epoch,
                                 .landmark_embeddings = g}),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("backwards")));
}

// ---------------------------------------------------- the tree under drift

// Drift updates interleaved with upserts and deletes, with the background
// rebuild on: the tree's bounds stay valid, a rebuild that raced with the
// writes is caught up, and exact top-k equals brute force over the
// scoring vectors throughout.
TEST(DriftTreeTest, BoundsStayValidAndRebuildsCatchUp) {
  const DriftBench bench({.num_targets = 6000, .num_queries = 20, .dim = 16,
                          .latent_dim = 8, .hidden_dim = 32, .num_clusters = 30,
                          .drift_sigma = 0.05, .seed = 71});
  const int dim = 16, k = 10;
  IndexOptions o{.dim = dim, .metric = Metric::kCosine, .backend = Backend::kCpu,
                 .kind = IndexKind::kTree};
  o.tree.leaf_size = 16;
  o.drift.num_landmarks = 48;
  auto index = CreateIndex(o).value();
  auto* tree = static_cast<TreeIndex*>(index.get());
  const std::vector<float> t0 = bench.Targets(0);
  ASSERT_THAT(index->Upsert(Iota(5000), absl::MakeConstSpan(t0).subspan(0, 5000 * dim), 0),
              IsOk());
  const std::vector<float> queries = bench.Queries(0);
  Rng rng(7, 0);
  for (int step = 1; step <= 30; ++step) {
    ASSERT_THAT(Update(*index, bench, step), IsOk());
    // Re-encode 50 targets, delete 20, add 20 new ones.
    std::vector<size_t> re;
    for (int i = 0; i < 50; ++i) re.push_back(rng.Below(5000));
    std::sort(re.begin(), re.end());
    re.erase(std::unique(re.begin(), re.end()), re.end());
    ASSERT_THAT(index->Upsert(std::vector<uint64_t>(re.begin(), re.end()),
                              bench.EncodeTargets(step, re), step), IsOk());
    std::vector<uint64_t> del;
    for (int i = 0; i < 20; ++i) del.push_back(rng.Below(5000));
    ASSERT_THAT(index->Delete(del, /*allow_missing=*/true).status(), IsOk());
    std::vector<size_t> fresh;
    for (int i = 0; i < 20; ++i) fresh.push_back(5000 + (step * 20 + i) % 1000);
    ASSERT_THAT(index->Upsert(std::vector<uint64_t>(fresh.begin(), fresh.end()),
                              bench.EncodeTargets(step, fresh), step), IsOk());
    ASSERT_THAT(tree->CheckInvariants(), IsOk()) << "step " << step;
  }
  // Wait (bounded) for a drift-triggered rebuild to be installed.
  for (int i = 0; i < 600 && tree->TreeInfo()->rebuilds == 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_GE(tree->TreeInfo()->rebuilds, 1u);
  ASSERT_THAT(tree->CheckInvariants(), IsOk());
  // Exact top-k against brute force over the scoring vectors.
  std::vector<uint64_t> live;
  for (uint64_t id = 0; id < 6000; ++id) {
    std::vector<float> v;
    std::vector<int64_t> s;
    if (index->Get({id}, &v, &s).ok()) live.push_back(id);
  }
  const SearchResult got = index->Search(queries, {}, {.k = k}).value();
  for (size_t qi = 0; qi < 20; ++qi) {
    std::vector<double> s = ScoredScores(*index, live, &queries[qi * dim], dim);
    std::vector<double> sorted = s;
    std::sort(sorted.rbegin(), sorted.rend());
    for (int j = 0; j < k; ++j) EXPECT_NEAR(got.queries[qi].scores[j], sorted[j], 1e-4);
  }
}

// ----------------------------------------------------------------- snapshot

// A snapshot restored into a fresh index is the same index: stored and
// scored vectors, drift state, search results, and the next drift update.
// Damaged bytes are refused and change nothing.
TEST(SnapshotTest, RestoreIsTheSameIndexAndDamageIsRefused) {
  const DriftBench bench(SmallBench(81));
  const int dim = 16;
  for (IndexKind kind : {IndexKind::kExact, IndexKind::kTree}) {
    auto a = MakeIndex(kind, dim, Metric::kCosine, {.num_landmarks = 32});
    ASSERT_THAT(a->Upsert(Iota(2000), bench.Targets(0), 0), IsOk());
    ASSERT_THAT(Update(*a, bench, 3), IsOk());
    ASSERT_THAT(a->Upsert({5, 6}, bench.EncodeTargets(5, {5, 6}), 5), IsOk());  // pending
    ASSERT_THAT(a->Delete({7, 8}, false).status(), IsOk());
    absl::StatusOr<std::string> snap = a->Snapshot();
    ASSERT_THAT(snap.status(), IsOk());

    auto b = MakeIndex(kind, dim, Metric::kCosine, {.num_landmarks = 32});
    ASSERT_THAT(b->Restore(*snap), IsOk());
    EXPECT_EQ(b->Stats().version, a->Stats().version);
    EXPECT_EQ(b->Stats().num_targets, 1998u);
    if (kind == IndexKind::kTree) {  // the tree's arrays come back, not a rebuild
      EXPECT_EQ(b->TreeInfo()->num_nodes, a->TreeInfo()->num_nodes);
      EXPECT_EQ(b->TreeInfo()->rebuilds, 0u);
      EXPECT_THAT(static_cast<TreeIndex*>(b.get())->CheckInvariants(), IsOk());
    }
    std::vector<uint64_t> live = Iota(2000);
    live.erase(live.begin() + 7, live.begin() + 9);
    std::vector<float> va, vb, sa, sb;
    std::vector<int64_t> ta, tb;
    ASSERT_THAT(a->Get(live, &va, &ta), IsOk());
    ASSERT_THAT(b->Get(live, &vb, &tb), IsOk());
    EXPECT_EQ(va, vb);
    EXPECT_EQ(ta, tb);
    ASSERT_THAT(a->GetScored(live, &sa), IsOk());
    ASSERT_THAT(b->GetScored(live, &sb), IsOk());
    EXPECT_EQ(sa, sb);
    EXPECT_EQ(b->DriftInfo().step, 3);
    EXPECT_EQ(b->GetLandmarks()->ids, a->GetLandmarks()->ids);
    const std::vector<float> q = bench.Queries(3);
    const SearchResult ra = a->Search(q, {}, {.k = 10}).value();
    const SearchResult rb = b->Search(q, {}, {.k = 10}).value();
    for (size_t i = 0; i < ra.queries.size(); ++i) {
      EXPECT_EQ(ra.queries[i].ids, rb.queries[i].ids);
    }
    // The next update lands identically on both (the pending targets too).
    ASSERT_THAT(Update(*a, bench, 8), IsOk());
    ASSERT_THAT(Update(*b, bench, 8), IsOk());
    ASSERT_THAT(a->GetScored(live, &sa), IsOk());
    ASSERT_THAT(b->GetScored(live, &sb), IsOk());
    EXPECT_EQ(sa, sb);

    // Damage: truncations and a changed byte.
    auto c = MakeIndex(kind, dim, Metric::kCosine);
    for (size_t cut : {size_t{0}, size_t{1}, snap->size() / 2, snap->size() - 1}) {
      EXPECT_THAT(c->Restore(std::string_view(*snap).substr(0, cut)),
                  StatusIs(absl::StatusCode::kDataLoss, HasSubstr("does not parse")));
    }
    EXPECT_THAT(c->Restore(*snap + "x"), StatusIs(absl::StatusCode::kDataLoss, HasSubstr("parse")));
    EXPECT_EQ(c->Stats().num_targets, 0u);
    auto wrong_dim = MakeIndex(kind, dim + 1, Metric::kCosine);
    EXPECT_THAT(wrong_dim->Restore(*snap), StatusIs(absl::StatusCode::kDataLoss, HasSubstr("dim 17")));
  }
}

}  // namespace
}  // namespace negmine
