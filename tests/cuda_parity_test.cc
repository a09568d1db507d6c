// The CUDA backend against the CPU index on the same data (the oracle):
// ids equal wherever the scores are not tied within the dtype's tolerance,
// scores within that tolerance, log Z within tolerance / tau, Gumbel-top-k
// draws that follow the exact softmax (chi-square), and the error codes.
//
// Tolerances on a score, relative to ||q|| max ||x||: float32 1e-5 (the
// GEMM's float32 accumulation in another order), float16 2e-3 and bfloat16
// 1.6e-2 (the vectors and the query rounded to 11 and 8 significant bits;
// 4x the worst rounding of one product, summed as a random walk over d).
//
// Without a GPU (CI) the device tests skip and say why; the error-code test
// runs everywhere.
#include <algorithm>
#include <cmath>
#include <map>
#include <set>
#include <string>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "core/cuda/changed_runs.h"
#include "core/cuda/device.h"
#include "core/cuda/device_mirror.h"
#include "core/exact_index.h"
#include "core/index.h"
#include "core/store/drift_bench.h"
#include "core/tree/tree.h"
#include "core/tree/tree_index.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace negmine {
namespace {

using ::negmine::testing::ChiSquare;
using ::negmine::testing::ChiSquareCritical;
using ::negmine::testing::IsOk;
using ::negmine::testing::StatusIs;
using ::testing::HasSubstr;

bool HaveDevice() { return CudaBuilt() && CudaDeviceCount() > 0; }

#define SKIP_WITHOUT_GPU()                                                    \
  if (!HaveDevice()) {                                                        \
    GTEST_SKIP() << (CudaBuilt() ? "CUDA is built but no GPU is visible"      \
                                 : "the CUDA backend is not built");          \
  }

double Tolerance(DeviceDtype t) {
  switch (t) {
    case DeviceDtype::kFloat32: return 1e-5;
    case DeviceDtype::kFloat16: return 2e-3;
    case DeviceDtype::kBFloat16: return 1.6e-2;
  }
  return 0;
}

TEST(CudaBackendTest, ErrorCodesWithoutDeviceOrBuild) {
  IndexOptions o{.dim = 8, .backend = Backend::kCuda};
  absl::StatusOr<std::unique_ptr<Index>> index = CreateIndex(o);
  if (!CudaBuilt()) {
    EXPECT_THAT(index, StatusIs(absl::StatusCode::kUnimplemented, HasSubstr("not built")));
  } else if (CudaDeviceCount() == 0) {
    EXPECT_THAT(index, StatusIs(absl::StatusCode::kFailedPrecondition,
                                HasSubstr("no CUDA device")));
  } else {
    ASSERT_THAT(index, IsOk());
    EXPECT_EQ((*index)->active_backend(), Backend::kCuda);
  }
  // kAuto always works, on whatever is there.
  o.backend = Backend::kAuto;
  absl::StatusOr<std::unique_ptr<Index>> any = CreateIndex(o);
  ASSERT_THAT(any, IsOk());
  EXPECT_EQ((*any)->active_backend(), HaveDevice() ? Backend::kCuda : Backend::kCpu);
}

struct Data {
  std::vector<uint64_t> ids;
  std::vector<float> targets, queries;
  double max_norm = 0;
};

// Clustered targets (the drift-bench mixture), scaled by a random factor in
// [0.5, 2] so that inner product and cosine differ.
Data MakeData(size_t n, size_t nq, int dim, uint64_t seed) {
  DriftBench bench({.num_targets = n, .num_queries = nq, .dim = dim, .seed = seed});
  Data d;
  d.targets = bench.Targets(0);
  d.queries = bench.Queries(0);
  Rng rng(seed, 99);
  for (size_t i = 0; i < n; ++i) {
    const float s = static_cast<float>(0.5 + 1.5 * rng.Uniform());
    for (int j = 0; j < dim; ++j) d.targets[i * dim + j] *= s;
    d.ids.push_back(1000 + 7 * i);
    d.max_norm = std::max<double>(d.max_norm, s * 1.0001);
  }
  return d;
}

std::unique_ptr<Index> Make(const IndexOptions& o) {
  absl::StatusOr<std::unique_ptr<Index>> index = CreateIndex(o);
  EXPECT_THAT(index, IsOk());
  return index.ok() ? *std::move(index) : nullptr;
}

double Norm(const float* q, int dim) { return std::sqrt(testing::Dot(q, q, dim)); }

// The top parts agree: every CPU result whose score is clear of the
// boundaries (the k-th score below, and above it the last score of the rank
// window, `upper`) by more than tol is in the GPU's results, every GPU score
// lies within the boundaries +- tol and within tol of the CPU's score of that
// id, and both hold the same count.
void ExpectTopParity(const QueryResult& cpu, const QueryResult& gpu, double tol, double upper,
                     const std::string& what) {
  ASSERT_EQ(cpu.num_top, gpu.num_top) << what;
  if (cpu.num_top == 0) return;
  const float kth = cpu.scores[cpu.num_top - 1];
  std::set<uint64_t> got(gpu.ids.begin(), gpu.ids.begin() + gpu.num_top);
  for (int j = 0; j < cpu.num_top; ++j) {
    if (cpu.scores[j] > kth + tol && cpu.scores[j] < upper - tol) {
      EXPECT_TRUE(got.count(cpu.ids[j])) << what << ": id " << cpu.ids[j] << " (rank " << j
                                         << ", score " << cpu.scores[j] << ") missing";
    }
  }
  for (int j = 0; j < gpu.num_top; ++j) {
    EXPECT_GE(gpu.scores[j], kth - tol) << what << " rank " << j;
    EXPECT_LE(gpu.scores[j], upper + tol) << what << " rank " << j;
    auto it = std::find(cpu.ids.begin(), cpu.ids.begin() + cpu.num_top, gpu.ids[j]);
    if (it != cpu.ids.begin() + cpu.num_top) {
      EXPECT_NEAR(gpu.scores[j], cpu.scores[it - cpu.ids.begin()], tol) << what;
    }
    if (j > 0) {
      EXPECT_GE(gpu.scores[j - 1], gpu.scores[j]) << what << ": not ordered";
    }
  }
}

struct Case {
  DeviceDtype dtype;
  Metric metric;
  IndexKind kind;
  int dim;
};

std::string Name(const ::testing::TestParamInfo<Case>& info) {
  const Case& c = info.param;
  return std::string(DeviceDtypeName(c.dtype)) + "_" + MetricName(c.metric) + "_" +
         IndexKindName(c.kind) + "_d" + std::to_string(c.dim);
}

class CudaParityTest : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override {
    SKIP_WITHOUT_GPU();
    const Case& c = GetParam();
    data_ = MakeData(20000, 48, c.dim, 11);
    IndexOptions o{.dim = c.dim, .metric = c.metric, .backend = Backend::kCpu, .kind = c.kind};
    cpu_ = Make(o);
    o.backend = Backend::kCuda;
    o.device_dtype = c.dtype;
    gpu_ = Make(o);
    ASSERT_NE(cpu_, nullptr);
    ASSERT_NE(gpu_, nullptr);
    ASSERT_EQ(gpu_->active_backend(), Backend::kCuda);
    ASSERT_THAT(cpu_->Upsert(data_.ids, data_.targets, 0), IsOk());
    ASSERT_THAT(gpu_->Upsert(data_.ids, data_.targets, 0), IsOk());
  }

