// ShardedClient against real negmine-server processes on loopback: three
// shards and one server holding the union (the single-server oracle).
//
// Oracles and tolerances: top-k equals the union server's (ids exactly,
// scores to 1e-6); samples pass a chi-square test (fixed seeds, p > 1e-4 by
// the Wilson-Hilferty approximation) against the global softmax computed in
// double by brute force; the ring's owners equal the Python package's.
#include "client/sharded_client.h"

#include <cmath>
#include <cstdio>
#include <map>
#include <random>
#include <set>
#include <sstream>

#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"

#include "tests/server_process.h"

namespace negmine::client {
namespace {

constexpr uint32_t kDim = 8;
constexpr int kN = 300;
constexpr int kShards = 3;

// P(chi2_df > stat), Wilson-Hilferty.
double ChiSquareP(double stat, int df) {
  const double z = (std::cbrt(stat / df) - (1 - 2.0 / (9 * df))) / std::sqrt(2.0 / (9 * df));
  return 0.5 * std::erfc(z / std::sqrt(2.0));
}

// Counts against probabilities; cells expecting < 5 are pooled.
double GoodnessOfFit(const std::vector<double>& counts, const std::vector<double>& p) {
  double n = 0;
  for (double c : counts) n += c;
  double stat = 0, pooled_o = 0, pooled_e = 0;
  int cells = 0;
  for (size_t i = 0; i < p.size(); ++i) {
    const double e = n * p[i];
    if (e < 5) {
      pooled_o += counts[i];
      pooled_e += e;
      continue;
    }
    stat += (counts[i] - e) * (counts[i] - e) / e;
    ++cells;
  }
  if (pooled_e >= 5) {
    stat += (pooled_o - pooled_e) * (pooled_o - pooled_e) / pooled_e;
    ++cells;
  }
  return ChiSquareP(stat, std::max(1, cells - 1));
}

class ShardedTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    servers_ = new std::vector<testing::ServerProcess>(kShards + 1);
    std::vector<std::string> addresses;
    for (int s = 0; s <= kShards; ++s) {
      ASSERT_TRUE((*servers_)[s].Start(NEGMINE_SERVER_BIN, {"--worker_threads=1"}));
      if (s < kShards) addresses.push_back((*servers_)[s].address());
    }
    sharded_ = ShardedClient::Connect(addresses).release();
    union_ = Client::Connect((*servers_)[kShards].address()).release();
    std::mt19937_64 rng(11);
    std::normal_distribution<float> normal;
    x_ = new std::vector<float>(kN * kDim);
    ids_ = new std::vector<uint64_t>(kN);
    for (int i = 0; i < kN; ++i) {
      (*ids_)[i] = 1000 + 7 * i;
      float norm = 0;
      for (uint32_t d = 0; d < kDim; ++d) {
        (*x_)[i * kDim + d] = normal(rng) + (i % 5 == d ? 2.0f : 0.0f);
        norm += (*x_)[i * kDim + d] * (*x_)[i * kDim + d];
      }
      for (uint32_t d = 0; d < kDim; ++d) (*x_)[i * kDim + d] /= std::sqrt(norm);
    }
    for (const char* name : {"tree", "exact"}) {
      v1::CollectionConfig config;
      config.set_name(name);
      config.set_dim(kDim);
      config.set_metric(v1::METRIC_INNER_PRODUCT);
      config.set_index_kind(std::string(name) == "tree" ? v1::INDEX_KIND_TREE
                                                        : v1::INDEX_KIND_EXACT);
      config.mutable_tree()->set_leaf_size(8);
      config.mutable_tree()->set_branching(4);
      ASSERT_TRUE(sharded_->CreateCollection(config).ok());
      ASSERT_TRUE(union_->CreateCollection(config).ok());
      ASSERT_TRUE(sharded_->Upsert(name, *ids_, *x_, kDim, 0).ok());
      ASSERT_TRUE(union_->Upsert(name, *ids_, *x_, kDim, 0).ok());
    }
  }
  static void TearDownTestSuite() {
    delete sharded_;
    delete union_;
    delete servers_;
    delete x_;
    delete ids_;
  }

  // A query near target t (the softmax mass is uneven across shards).
  static std::vector<float> NearQuery(int t, int copies) {
    std::vector<float> q;
    for (int c = 0; c < copies; ++c) {
      q.insert(q.end(), x_->begin() + t * kDim, x_->begin() + (t + 1) * kDim);
    }
    return q;
  }
  static std::vector<double> Softmax(const float* q, double tau) {
    std::vector<double> p(kN);
    double top = -1e300, sum = 0;
    for (int i = 0; i < kN; ++i) {
      double s = 0;
      for (uint32_t d = 0; d < kDim; ++d) s += double{q[d]} * (*x_)[i * kDim + d];
      p[i] = s / tau;
      top = std::max(top, p[i]);
    }
    for (double& v : p) sum += (v = std::exp(v - top));
    for (double& v : p) v /= sum;
    return p;
  }
  static int Index(uint64_t id) { return static_cast<int>((id - 1000) / 7); }