  double ScoreTol(const float* q) const {
    const int dim = GetParam().dim;
    const double scale = GetParam().metric == Metric::kCosine ? 1.0 : Norm(q, dim) * data_.max_norm;
    return Tolerance(GetParam().dtype) * scale + 1e-6;
  }

  void CompareTop(const SearchParams& p, absl::Span<const std::vector<uint64_t>> exclude,
                  const std::string& what) {
    absl::StatusOr<SearchResult> a = cpu_->Search(data_.queries, exclude, p);
    absl::StatusOr<SearchResult> b = gpu_->Search(data_.queries, exclude, p);
    ASSERT_THAT(a, IsOk());
    ASSERT_THAT(b, IsOk());
    // The rank window's last score, the upper boundary of the top part.
    std::vector<double> upper(a->queries.size(), INFINITY);
    if (p.rank_offset > 0) {
      absl::StatusOr<SearchResult> window =
          cpu_->Search(data_.queries, exclude, {.k = p.rank_offset});
      ASSERT_THAT(window, IsOk());
      for (size_t i = 0; i < upper.size(); ++i) upper[i] = window->queries[i].scores.back();
    }
    const int dim = GetParam().dim;
    for (size_t i = 0; i < a->queries.size(); ++i) {
      const float* q = data_.queries.data() + i * dim;
      ExpectTopParity(a->queries[i], b->queries[i], ScoreTol(q), upper[i],
                      what + " query " + std::to_string(i));
      if (p.want_log_z) {
        // The CPU tree certifies an interval; the exact index gives lo == hi.
        const double tol = ScoreTol(q) / p.temperature + 1e-4;
        EXPECT_GE(b->queries[i].log_z_lo, a->queries[i].log_z_lo - tol) << what;
        EXPECT_LE(b->queries[i].log_z_lo, a->queries[i].log_z_hi + tol) << what;
        EXPECT_EQ(b->queries[i].log_z_lo, b->queries[i].log_z_hi) << what;
      }
      if (!exclude.empty()) {
        for (uint64_t id : b->queries[i].ids) {
          EXPECT_EQ(std::count(exclude[i].begin(), exclude[i].end(), id), 0) << what;
        }
      }
    }
  }

  Data data_;
  std::unique_ptr<Index> cpu_, gpu_;
};

TEST_P(CudaParityTest, TopKMatchesTheCpu) {
  CompareTop({.mode = MineMode::kTopK, .k = 64}, {}, "top-64");
  CompareTop({.mode = MineMode::kTopK, .k = 1}, {}, "top-1");
  // log Z with the rank window.
  CompareTop({.mode = MineMode::kTopK, .k = 10, .temperature = 0.1f, .rank_offset = 5,
              .want_log_z = true},
             {}, "rank window + log Z");
}

TEST_P(CudaParityTest, ExclusionsAndMixed) {
  const size_t nq = data_.queries.size() / GetParam().dim;
  // Exclude each query's current top 8 and some unknown ids.
  absl::StatusOr<SearchResult> top = cpu_->Search(data_.queries, {}, {.k = 8});
  ASSERT_THAT(top, IsOk());
  std::vector<std::vector<uint64_t>> exclude(nq);
  for (size_t i = 0; i < nq; ++i) {
    exclude[i] = top->queries[i].ids;
    exclude[i].push_back(5);  // unknown: ignored
  }
  CompareTop({.mode = MineMode::kTopK, .k = 16}, exclude, "exclusions");
  CompareTop({.mode = MineMode::kMixed, .k = 12, .temperature = 0.05f, .num_hard = 4,
              .rank_offset = 2, .want_log_z = true, .seed = 3},
             exclude, "mixed");
}

TEST_P(CudaParityTest, WritesDeletesAndDriftReachTheDevice) {
  const int dim = GetParam().dim;
  // Search once so the device holds the data, then change it.
  ASSERT_THAT(gpu_->Search(data_.queries, {}, {.k = 4}), IsOk());
  Data more = MakeData(3000, 1, dim, 12);
  for (uint64_t& id : more.ids) id += 1'000'000;
  // Overwrite 1000 old targets, add 2000 new, delete 1500 others.
  std::vector<uint64_t> ids(data_.ids.begin(), data_.ids.begin() + 1000);
  ids.insert(ids.end(), more.ids.begin(), more.ids.begin() + 2000);
  std::vector<float> vecs(more.targets.begin(), more.targets.begin() + 3000 * dim);
  for (Index* index : {cpu_.get(), gpu_.get()}) {
    ASSERT_THAT(index->Upsert(ids, vecs, 1), IsOk());
    ASSERT_THAT(index->Delete(absl::MakeConstSpan(data_.ids).subspan(5000, 1500), false), IsOk());
  }
  CompareTop({.k = 32}, {}, "after writes");
  // A linear map moves every target: the whole device copy is replaced.
  std::vector<float> a(dim * dim, 0.0f), b(dim, 0.0f);
  Rng rng(5, 0);
  for (int j = 0; j < dim; ++j) a[j * dim + j] = 1.0f;
  for (float& x : a) x += static_cast<float>(0.05 * rng.Normal());
  for (Index* index : {cpu_.get(), gpu_.get()}) {
    ASSERT_THAT(index->ApplyDrift({.model_step = 2, .linear_a = a, .linear_b = b}), IsOk());
  }
  CompareTop({.k = 32}, {}, "after a linear map");
  // A landmark update: the fitted correction of every row runs on the
  // device (DeviceMirror::CorrectRows) for the GPU index, on the host for
  // the CPU one. The landmarks "re-encoded" by a smooth nonlinear map.
  std::vector<uint64_t> landmark_ids;
  for (Index* index : {cpu_.get(), gpu_.get()}) {
    absl::StatusOr<LandmarkSet> l = index->GetLandmarks();
    ASSERT_THAT(l, IsOk());
    if (landmark_ids.empty()) landmark_ids = l->ids;
    ASSERT_EQ(l->ids, landmark_ids) << "both choose the same landmarks";
    std::vector<float> g;
    ASSERT_THAT(index->GetScored(l->ids, &g), IsOk());
    for (size_t i = 0; i < g.size(); ++i) g[i] += 0.2f * std::tanh(3.0f * g[(i + 1) % g.size()]);
    absl::StatusOr<DriftReport> r = index->ApplyDrift(
        {.model_step = 3, .landmark_epoch = l->epoch, .landmark_embeddings = g});
    ASSERT_THAT(r, IsOk());
  }
  EXPECT_EQ(cpu_->DriftInfo().kernel, gpu_->DriftInfo().kernel);
  CompareTop({.k = 32}, {}, "after a landmark drift update");
  // Snapshots restore on the device too.
  absl::StatusOr<std::string> snap = cpu_->Snapshot();
  ASSERT_THAT(snap, IsOk());
  ASSERT_THAT(gpu_->Restore(*snap), IsOk());
  CompareTop({.k = 32}, {}, "after restore");
}