  static std::vector<testing::ServerProcess>* servers_;
  static ShardedClient* sharded_;
  static Client* union_;
  static std::vector<float>* x_;
  static std::vector<uint64_t>* ids_;
};

std::vector<testing::ServerProcess>* ShardedTest::servers_ = nullptr;
ShardedClient* ShardedTest::sharded_ = nullptr;
Client* ShardedTest::union_ = nullptr;
std::vector<float>* ShardedTest::x_ = nullptr;
std::vector<uint64_t>* ShardedTest::ids_ = nullptr;

TEST(HashRingTest, OwnersEqualThePythonPackages) {
  const std::string cmd = std::string(NEGMINE_VENV_PYTHON) +
                          " -c \"import negmine, numpy as np; print(' '.join(map(str, "
                          "negmine.HashRing(5).owner(np.arange(3000) * 7919 + 3))))\"";
  FILE* pipe = popen(cmd.c_str(), "r");
  ASSERT_NE(pipe, nullptr);
  std::string out;
  char buf[4096];
  while (size_t got = fread(buf, 1, sizeof(buf), pipe)) out.append(buf, got);
  ASSERT_EQ(pclose(pipe), 0) << cmd;
  std::istringstream in(out);
  HashRing ring(5);
  std::vector<int> counts(5, 0);
  for (uint64_t i = 0; i < 3000; ++i) {
    int owner = -1;
    ASSERT_TRUE(in >> owner);
    ASSERT_EQ(ring.Owner(i * 7919 + 3), owner) << i;
    ++counts[owner];
  }
  for (int c : counts) EXPECT_GT(c, 3000 / 5 / 2);
}

TEST_F(ShardedTest, TopKEqualsTheUnionServer) {
  std::vector<float> q(x_->begin(), x_->begin() + 4 * kDim);
  for (float& v : q) v += 0.1f;
  std::vector<std::vector<uint64_t>> exclude = {{(*ids_)[0]}, {}, {(*ids_)[2]}, {}};
  for (const char* name : {"tree", "exact"}) {
    for (auto [k, offset] : std::vector<std::pair<int, int>>{{10, 0}, {25, 3}, {120, 0}}) {
      v1::MineParams p;
      p.set_k(k);
      p.set_rank_offset(offset);
      auto a = sharded_->Mine(name, q, kDim, p, exclude);
      ASSERT_TRUE(a.ok()) << a.status();
      auto b = union_->Mine(name, q, kDim, p, exclude);
      ASSERT_TRUE(b.ok()) << b.status();
      ASSERT_EQ(a->response.results_size(), 4);
      for (int i = 0; i < 4; ++i) {
        const auto& x = a->response.results(i);
        const auto& y = b->results(i);
        ASSERT_EQ(x.ids_size(), y.ids_size());
        for (int j = 0; j < x.ids_size(); ++j) {
          EXPECT_EQ(x.ids(j), y.ids(j)) << name << " k " << k << " query " << i;
          EXPECT_NEAR(x.scores(j), y.scores(j), 1e-6);
        }
        EXPECT_EQ(x.num_eligible(), y.num_eligible());
      }
      EXPECT_EQ(a->coverage, 1.0);
    }
  }
}

TEST_F(ShardedTest, ExactSamplesWithReplacementFollowTheGlobalSoftmax) {
  const double tau = 0.1;
  for (const char* name : {"tree", "exact"}) {
    const std::vector<float> q = NearQuery(4, 100);
    std::vector<double> counts(kN, 0);
    for (int seed = 1; seed <= 6; ++seed) {
      v1::MineParams p;
      p.set_mode(v1::MINE_MODE_SAMPLE);
      p.set_sampler(v1::SAMPLER_EXACT);
      p.set_k(20);
      p.set_temperature(tau);
      p.set_with_replacement(true);
      p.set_seed(seed);
      auto r = sharded_->Mine(name, q, kDim, p);
      ASSERT_TRUE(r.ok()) << r.status();
      for (const auto& res : r->response.results()) {
        ASSERT_EQ(res.ids_size(), 20);
        for (uint64_t id : res.ids()) counts[Index(id)] += 1;
      }
    }
    const auto p = Softmax(q.data(), tau);
    EXPECT_GT(GoodnessOfFit(counts, p), 1e-4) << name;
  }
}