TEST_P(CudaParityTest, TreeBeamIsExactAtFullWidthAndGoodAtSmallWidth) {
  if (GetParam().kind != IndexKind::kTree) GTEST_SKIP() << "beam search is the tree's";
  const int dim = GetParam().dim;
  const size_t nq = data_.queries.size() / dim;
  absl::StatusOr<SearchResult> exact = cpu_->Search(data_.queries, {}, {.k = 32});
  ASSERT_THAT(exact, IsOk());
  // Every leaf: the same as exact.
  CompareTop({.k = 32, .approximate = true, .beam_width = DeviceMirror::kMaxK}, {},
             "beam over every leaf");
  // A narrow beam: recall against brute force on the clustered data.
  absl::StatusOr<SearchResult> beam =
      gpu_->Search(data_.queries, {}, {.k = 32, .approximate = true, .beam_width = 24});
  ASSERT_THAT(beam, IsOk());
  double hits = 0;
  for (size_t i = 0; i < nq; ++i) {
    std::set<uint64_t> truth(exact->queries[i].ids.begin(), exact->queries[i].ids.end());
    for (uint64_t id : beam->queries[i].ids) hits += truth.count(id);
  }
  EXPECT_GE(hits / (32.0 * nq), 0.9) << "recall@32 of a 24-leaf beam";
  // GetIndexInfo's visits per query: the 24 leaves and their rows, a small
  // part of the 20k targets.
  std::optional<TreeSummary> t = gpu_->TreeInfo();
  ASSERT_TRUE(t.has_value());
  EXPECT_GT(t->visits_per_query, 24.0);
  EXPECT_LT(t->visits_per_query, 20000.0 / 4);
}

// Small writes change a few entries of the tree's member pool; the device
// gets those runs, and a beam over every leaf stays exact after each.
TEST_P(CudaParityTest, TreeBeamFollowsSmallWrites) {
  if (GetParam().kind != IndexKind::kTree) GTEST_SKIP() << "beam search is the tree's";
  const int dim = GetParam().dim;
  const SearchParams full{.k = 32, .approximate = true, .beam_width = DeviceMirror::kMaxK};
  CompareTop(full, {}, "before the writes");
  Data more = MakeData(400, 1, dim, 13);
  for (uint64_t& id : more.ids) id += 2'000'000;
  auto row = [&](const Data& d, size_t i) {
    return absl::MakeConstSpan(d.targets).subspan(i * dim, dim);
  };
  for (size_t step = 0; step < 4; ++step) {
    // One insert, one delete and one overwrite per step.
    for (Index* index : {cpu_.get(), gpu_.get()}) {
      ASSERT_THAT(index->Upsert({more.ids[step]}, row(more, step), 1), IsOk());
      ASSERT_THAT(index->Delete({data_.ids[100 + step]}, false), IsOk());
      ASSERT_THAT(index->Upsert({data_.ids[200 + step]}, row(more, 200 + step), 1), IsOk());
    }
    CompareTop(full, {}, absl::StrCat("after small writes, step ", step));
  }
  // Enough inserts to split leaves (a change of structure).
  const std::vector<uint64_t> ids(more.ids.begin() + 10, more.ids.begin() + 200);
  const auto vecs = absl::MakeConstSpan(more.targets).subspan(10 * dim, 190 * dim);
  for (Index* index : {cpu_.get(), gpu_.get()}) ASSERT_THAT(index->Upsert(ids, vecs, 2), IsOk());
  CompareTop(full, {}, "after splits");
}

INSTANTIATE_TEST_SUITE_P(
    Dtypes, CudaParityTest,
    ::testing::Values(Case{DeviceDtype::kFloat32, Metric::kInnerProduct, IndexKind::kExact, 64},
                      Case{DeviceDtype::kFloat32, Metric::kCosine, IndexKind::kTree, 37},
                      Case{DeviceDtype::kFloat16, Metric::kInnerProduct, IndexKind::kTree, 64},
                      Case{DeviceDtype::kFloat16, Metric::kCosine, IndexKind::kExact, 128},
                      Case{DeviceDtype::kBFloat16, Metric::kInnerProduct, IndexKind::kExact, 64},
                      Case{DeviceDtype::kBFloat16, Metric::kCosine, IndexKind::kTree, 64}),
    Name);

// Gumbel-top-k on the device (the exact sampler, of both kinds) draws from
// the exact softmax: 10^5 first draws
// against the softmax computed in double on the host, at three temperatures;
// log q equals s / tau - log Z.
TEST(CudaSamplingTest, GumbelTopKFollowsTheSoftmax) {
  SKIP_WITHOUT_GPU();
  const int dim = 16;
  const size_t n = 300;
  Data d = MakeData(n, 1, dim, 21);
  for (IndexKind kind : {IndexKind::kExact, IndexKind::kTree}) {
    std::unique_ptr<Index> gpu = Make({.dim = dim, .backend = Backend::kCuda, .kind = kind});
    ASSERT_NE(gpu, nullptr);
    ASSERT_THAT(gpu->Upsert(d.ids, d.targets, 0), IsOk());
    absl::flat_hash_map<uint64_t, size_t> index_of;
    for (size_t i = 0; i < n; ++i) index_of[d.ids[i]] = i;
    const float* q = d.queries.data();
    for (float tau : {0.05f, 0.1f, 1.0f}) {
      std::vector<double> logits(n);
      double m = -1e300;
      for (size_t i = 0; i < n; ++i) {
        logits[i] = testing::Dot(q, d.targets.data() + i * dim, dim) / tau;
        m = std::max(m, logits[i]);
      }
      double z = 0;
      for (double l : logits) z += std::exp(l - m);
      const double log_z = m + std::log(z);
      std::vector<double> probs(n);
      for (size_t i = 0; i < n; ++i) probs[i] = std::exp(logits[i] - log_z);

      // 1000 copies of the query per call (each copy gets its own noise),
      // 100 calls with different seeds: 10^5 first draws.
      const size_t copies = 1000;
      std::vector<float> batch;
      for (size_t c = 0; c < copies; ++c) batch.insert(batch.end(), q, q + dim);
      std::vector<int64_t> counts(n, 0);
      int64_t draws = 0;
      for (uint64_t seed = 1; seed <= 100; ++seed) {
        absl::StatusOr<SearchResult> r = gpu->Search(
            batch, {},
            {.mode = MineMode::kSample, .sampler = Sampler::kExact, .k = 3, .temperature = tau,
             .seed = seed});
        ASSERT_THAT(r, IsOk());
        for (const QueryResult& qr : r->queries) {
          ASSERT_EQ(qr.ids.size(), 3u);
          EXPECT_EQ(std::set<uint64_t>(qr.ids.begin(), qr.ids.end()).size(), 3u)
              << "without replacement";
          const size_t i = index_of.at(qr.ids[0]);
          ++counts[i];
          ++draws;
          EXPECT_NEAR(qr.log_q[0], logits[i] - log_z, 1e-3 * std::max(1.0, std::abs(logits[i])));
        }
      }
      const auto [stat, df] = ChiSquare(counts, probs, draws);
      EXPECT_LT(stat, ChiSquareCritical(df))
          << "kind " << static_cast<int>(kind) << ", tau " << tau << ", df " << df;
    }
  }
}

// A CUDA tree collection with small leaves and no background rebuilds.
std::unique_ptr<Index> MakeTree(int dim, DeviceDtype dtype, int leaf_size) {
  IndexOptions o{.dim = dim, .backend = Backend::kCuda, .device_dtype = dtype,
                 .kind = IndexKind::kTree};
  o.tree.leaf_size = leaf_size;
  o.tree.branching = 4;
  o.tree.background_rebuild = false;
  return Make(o);
}

// The device's tree proposal: every target's log q is the same on every draw
// of it, and 10^5 draws with replacement follow exp(log q) (chi-square), for
// each dtype.
TEST(CudaSamplingTest, TreeProposalLogQIsItsProbability) {
  SKIP_WITHOUT_GPU();
  const int dim = 8;
  Data d = MakeData(1200, 1, dim, 31);
  for (DeviceDtype dtype : {DeviceDtype::kFloat32, DeviceDtype::kFloat16, DeviceDtype::kBFloat16}) {
    std::unique_ptr<Index> gpu = MakeTree(dim, dtype, 16);
    ASSERT_NE(gpu, nullptr);
    ASSERT_THAT(gpu->Upsert(d.ids, d.targets, 0), IsOk());
    std::vector<float> batch;
    for (int c = 0; c < 1000; ++c) batch.insert(batch.end(), d.queries.begin(), d.queries.end());
    absl::StatusOr<SearchResult> r = gpu->Search(
        batch, {},
        {.mode = MineMode::kSample, .k = 100, .temperature = 0.1f, .with_replacement = true,
         .seed = 5});
    ASSERT_THAT(r, IsOk());
    for (const QueryResult& res : r->queries) ASSERT_EQ(res.ids.size(), 100u);
    const testing::LogQFrequencies f = testing::LogQFrequencyTest(r->queries, 1e-4);
    EXPECT_EQ(f.inconsistent, 0u);
    EXPECT_LE(f.seen_mass, 1.0 + 1e-3);
    ASSERT_GT(f.bins, 20u);
    EXPECT_LT(f.stat, ChiSquareCritical(f.df))
        << "dtype " << static_cast<int>(dtype) << ", df " << f.df;
  }
}