TEST_F(ShardedTest, ExactSamplesWithoutReplacementFollowPlackettLuce) {
  const double tau = 0.1;
  for (const char* name : {"tree", "exact"}) {
    const std::vector<float> q = NearQuery(7, 200);
    std::vector<double> first(kN, 0), second(kN, 0);
    for (int seed = 1; seed <= 8; ++seed) {
      v1::MineParams p;
      p.set_mode(v1::MINE_MODE_SAMPLE);
      p.set_sampler(v1::SAMPLER_EXACT);
      p.set_k(5);
      p.set_temperature(tau);
      p.set_seed(seed);
      auto r = sharded_->Mine(name, q, kDim, p);
      ASSERT_TRUE(r.ok()) << r.status();
      EXPECT_EQ(r->unresolved, 0);
      for (const auto& res : r->response.results()) {
        ASSERT_EQ(res.ids_size(), 5);
        std::set<uint64_t> distinct(res.ids().begin(), res.ids().end());
        EXPECT_EQ(distinct.size(), 5u);
        first[Index(res.ids(0))] += 1;
        second[Index(res.ids(1))] += 1;
      }
    }
    const auto p = Softmax(q.data(), tau);
    double sum_ratio = 0;
    for (double v : p) sum_ratio += v / (1 - v);
    std::vector<double> p2(kN);
    for (int j = 0; j < kN; ++j) p2[j] = p[j] * (sum_ratio - p[j] / (1 - p[j]));
    EXPECT_GT(GoodnessOfFit(first, p), 1e-4) << name;
    EXPECT_GT(GoodnessOfFit(second, p2), 1e-4) << name;
  }
}

TEST_F(ShardedTest, ReadYourWritesCarriesAVersionPerShard) {
  const uint64_t id = 5;
  std::vector<float> v(x_->begin(), x_->begin() + kDim);
  ASSERT_TRUE(sharded_->Upsert("exact", {&id, 1}, v, kDim, 0).ok());
  std::vector<uint64_t> ahead = sharded_->Versions("exact");
  const int owner = sharded_->ring().Owner(id);
  ahead[owner] += 1000;
  ShardedMineOptions o;
  o.min_versions = ahead;
  v1::MineParams p;
  p.set_k(1);
  auto r = sharded_->Mine("exact", v, kDim, p, {}, o);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(r.status().message().find(absl::StrCat("shard ", owner)), std::string::npos)
      << r.status();
  ASSERT_TRUE(sharded_->Delete("exact", {&id, 1}, false).ok());
}

TEST(ShardedFailureTest, AKilledShardIsNamedOrLeftOutWithCoverage) {
  std::vector<testing::ServerProcess> servers(2);
  std::vector<std::string> addresses;
  for (auto& s : servers) {
    ASSERT_TRUE(s.Start(NEGMINE_SERVER_BIN, {"--worker_threads=1"}));
    addresses.push_back(s.address());
  }
  ShardedOptions options;
  options.client.retry_max_attempts = 2;
  options.timeout = std::chrono::milliseconds(20000);
  auto c = ShardedClient::Connect(addresses, options);
  v1::CollectionConfig config;
  config.set_name("c");
  config.set_dim(4);
  config.set_index_kind(v1::INDEX_KIND_EXACT);
  ASSERT_TRUE(c->CreateCollection(config).ok());
  std::vector<uint64_t> ids(100);
  std::vector<float> x(400);
  std::mt19937 rng(3);
  std::normal_distribution<float> normal;
  for (int i = 0; i < 100; ++i) ids[i] = i;
  for (float& v : x) v = normal(rng);
  ASSERT_TRUE(c->Upsert("c", ids, x, 4, 0).ok());
  std::vector<float> q(x.begin(), x.begin() + 4);
  v1::MineParams p;
  p.set_k(5);
  ASSERT_TRUE(c->Mine("c", q, 4, p).ok());
  kill(servers[1].pid(), SIGKILL);
  servers[1].Wait();
  auto failed = c->Mine("c", q, 4, p);
  EXPECT_EQ(failed.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(failed.status().message().find("shard 1 (" + addresses[1] + ")"),
            std::string::npos) << failed.status();
  ShardedMineOptions o;
  o.allow_partial = true;
  auto part = c->Mine("c", q, 4, p, {}, o);
  ASSERT_TRUE(part.ok()) << part.status();
  int alive = 0;
  for (uint64_t id : ids) alive += c->ring().Owner(id) != 1;
  EXPECT_NEAR(part->coverage, alive / 100.0, 1e-9);
  ASSERT_EQ(part->missing_shards, std::vector<int>{1});
  EXPECT_EQ(part->shard_versions[1], -1);
  for (uint64_t id : part->response.results(0).ids()) EXPECT_NE(c->ring().Owner(id), 1);
}

}  // namespace
}  // namespace negmine::client