// Without replacement the device's proposal takes every eligible target
// once: deleted and excluded targets never, and MIXED's hard part not again.
TEST(CudaSamplingTest, TreeProposalWithoutReplacementTakesEveryEligibleTargetOnce) {
  SKIP_WITHOUT_GPU();
  const int dim = 8;
  Data d = MakeData(310, 6, dim, 41);
  std::unique_ptr<Index> gpu = MakeTree(dim, DeviceDtype::kFloat32, 16);
  ASSERT_NE(gpu, nullptr);
  ASSERT_THAT(gpu->Upsert(d.ids, d.targets, 0), IsOk());
  const std::vector<uint64_t> deleted(d.ids.begin() + 300, d.ids.end());
  ASSERT_THAT(gpu->Delete(deleted, false), IsOk());
  std::vector<std::vector<uint64_t>> exclude(6);
  for (size_t i = 0; i < 6; ++i) {
    for (size_t j = 0; j < 20; ++j) exclude[i].push_back(d.ids[(7 * i + 13 * j) % 300]);
  }
  // A high temperature, so that the last targets are within the capped
  // attempts (200 per sample).
  absl::StatusOr<SearchResult> r = gpu->Search(
      d.queries, exclude,
      {.mode = MineMode::kMixed, .k = 280, .temperature = 2.0f, .num_hard = 5, .seed = 9});
  ASSERT_THAT(r, IsOk());
  for (size_t i = 0; i < 6; ++i) {
    const QueryResult& q = r->queries[i];
    const std::set<uint64_t> got(q.ids.begin(), q.ids.end());
    EXPECT_EQ(q.num_top, 5);
    EXPECT_EQ(q.ids.size(), 280u);
    EXPECT_EQ(got.size(), 280u) << "no target twice";
    for (uint64_t id : exclude[i]) EXPECT_FALSE(got.count(id)) << "excluded " << id;
    for (uint64_t id : deleted) EXPECT_FALSE(got.count(id)) << "deleted " << id;
  }
  // Query 3 alone draws what it drew in the batch (its own stream).
  const std::vector<float> q3(d.queries.begin() + 3 * dim, d.queries.begin() + 4 * dim);
  SearchParams small{.mode = MineMode::kSample, .k = 40, .temperature = 0.05f, .seed = 9};
  absl::StatusOr<SearchResult> alone = gpu->Search(q3, {{exclude[3]}}, small);
  std::vector<float> q3_first = q3;
  q3_first.insert(q3_first.end(), d.queries.begin(), d.queries.end());
  std::vector<std::vector<uint64_t>> ex3 = {exclude[3]};
  ex3.insert(ex3.end(), exclude.begin(), exclude.end());
  absl::StatusOr<SearchResult> batch = gpu->Search(q3_first, ex3, small);
  ASSERT_THAT(alone, IsOk());
  ASSERT_THAT(batch, IsOk());
  EXPECT_EQ(alone->queries[0].ids, batch->queries[0].ids);
  ASSERT_EQ(alone->queries[0].log_q.size(), batch->queries[0].log_q.size());
  for (size_t j = 0; j < alone->queries[0].log_q.size(); ++j) {
    // The routing GEMM of one query and of seven may sum in another order
    // (cuBLAS picks its kernel by shape): equal up to rounding, as on the CPU.
    EXPECT_NEAR(alone->queries[0].log_q[j], batch->queries[0].log_q[j], 1e-4);
  }
}

// ChangedRuns (host code, runs everywhere): every changed element is in a
// run, and a run is made of changed blocks or the grown tail only.
TEST(ChangedRunsTest, CoversTheChangesAndOnlyChangedBlocks) {
  std::vector<uint32_t> before(10000), now;
  for (size_t i = 0; i < before.size(); ++i) before[i] = static_cast<uint32_t>(i * 7);
  now = before;
  EXPECT_TRUE(ChangedRuns<uint32_t>(before, now, 1024).empty());
  now[5] = 1;
  now[1030] = 2;
  now[1031] = 3;
  now[4100] = 4;
  now.resize(10500, 9);
  const auto runs = ChangedRuns<uint32_t>(before, now, 1024);
  const std::vector<std::pair<size_t, size_t>> expected = {{0, 2048}, {4096, 5120}, {10000, 10500}};
  EXPECT_EQ(runs, expected);
  // The last, partial block; and a shrunk array compares its common part.
  now = before;
  now[9999] = 0;
  EXPECT_EQ(ChangedRuns<uint32_t>(before, now, 1024),
            (std::vector<std::pair<size_t, size_t>>{{9216, 10000}}));
  now.resize(5000);
  EXPECT_TRUE(ChangedRuns<uint32_t>(before, now, 1024).empty());
}

// The mirror's leaf level follows the host pool by changed runs: a target
// moved from one leaf to another (a swap-remove and an append, as the host
// tree does) costs two blocks of upload, and a beam over every leaf then
// returns every row once.
TEST(CudaMirrorTest, LeafPoolIsUploadedByChangedRuns) {
  SKIP_WITHOUT_GPU();
  const int dim = 8;
  const size_t n = 200, num_leaves = 10, cap = 1024;
  absl::StatusOr<std::unique_ptr<DeviceMirror>> made =
      DeviceMirror::Create(dim, DeviceDtype::kFloat32);
  ASSERT_THAT(made, IsOk());
  DeviceMirror& m = **made;
  const std::vector<float> x = testing::RandomVectors(n, dim, 3);
  std::vector<uint8_t> live(n, 1);
  std::vector<uint64_t> ids(n);
  for (size_t i = 0; i < n; ++i) ids[i] = 500 + i;
  ASSERT_THAT(m.SetAll(PointSource{.data = x.data(), .dim = dim}, n, live.data(), ids.data()),
              IsOk());
  // Leaf f holds rows f, f + 10, ... in a block of `cap` (the rest unused).
  std::vector<uint32_t> pool(num_leaves * cap, 0xdeadbeef), begin(num_leaves), count(num_leaves);
  std::vector<float> centers(num_leaves * dim, 0.0f), spreads(num_leaves, 0.0f);
  for (size_t f = 0; f < num_leaves; ++f) {
    begin[f] = static_cast<uint32_t>(f * cap);
    for (size_t r = f; r < n; r += num_leaves) {
      pool[begin[f] + count[f]++] = static_cast<uint32_t>(r);
    }
  }
  ASSERT_THAT(m.SetLeaves(centers, spreads, begin, count, pool), IsOk());
  EXPECT_EQ(m.LastPoolUpload(), pool.size());
  auto every_row_once = [&](const char* what) {
    std::vector<DeviceHit> hits;
    ASSERT_THAT(m.Beam(absl::MakeConstSpan(x).subspan(0, dim), 1, num_leaves, n, &hits), IsOk());
    std::multiset<uint64_t> got;
    for (const DeviceHit& h : hits) {
      ASSERT_NE(h.row, DeviceMirror::kNoRow) << what;
      got.insert(h.id);
      EXPECT_NEAR(h.score, testing::Dot(x.data(), x.data() + h.row * dim, dim), 1e-4) << what;
    }
    for (uint64_t id : ids) EXPECT_EQ(got.count(id), 1u) << what << ": id " << id;
  };
  every_row_once("full upload");
  // Row 22 leaves leaf 2 (the last member takes its slot) for leaf 7.
  uint32_t* m2 = pool.data() + begin[2];
  *std::find(m2, m2 + count[2], 22u) = m2[count[2] - 1];
  --count[2];
  pool[begin[7] + count[7]++] = 22;
  ASSERT_THAT(m.SetLeaves({}, spreads, begin, count, pool), IsOk());
  EXPECT_EQ(m.LastPoolUpload(), 2 * cap);
  every_row_once("after the move");
  // No leaves at all (every target deleted) is a leaf level too.
  ASSERT_THAT(m.SetLeaves({}, {}, {}, {}, {}), IsOk());
  std::vector<DeviceHit> none;
  ASSERT_THAT(m.Beam(absl::MakeConstSpan(x).subspan(0, dim), 1, 4, 10, &none), IsOk());
  for (const DeviceHit& h : none) EXPECT_EQ(h.row, DeviceMirror::kNoRow);
}

// The fused scan (tensor-core scores filtered by each query's bound in the
// kernel) returns what the unfused scan returns: per query the same scores
// in order within the dtype's tolerance, and the same rows where the scores
// are clear of ties. Also with exclusions and a dead row, for a stride that
// is not a multiple of the MMA depth, and on data whose scores rise with the
// row, where every chunk beats the bound, the candidates overflow and those
// queries are scanned again unfused.
TEST(CudaMirrorTest, FusedScanMatchesTheUnfusedScan) {
  SKIP_WITHOUT_GPU();
  struct Setup {
    DeviceDtype dtype;
    int dim;
    int k;
    bool rising;
  };
  for (const Setup& c : {Setup{DeviceDtype::kFloat16, 128, 64, false},
                         Setup{DeviceDtype::kBFloat16, 37, 64, false},
                         Setup{DeviceDtype::kFloat16, 256, 2048, false},
                         Setup{DeviceDtype::kFloat16, 64, 64, true}}) {
    SCOPED_TRACE(absl::StrCat("dtype ", static_cast<int>(c.dtype), " dim ", c.dim, " k ", c.k,
                              c.rising ? " rising" : ""));
    const size_t n = 60000, nq = 200;
    std::vector<float> x = testing::RandomVectors(n, c.dim, 7);
    std::vector<float> q = testing::RandomVectors(nq, c.dim, 8);
    if (c.rising) {
      // Every target leans towards query 0's direction, more so later.
      for (size_t i = 0; i < n; ++i) {
        for (int j = 0; j < c.dim; ++j) x[i * c.dim + j] = 0.1f * x[i * c.dim + j] + q[j] * (i / float(n));
      }
      for (size_t i = 1; i < nq; ++i) std::copy_n(q.begin(), c.dim, q.begin() + i * c.dim);
    }
    std::vector<uint8_t> live(n, 1);
    live[17] = 0;
    absl::StatusOr<std::unique_ptr<DeviceMirror>> made = DeviceMirror::Create(c.dim, c.dtype);
    ASSERT_THAT(made, IsOk());
    DeviceMirror& m = **made;
    ASSERT_THAT(m.SetAll(PointSource{.data = x.data(), .dim = c.dim}, n, live.data(), nullptr),
                IsOk());
    DeviceMirror::ScanParams p;
    p.k = c.k;
    p.exclude_offsets.push_back(0);
    for (size_t i = 0; i < nq; ++i) {
      for (uint32_t r : {uint32_t(i * 13 % n), uint32_t(i * 29 % n), uint32_t(n - 1)}) {
        p.exclude_rows.push_back(r);
      }
      p.exclude_offsets.push_back(static_cast<uint32_t>(p.exclude_rows.size()));
    }
    std::vector<DeviceHit> fused, plain;
    m.set_fused_scan(true);
    ASSERT_THAT(m.Scan(q, nq, p, &fused, nullptr), IsOk());
    const size_t redo = m.LastFusedRedo();
    m.set_fused_scan(false);
    ASSERT_THAT(m.Scan(q, nq, p, &plain, nullptr), IsOk());
    if (c.rising) {
      EXPECT_GT(redo, 0u) << "rising scores overflow the candidates";
    } else {
      EXPECT_LT(redo, nq / 10);
    }
    double max_norm = 0;
    for (size_t i = 0; i < n; ++i) max_norm = std::max(max_norm, Norm(x.data() + i * c.dim, c.dim));
    for (size_t i = 0; i < nq; ++i) {
      const double tol = Tolerance(c.dtype) * Norm(q.data() + i * c.dim, c.dim) * max_norm + 1e-6;
      auto sorted = [&](std::vector<DeviceHit>& h) {
        std::vector<DeviceHit> v(h.begin() + i * c.k, h.begin() + (i + 1) * c.k);
        std::sort(v.begin(), v.end(), [](const DeviceHit& a, const DeviceHit& b) {
          return a.score > b.score || (a.score == b.score && a.row < b.row);
        });
        return v;
      };
      const std::vector<DeviceHit> f = sorted(fused), u = sorted(plain);
      const std::set<uint32_t> excluded(p.exclude_rows.begin() + p.exclude_offsets[i],
                                        p.exclude_rows.begin() + p.exclude_offsets[i + 1]);
      std::set<uint32_t> fused_rows;
      for (int j = 0; j < c.k; ++j) {
        ASSERT_NE(f[j].row, DeviceMirror::kNoRow) << "query " << i;
        EXPECT_NEAR(f[j].score, u[j].score, tol) << "query " << i << " rank " << j;
        EXPECT_FALSE(excluded.count(f[j].row)) << "query " << i;
        EXPECT_NE(f[j].row, 17u) << "a dead row";
        fused_rows.insert(f[j].row);
      }
      const float kth = u[c.k - 1].score;
      for (int j = 0; j < c.k && u[j].score > kth + 2 * tol; ++j) {
        EXPECT_TRUE(fused_rows.count(u[j].row)) << "query " << i << " row " << u[j].row;
      }
    }
  }
}

// Running out of GPU memory is RESOURCE_EXHAUSTED, and the mirror goes on.
TEST(CudaMemoryTest, OutOfMemoryIsResourceExhaustedAndRecoverable) {
  SKIP_WITHOUT_GPU();
  absl::StatusOr<std::unique_ptr<DeviceMirror>> m = DeviceMirror::Create(1024, DeviceDtype::kFloat32);
  ASSERT_THAT(m, IsOk());
  // 2^40 rows x 4 KiB: far beyond any GPU.
  EXPECT_THAT((*m)->Reserve(size_t{1} << 40),
              StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("out of GPU memory")));
  // The index over it keeps working, and so does an index's write path.
  std::unique_ptr<Index> gpu = Make({.dim = 8, .backend = Backend::kCuda});
  ASSERT_NE(gpu, nullptr);
  std::vector<float> v = testing::RandomVectors(100, 8, 1);
  std::vector<uint64_t> ids(100);
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = i;
  ASSERT_THAT(gpu->Upsert(ids, v, 0), IsOk());
  absl::StatusOr<SearchResult> r = gpu->Search(absl::MakeConstSpan(v).subspan(0, 8), {}, {.k = 1});
  ASSERT_THAT(r, IsOk());
  EXPECT_EQ(r->queries[0].ids[0], 0u);
}

}  // namespace
}  // namespace negmine
