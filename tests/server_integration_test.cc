// Integration tests: the real negmine-server binary on a free loopback port,
// driven through the C++ client library, against brute-force oracles. One
// file because its tests share one server process (SetUpTestSuite) and its
// fixture; a second file would start a second server.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <memory>
#include <numeric>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "client/negmine_client.h"
#include "core/cuda/device.h"
#include "core/dtype.h"
#include "core/random.h"
#include "core/store/drift_bench.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/server_process.h"
#include "tests/test_util.h"

namespace negmine {
namespace {

namespace v1 = ::negmine::v1;
using ::negmine::client::Client;
using ::negmine::testing::ChiSquare;
using ::negmine::testing::ChiSquareCritical;
using ::negmine::testing::Dot;
using ::negmine::testing::IsOk;
using ::negmine::testing::RandomVectors;
using ::negmine::testing::Softmax;
using ::negmine::testing::StatusIs;
using ::testing::AllOf;
using ::testing::HasSubstr;

constexpr double kScoreTol = 1e-4;

std::vector<uint64_t> Ids(size_t n, uint64_t base) {
  std::vector<uint64_t> ids(n);
  for (size_t i = 0; i < n; ++i) ids[i] = base + 7 * i;  // not 0..n-1
  return ids;
}

class ServerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    server_ = new testing::ServerProcess();
    ASSERT_TRUE(server_->Start(NEGMINE_SERVER_BIN, {"--worker_threads=2"}))
        << "negmine-server did not start";
    client::ClientOptions options;
    options.upsert_chunk_bytes = 64 << 10;  // many messages per upsert stream
    options.timeout = std::chrono::seconds(60);
    client_ = Client::Connect(server_->address(), options).release();
    ASSERT_THAT(client_->WaitForReady(std::chrono::seconds(30)), IsOk());
  }

  static void TearDownTestSuite() {
    delete client_;
    // SIGTERM drains and exits cleanly.
    EXPECT_EQ(server_->Stop(), 0);
    delete server_;
  }

  // Creates `name` and fills it with n random vectors; returns them.
  static std::vector<float> Fill(const std::string& name, int dim, size_t n,
                                 v1::Metric metric, std::vector<uint64_t>* ids,
                                 uint64_t seed = 1) {
    v1::CollectionConfig config;
    config.set_name(name);
    config.set_dim(dim);
    config.set_metric(metric);
    EXPECT_THAT(client_->CreateCollection(config).status(), IsOk());
    std::vector<float> x = RandomVectors(n, dim, seed);
    *ids = Ids(n, 1000);
    auto r = client_->Upsert(name, *ids, x, dim, 3);
    EXPECT_THAT(r.status(), IsOk());
    if (r.ok()) {
      EXPECT_EQ(r->upserted(), n);
      last_version_ = r->index_version();
    }
    return x;
  }

  // The server must still answer a good request after each bad one.
  static void ExpectStillServing() {
    auto r = client_->ListCollections();
    EXPECT_THAT(r.status(), IsOk());
  }

  static testing::ServerProcess* server_;
  static Client* client_;
  static uint64_t last_version_;  // the index version after the last Fill
};

testing::ServerProcess* ServerTest::server_ = nullptr;
Client* ServerTest::client_ = nullptr;
uint64_t ServerTest::last_version_ = 0;

struct Hit {
  double score;
  uint64_t id;
};

std::vector<Hit> BruteForce(const std::vector<float>& x,
                            const std::vector<uint64_t>& ids, const float* q,
                            int dim, const std::set<uint64_t>& excluded) {
  std::vector<Hit> hits;
  for (size_t i = 0; i < ids.size(); ++i) {
    if (!excluded.count(ids[i])) hits.push_back({Dot(q, &x[i * dim], dim), ids[i]});
  }
  std::sort(hits.begin(), hits.end(), [](const Hit& a, const Hit& b) {
    return a.score > b.score || (a.score == b.score && a.id < b.id);
  });
  return hits;
}

TEST_F(ServerTest, ExactTopKEqualsBruteForceWithExclusions) {
  const int dim = 32;
  std::vector<uint64_t> ids;
  const auto x = Fill("topk", dim, 5000, v1::METRIC_INNER_PRODUCT, &ids);
  const size_t nq = 25;
  const auto q = RandomVectors(nq, dim, 2);
  // Exclude each query's true top 2, plus an id that does not exist.
  std::vector<std::vector<uint64_t>> exclude(nq);
  for (size_t i = 0; i < nq; ++i) {
    auto full = BruteForce(x, ids, &q[i * dim], dim, {});
    exclude[i] = {full[0].id, full[1].id, 1};
  }
  v1::MineParams p;
  p.set_k(20);
  auto r = client_->Mine("topk", q, dim, p, exclude);
  ASSERT_THAT(r.status(), IsOk());
  ASSERT_EQ(r->results_size(), static_cast<int>(nq));
  EXPECT_EQ(r->index_version(), last_version_);
  EXPECT_GT(last_version_, 1u) << "5000 rows should take several messages";
  for (size_t i = 0; i < nq; ++i) {
    const std::set<uint64_t> ex(exclude[i].begin(), exclude[i].end());
    const auto want = BruteForce(x, ids, &q[i * dim], dim, ex);
    const v1::QueryNegatives& got = r->results(i);
    ASSERT_EQ(got.ids_size(), 20);
    EXPECT_EQ(got.num_top(), 20u);
    for (int j = 0; j < 20; ++j) {
      EXPECT_EQ(ex.count(got.ids(j)), 0u) << "excluded id returned";
      EXPECT_NEAR(got.scores(j), want[j].score, kScoreTol);
      if (got.ids(j) != want[j].id) {
        // Only a near-tie in the oracle may swap ids.
        ASSERT_LT(j + 1, static_cast<int>(want.size()));
        EXPECT_NEAR(want[j].score, want[j + 1].score, kScoreTol) << "query " << i << " rank " << j;
      }
    }
  }
}

TEST_F(ServerTest, SamplingFrequenciesMatchTheExactSoftmax) {
  const int dim = 8;
  const float tau = 0.5f;
  std::vector<uint64_t> ids;
  auto x = Fill("sample", dim, 50, v1::METRIC_INNER_PRODUCT, &ids, 5);
  // Rescaled copies so the softmax is neither flat nor one-hot.
  for (float& v : x) v *= 0.25f;
  ASSERT_THAT(client_->Upsert("sample", ids, x, dim, 4).status(), IsOk());
  const auto q = RandomVectors(1, dim, 6);
  // 200 copies of the query, 50 draws each with replacement.
  std::vector<float> batch;
  for (int i = 0; i < 200; ++i) batch.insert(batch.end(), q.begin(), q.end());
  v1::MineParams p;
  p.set_mode(v1::MINE_MODE_SAMPLE);
  p.set_k(50);
  p.set_temperature(tau);
  p.set_with_replacement(true);
  p.set_seed(77);
  p.set_return_log_z(true);
  const std::set<uint64_t> ex = {ids[0]};
  std::vector<std::vector<uint64_t>> exclude(200, {ids[0]});
  auto r = client_->Mine("sample", batch, dim, p, exclude);
  ASSERT_THAT(r.status(), IsOk());

  const auto want = BruteForce(x, ids, q.data(), dim, ex);
  std::vector<double> scores;
  std::map<uint64_t, size_t> pos;
  for (size_t i = 0; i < want.size(); ++i) {
    scores.push_back(want[i].score);
    pos[want[i].id] = i;
  }
  const auto probs = Softmax(scores, tau);
  std::vector<int64_t> counts(want.size(), 0);
  for (const v1::QueryNegatives& res : r->results()) {
    ASSERT_EQ(res.ids_size(), 50);
    for (int j = 0; j < res.ids_size(); ++j) {
      ASSERT_TRUE(pos.count(res.ids(j))) << "excluded or unknown id " << res.ids(j);
      const size_t k = pos[res.ids(j)];
      ++counts[k];
      // log q = s/tau - log Z, and log Z is reported exactly.
      EXPECT_NEAR(res.log_q(j), want[k].score / tau - res.log_z_lo(), 1e-3);
    }
    EXPECT_EQ(res.log_z_lo(), res.log_z_hi());
  }
  auto [stat, df] = ChiSquare(counts, probs, 200 * 50);
  EXPECT_LT(stat, ChiSquareCritical(df)) << "df " << df;
}

// A result shorter than k says why: num_eligible counts the live targets a
// query could get (its exclusions left out, before the rank window), in
// both indexes and in every mode.
TEST_F(ServerTest, ShortResultsSayHowManyTargetsWereEligible) {
  const int dim = 8;
  const size_t n = 40;
  for (const char* kind : {"tree", "exact"}) {
    const std::string name = std::string("short-") + kind;
    v1::CollectionConfig config;
    config.set_name(name);
    config.set_dim(dim);
    config.set_metric(v1::METRIC_INNER_PRODUCT);
    config.set_index_kind(std::string(kind) == "exact" ? v1::INDEX_KIND_EXACT : v1::INDEX_KIND_TREE);
    ASSERT_THAT(client_->CreateCollection(config).status(), IsOk());
    const std::vector<uint64_t> ids = Ids(n, 1000);
    ASSERT_THAT(client_->Upsert(name, ids, RandomVectors(n, dim, 21), dim, 0).status(), IsOk());
    const auto q = RandomVectors(2, dim, 22);
    for (v1::MineMode mode : {v1::MINE_MODE_TOP_K, v1::MINE_MODE_SAMPLE}) {
      // The rank window skips all but one target: 1 result of 5.
      v1::MineParams p;
      p.set_mode(mode);
      p.set_k(5);
      p.set_rank_offset(n - 1);
      p.set_seed(3);
      p.set_temperature(0.5f);
      auto r = client_->Mine(name, q, dim, p);
      ASSERT_THAT(r.status(), IsOk());
      for (const v1::QueryNegatives& res : r->results()) {
        EXPECT_EQ(res.ids_size(), 1) << kind;
        EXPECT_EQ(res.num_eligible(), n) << kind;
      }
      // Every target but two excluded (and an unknown id, which counts for
      // nothing): 2 results of 5.
      std::vector<std::vector<uint64_t>> exclude(2, std::vector<uint64_t>(ids.begin() + 2, ids.end()));
      exclude[1].push_back(1);
      p.set_rank_offset(0);
      r = client_->Mine(name, q, dim, p, exclude);
      ASSERT_THAT(r.status(), IsOk());
      for (const v1::QueryNegatives& res : r->results()) {
        EXPECT_EQ(res.ids_size(), 2) << kind;
        EXPECT_EQ(res.num_eligible(), 2u) << kind;
      }
      // A full answer says the same count.
      r = client_->Mine(name, q, dim, p);
      ASSERT_THAT(r.status(), IsOk());
      EXPECT_EQ(r->results(0).ids_size(), 5);
      EXPECT_EQ(r->results(0).num_eligible(), n);
    }
  }
}

// A Mine whose response could not be sent (over max_message_bytes) is
// refused before any work, saying how many queries fit at that k; the
// largest request that fits runs. (It used to be computed in full, then
// failed as "Sent message larger than max".)
TEST_F(ServerTest, AMineWhoseResponseCannotFitIsRefusedUpFront) {
  const int dim = 4;
  std::vector<uint64_t> ids;
  Fill("toolarge", dim, 1000, v1::METRIC_INNER_PRODUCT, &ids);
  v1::MineParams p;
  p.set_k(1000);
  // 64 MiB over (400 + 18 k) bytes a query: 3647 queries fit at k = 1000.
  auto r = client_->Mine("toolarge", RandomVectors(4096, dim, 9), dim, p);
  EXPECT_THAT(r.status(), StatusIs(absl::StatusCode::kInvalidArgument,
                                   AllOf(HasSubstr("max_message_bytes"),
                                         HasSubstr("at most 3647 queries"))));
  p.set_k(10);
  r = client_->Mine("toolarge", RandomVectors(4096, dim, 9), dim, p);
  ASSERT_THAT(r.status(), IsOk());
  EXPECT_EQ(r->results_size(), 4096);
  ExpectStillServing();
}

// The mining controls over the wire: positives are scored and excluded, the
// relative margin uses the lower of two positive scores, the counts add up,
// and bad values name the field.
TEST_F(ServerTest, PositivesAndFiltersOverTheWire) {
  const int dim = 8;
  std::vector<uint64_t> ids;
  const std::vector<float> x = Fill("filters", dim, 2000, v1::METRIC_INNER_PRODUCT, &ids);
  const std::vector<float> q = RandomVectors(3, dim, 77);
  v1::MineRequest req;
  req.set_collection("filters");
  req.mutable_queries()->set_rows(3);
  req.mutable_queries()->set_cols(dim);
  req.mutable_queries()->set_dtype(v1::DTYPE_FLOAT32);
  req.mutable_queries()->set_data(q.data(), q.size() * sizeof(float));
  std::vector<std::vector<Hit>> oracle;
  for (int i = 0; i < 3; ++i) {
    oracle.push_back(BruteForce(x, ids, q.data() + i * dim, dim, {}));
    v1::IdList* pos = req.add_positives();
    pos->add_ids(oracle[i][0].id);
    pos->add_ids(oracle[i][9].id);
  }
  req.mutable_params()->set_k(10);
  req.mutable_params()->mutable_filters()->set_relative_margin(0.1f);
  auto r = client_->Mine(req);
  ASSERT_THAT(r.status(), IsOk());
  for (int i = 0; i < 3; ++i) {
    const v1::QueryNegatives& got = r->results(i);
    ASSERT_EQ(got.positive_scores_size(), 2);
    EXPECT_NEAR(got.positive_scores(0), oracle[i][0].score, 1e-4);
    EXPECT_NEAR(got.positive_scores(1), oracle[i][9].score, 1e-4);
    const double s_pos = oracle[i][9].score;
    const double hi = s_pos - std::abs(s_pos) * 0.1;
    std::vector<uint64_t> want;
    size_t margin = 0;
    for (size_t j = 0; j < oracle[i].size(); ++j) {
      if (j == 0 || j == 9) continue;
      if (oracle[i][j].score > hi) {
        ++margin;
      } else if (want.size() < 10) {
        want.push_back(oracle[i][j].id);
      }
    }
    EXPECT_EQ(std::vector<uint64_t>(got.ids().begin(), got.ids().end()), want);
    EXPECT_EQ(got.removed().positives(), 2u);
    EXPECT_EQ(got.removed().relative_margin(), margin);
    EXPECT_EQ(got.removed().positives() + got.removed().relative_margin() + got.num_eligible(),
              2000u);
    EXPECT_EQ(got.shortfall(), "");
  }
  // A positive not in the collection, and a bad dedupe threshold.
  v1::MineRequest bad = req;
  bad.mutable_positives(1)->set_ids(0, 5);
  EXPECT_THAT(client_->Mine(bad).status(),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("positives[1][0] = 5")));
  bad = req;
  bad.mutable_params()->mutable_filters()->set_dedupe_cosine(0);
  EXPECT_THAT(client_->Mine(bad).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("dedupe_cosine")));
  bad = req;
  bad.clear_positives();
  EXPECT_THAT(client_->Mine(bad).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("positives")));
  ExpectStillServing();
}

TEST_F(ServerTest, AThousandRequestsOnOneStream) {
  const int dim = 16;
  std::vector<uint64_t> ids;
  const auto x = Fill("stream", dim, 2000, v1::METRIC_COSINE, &ids);
  auto session = client_->OpenMineSession("stream");
  v1::MineParams p;
  p.set_k(5);
  const int kRequests = 1000, kDepth = 4;
  int sent = 0, received = 0;
  std::vector<std::vector<float>> queries;
  for (int i = 0; i < kRequests; ++i) queries.push_back(RandomVectors(3, dim, 100 + i));
  auto check = [&](const v1::MineResponse& resp) {
    ASSERT_EQ(resp.request_id(), std::to_string(received + 1)) << "out of order";
    ASSERT_EQ(resp.results_size(), 3);
    EXPECT_EQ(resp.results(0).ids_size(), 5);
    if (received % 250 == 0) {  // spot-check against unary Mine
      auto unary = client_->Mine("stream", queries[received], dim, p);
      ASSERT_THAT(unary.status(), IsOk());
      for (int j = 0; j < 3; ++j) {
        EXPECT_THAT(resp.results(j).ids(),
                    ::testing::ElementsAreArray(unary->results(j).ids()));
      }
    }
    ++received;
  };
  while (received < kRequests) {
    while (sent < kRequests && sent - received < kDepth) {
      ASSERT_THAT(session->Send(queries[sent], dim, p).status(), IsOk());
      ++sent;
    }
    auto resp = session->Receive();
    ASSERT_THAT(resp.status(), IsOk());
    check(*resp);
  }
  EXPECT_THAT(session->Close(), IsOk());
}

TEST_F(ServerTest, AFailedStreamItemCarriesItsStatusAndTheStreamLivesOn) {
  const int dim = 4;
  std::vector<uint64_t> ids;
  Fill("items", dim, 100, v1::METRIC_INNER_PRODUCT, &ids);
  auto session = client_->OpenMineSession("items");
  v1::MineParams good, bad;
  good.set_k(3);
  bad.set_k(0);
  const auto q = RandomVectors(1, dim, 1);
  ASSERT_THAT(session->Send(q, dim, good).status(), IsOk());
  ASSERT_THAT(session->Send(q, dim, bad).status(), IsOk());
  ASSERT_THAT(session->Send(RandomVectors(1, 3, 1), 3, good).status(), IsOk());
  ASSERT_THAT(session->Send(q, dim, good).status(), IsOk());
  EXPECT_THAT(session->Receive().status(), IsOk());
  EXPECT_THAT(session->Receive(),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("params.k = 0")));
  EXPECT_THAT(session->Receive(),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("queries.cols = 3")));
  EXPECT_THAT(session->Receive().status(), IsOk());
  EXPECT_THAT(session->Close(), IsOk());
}

TEST_F(ServerTest, UpsertGetDeleteRoundTrip) {
  const int dim = 3;
  v1::CollectionConfig config;
  config.set_name("roundtrip");
  config.set_dim(dim);
  ASSERT_THAT(client_->CreateCollection(config).status(), IsOk());
  const std::vector<float> x = {0.1f, -2.5f, 3e-7f, 1e30f, -0.0f, 7.0f};
  ASSERT_THAT(client_->Upsert("roundtrip", {5, 9}, x, dim, 11).status(), IsOk());
  auto got = client_->GetTargets("roundtrip", std::vector<uint64_t>{9, 5});
  ASSERT_THAT(got.status(), IsOk());
  std::vector<float> back(6);
  ASSERT_EQ(got->vectors().data().size(), 24u);
  std::memcpy(back.data(), got->vectors().data().data(), 24);
  EXPECT_EQ(std::memcmp(back.data(), x.data() + 3, 12), 0) << "not bit-exact";
  EXPECT_EQ(std::memcmp(back.data() + 3, x.data(), 12), 0) << "not bit-exact";
  EXPECT_THAT(got->model_steps(), ::testing::ElementsAre(11, 11));

  // float16 input is decoded exactly.
  v1::UpsertTargetsRequest req;
  grpc::ClientContext ctx;
  v1::UpsertTargetsResponse resp;
  auto writer = client_->stub().UpsertTargets(&ctx, &resp);
  req.set_collection("roundtrip");
  req.add_ids(20);
  req.mutable_vectors()->set_rows(1);
  req.mutable_vectors()->set_cols(3);
  req.mutable_vectors()->set_dtype(v1::DTYPE_FLOAT16);
  const uint16_t half[3] = {FloatToHalf(1.5f), FloatToHalf(-0.25f), FloatToHalf(2048.0f)};
  req.mutable_vectors()->set_data(reinterpret_cast<const char*>(half), 6);
  ASSERT_TRUE(writer->Write(req));
  writer->WritesDone();
  ASSERT_TRUE(writer->Finish().ok());
  got = client_->GetTargets("roundtrip", std::vector<uint64_t>{20});
  ASSERT_THAT(got.status(), IsOk());
  std::memcpy(back.data(), got->vectors().data().data(), 12);
  EXPECT_EQ(back[0], 1.5f);
  EXPECT_EQ(back[1], -0.25f);
  EXPECT_EQ(back[2], 2048.0f);

  EXPECT_THAT(client_->Delete("roundtrip", std::vector<uint64_t>{5, 6}),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("unknown id 6")));
  auto del = client_->Delete("roundtrip", std::vector<uint64_t>{5, 6}, /*allow_missing=*/true);
  ASSERT_THAT(del.status(), IsOk());
  EXPECT_EQ(del->deleted(), 1u);
  EXPECT_THAT(client_->GetTargets("roundtrip", std::vector<uint64_t>{5}),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("unknown id 5")));
  auto info = client_->GetIndexInfo("roundtrip");
  ASSERT_THAT(info.status(), IsOk());
  EXPECT_EQ(info->info().num_targets(), 2u);
  EXPECT_GT(info->limits().max_k(), 0u);
}

// Every malformed request gets INVALID_ARGUMENT or NOT_FOUND with a message
// naming the field and value, and the server goes on serving.
TEST_F(ServerTest, MalformedRequestsGetClearErrors) {
  const int dim = 8;
  std::vector<uint64_t> ids;
  Fill("bad", dim, 100, v1::METRIC_COSINE, &ids);
  const uint64_t version = last_version_;
  const auto q = RandomVectors(2, dim, 1);
  v1::MineParams p;
  p.set_k(5);
  auto mine = [&](const v1::MineRequest& r) {
    absl::StatusOr<v1::MineResponse> out = client_->Mine(r);
    ExpectStillServing();
    return out;
  };
  v1::MineRequest good;
  client::BuildMineRequest("bad", q, dim, p, {}, &good);
  ASSERT_THAT(mine(good).status(), IsOk());

  // A wrong dim.
  v1::MineRequest r = good;
  client::BuildMineRequest("bad", RandomVectors(2, 6, 1), 6, p, {}, &r);
  EXPECT_THAT(mine(r), StatusIs(absl::StatusCode::kInvalidArgument,
                                HasSubstr("queries.cols = 6 does not match the collection's dim = 8")));
  // NaN and Inf.
  for (float bad_value : {NAN, INFINITY}) {
    std::vector<float> nq = q;
    nq[dim + 2] = bad_value;
    client::BuildMineRequest("bad", nq, dim, p, {}, &r);
    EXPECT_THAT(mine(r), StatusIs(absl::StatusCode::kInvalidArgument,
                                  HasSubstr("queries[1][2] = ")));
  }
  // k = 0 and k larger than the collection.
  for (uint32_t k : {0u, 101u}) {
    r = good;
    r.mutable_params()->set_k(k);
    EXPECT_THAT(mine(r), StatusIs(absl::StatusCode::kInvalidArgument,
                                  HasSubstr(absl::StrCat("params.k = ", k))));
  }
  // A bad dtype, and a byte length that does not match.
  r = good;
  r.mutable_queries()->set_dtype(static_cast<v1::DType>(9));
  EXPECT_THAT(mine(r), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("queries.dtype = 9")));
  r = good;
  r.mutable_queries()->mutable_data()->resize(2 * dim * 4 - 3);
  EXPECT_THAT(mine(r), StatusIs(absl::StatusCode::kInvalidArgument,
                                HasSubstr("queries.data has 61 bytes")));
  // An unknown collection.
  r = good;
  r.set_collection("nope");
  EXPECT_THAT(mine(r), StatusIs(absl::StatusCode::kNotFound, HasSubstr("collection 'nope'")));
  // An empty batch.
  r = good;
  r.mutable_queries()->set_rows(0);
  r.mutable_queries()->clear_data();
  EXPECT_THAT(mine(r), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("queries.rows = 0")));
  // A temperature <= 0.
  for (float tau : {0.0f, -1.0f}) {
    r = good;
    r.mutable_params()->set_mode(v1::MINE_MODE_SAMPLE);
    r.mutable_params()->set_temperature(tau);
    EXPECT_THAT(mine(r), StatusIs(absl::StatusCode::kInvalidArgument,
                                  HasSubstr("params.temperature = ")));
  }
  // Exclusion lists that do not match the batch.
  r = good;
  r.add_exclude();
  EXPECT_THAT(mine(r), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("exclude has 1")));
  // Duplicate ids in one upsert.
  EXPECT_THAT(client_->Upsert("bad", {1, 2, 1}, RandomVectors(3, dim, 3), dim, 0),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("duplicate id 1")));
  // A NaN in an upsert, an empty upsert, a wrong-dim upsert, an unknown collection.
  std::vector<float> nan_vec = RandomVectors(1, dim, 3);
  nan_vec[4] = NAN;
  EXPECT_THAT(client_->Upsert("bad", {1}, nan_vec, dim, 0),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("vectors[0][4] = nan")));
  EXPECT_THAT(client_->Upsert("bad", {}, {}, dim, 0),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("vectors.rows = 0")));
  EXPECT_THAT(client_->Upsert("bad", {1}, RandomVectors(1, 4, 3), 4, 0),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("vectors.cols = 4")));
  EXPECT_THAT(client_->Upsert("nope", {1}, RandomVectors(1, 4, 3), 4, 0),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("collection 'nope'")));
  // Bad collection configs.
  v1::CollectionConfig config;
  config.set_name("bad");
  config.set_dim(8);
  EXPECT_THAT(client_->CreateCollection(config),
              StatusIs(absl::StatusCode::kAlreadyExists, HasSubstr("'bad'")));
  config.set_name("zero-dim");
  config.set_dim(0);
  EXPECT_THAT(client_->CreateCollection(config),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("config.dim = 0")));
  config.set_name("bad name!");
  config.set_dim(8);
  EXPECT_THAT(client_->CreateCollection(config),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("'bad name!'")));
  EXPECT_THAT(client_->DropCollection("nope"),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("'nope'")));
  // Nothing above changed the collection.
  auto info = client_->GetIndexInfo("bad");
  ASSERT_THAT(info.status(), IsOk());
  EXPECT_EQ(info->info().num_targets(), 100u);
  EXPECT_EQ(info->info().index_version(), version);
}

TEST_F(ServerTest, CreateSnapshotWritesOneAndNamesIt) {
  std::vector<uint64_t> ids;
  Fill("snap", 4, 10, v1::METRIC_COSINE, &ids);
  grpc::ClientContext ctx;
  v1::CreateSnapshotRequest req;
  req.set_collection("snap");
  v1::CreateSnapshotResponse resp;
  const grpc::Status s = client_->stub().CreateSnapshot(&ctx, req, &resp);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_THAT(resp.path(), HasSubstr("snapshot-"));
  EXPECT_GT(resp.bytes(), 10u * 4 * sizeof(float));
  EXPECT_EQ(resp.index_version(), last_version_);
  grpc::ClientContext ctx2;
  req.set_collection("nope");
  EXPECT_EQ(client_->stub().CreateSnapshot(&ctx2, req, &resp).error_code(),
            grpc::StatusCode::NOT_FOUND);
  ExpectStillServing();
}

// GCBS over the wire, synchronous and as a job: a partition of the
// examples that beats the streamed (random) order, the same batches both
// ways for the same seed, and the error codes.
TEST_F(ServerTest, AssignBatchesSynchronouslyAndAsAJob) {
  const int dim = 16, n = 3000, b = 32;
  const DriftBench bench({.num_targets = n, .num_queries = 0, .dim = dim, .latent_dim = 8,
                          .hidden_dim = 32, .num_clusters = 30, .seed = 9});
  const std::vector<float> positives = bench.Targets(0);
  std::vector<float> queries = RandomVectors(n, dim, 10);
  for (size_t i = 0; i < queries.size(); ++i) queries[i] = positives[i] + 0.3f * queries[i];
  v1::AssignBatchesRequest first;
  first.set_batch_size(b);
  first.set_seed(4);
  absl::StatusOr<v1::AssignBatchesResponse> sync =
      client_->AssignBatches(first, queries, positives, dim);
  ASSERT_THAT(sync.status(), IsOk());
  EXPECT_EQ(sync->num_examples(), static_cast<uint64_t>(n));
  ASSERT_EQ(sync->batches_size(), (n + b - 1) / b);
  std::vector<int> seen(n, 0);
  for (const v1::Batch& batch : sync->batches()) {
    EXPECT_LE(batch.example_indices_size(), b);
    for (uint64_t i : batch.example_indices()) {
      ASSERT_LT(i, static_cast<uint64_t>(n));
      ++seen[i];
    }
  }
  EXPECT_THAT(seen, ::testing::Each(1));
  EXPECT_GT(sync->in_batch_similarity_after(), 2 * sync->in_batch_similarity_before());
  EXPECT_LT(sync->bandwidth_after(), sync->bandwidth_before());

  first.set_async(true);
  absl::StatusOr<v1::AssignBatchesResponse> started =
      client_->AssignBatches(first, queries, positives, dim);
  ASSERT_THAT(started.status(), IsOk());
  ASSERT_FALSE(started->job_id().empty());
  EXPECT_EQ(started->batches_size(), 0);
  v1::GetBatchJobResponse job;
  for (int i = 0; i < 600; ++i) {  // bounded wait, not a timing assertion
    absl::StatusOr<v1::GetBatchJobResponse> r = client_->GetBatchJob(started->job_id());
    ASSERT_THAT(r.status(), IsOk());
    job = *r;
    if (job.state() != v1::JOB_STATE_RUNNING) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  ASSERT_EQ(job.state(), v1::JOB_STATE_DONE) << job.error().message();
  EXPECT_EQ(job.progress(), 1.0);
  ASSERT_EQ(job.result().batches_size(), sync->batches_size());
  for (int i = 0; i < sync->batches_size(); ++i) {
    EXPECT_THAT(job.result().batches(i).example_indices(),
                ::testing::ElementsAreArray(sync->batches(i).example_indices()));
  }

  EXPECT_THAT(client_->GetBatchJob("batches-999999"),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("batches-999999")));
  v1::AssignBatchesRequest bad;
  EXPECT_THAT(client_->AssignBatches(bad, queries, positives, dim),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("batch_size = 0")));
  bad.set_batch_size(8);
  EXPECT_THAT(client_->AssignBatches(bad, queries,
                                     absl::MakeConstSpan(positives).subspan(0, 10 * dim), dim),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("positives.rows")));
  ExpectStillServing();
}

// Drift over the wire: landmarks, an update, mining over the corrected
// vectors (brute force over GetTargets(scored) as the oracle), the drift
// state in GetIndexInfo, and the error codes.
TEST_F(ServerTest, DriftUpdatesOverTheWire) {
  const int dim = 16, n = 3000;
  const DriftBench bench({.num_targets = n, .num_queries = 8, .dim = dim, .latent_dim = 8,
                          .hidden_dim = 32, .num_clusters = 20, .drift_sigma = 0.03,
                          .seed = 3});
  v1::CollectionConfig config;
  config.set_name("drift");
  config.set_dim(dim);
  config.set_metric(v1::METRIC_COSINE);
  config.mutable_drift()->set_num_landmarks(64);
  ASSERT_THAT(client_->CreateCollection(config).status(), IsOk());
  std::vector<uint64_t> ids(n);
  std::iota(ids.begin(), ids.end(), 0);
  ASSERT_THAT(client_->Upsert("drift", ids, bench.Targets(0), dim, 0).status(), IsOk());

  absl::StatusOr<v1::GetLandmarksResponse> lm = client_->GetLandmarks("drift");
  ASSERT_THAT(lm.status(), IsOk());
  ASSERT_EQ(lm->ids_size(), 64);
  const std::vector<size_t> rows(lm->ids().begin(), lm->ids().end());
  const std::vector<float> g = bench.EncodeTargets(10, rows);
  absl::StatusOr<v1::ApplyDriftResponse> r =
      client_->ApplyDrift("drift", 10, lm->landmark_epoch(), g, dim);
  ASSERT_THAT(r.status(), IsOk());
  EXPECT_LT(r->heldout_residual(), r->stale_residual());
  EXPECT_NE(r->kernel(), "none");
  EXPECT_FALSE(r->rebased());
  EXPECT_EQ(r->landmark_epoch(), lm->landmark_epoch());

  // Mining serves the corrected vectors.
  absl::StatusOr<v1::GetTargetsResponse> scored = client_->GetTargets("drift", ids, true);
  ASSERT_THAT(scored.status(), IsOk());
  std::vector<float> x(n * dim);
  std::memcpy(x.data(), scored->vectors().data().data(), x.size() * sizeof(float));
  const std::vector<float> queries = bench.Queries(10);
  v1::MineParams params;
  params.set_k(10);
  absl::StatusOr<v1::MineResponse> mined = client_->Mine("drift", queries, dim, params);
  ASSERT_THAT(mined.status(), IsOk());
  EXPECT_EQ(mined->index_version(), r->index_version());
  for (int qi = 0; qi < 8; ++qi) {
    const float* q = &queries[qi * dim];
    const double qn = std::sqrt(Dot(q, q, dim));
    std::vector<double> s(n);
    for (int i = 0; i < n; ++i) s[i] = Dot(q, &x[i * dim], dim) / qn;
    std::sort(s.rbegin(), s.rend());
    for (int j = 0; j < 10; ++j) EXPECT_NEAR(mined->results(qi).scores(j), s[j], kScoreTol);
  }

  absl::StatusOr<v1::GetIndexInfoResponse> info = client_->GetIndexInfo("drift");
  ASSERT_THAT(info.status(), IsOk());
  const v1::DriftInfo& d = info->info().drift();
  EXPECT_TRUE(d.active());
  EXPECT_EQ(d.model_step(), 10);
  EXPECT_EQ(d.updates(), 1u);
  EXPECT_EQ(d.num_landmarks(), 64u);
  EXPECT_EQ(d.kernel(), r->kernel());
  EXPECT_THAT(d.staleness_histogram(), ::testing::ElementsAre(0, 0, n, 0, 0));
  EXPECT_EQ(info->info().config().drift().num_landmarks(), 64u);

  // Errors: each with its code, and nothing changes.
  EXPECT_THAT(client_->ApplyDrift("drift", 5, lm->landmark_epoch(), g, dim),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("backwards")));
  EXPECT_THAT(client_->ApplyDrift("drift", 11, lm->landmark_epoch() + 1, g, dim),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("GetLandmarks")));
  EXPECT_THAT(client_->ApplyDrift("drift", 11, lm->landmark_epoch(),
                                  absl::MakeConstSpan(g).subspan(0, 63 * dim), dim),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("63 rows")));
  EXPECT_THAT(client_->ApplyDrift("nope", 11, 1, g, dim),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("nope")));
  EXPECT_THAT(client_->ApplyLinearMap("drift", 11, std::vector<float>(2 * dim, 1.0f), {}, dim),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("dim x dim")));
  {
    grpc::ClientContext ctx;
    v1::ApplyDriftRequest req;
    req.set_collection("drift");
    req.set_model_step(11);
    v1::ApplyDriftResponse resp;
    const grpc::Status s = client_->stub().ApplyDrift(&ctx, req, &resp);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_THAT(s.error_message(), HasSubstr("landmark_embeddings or linear_map"));
  }
  EXPECT_EQ(client_->GetIndexInfo("drift")->info().index_version(), r->index_version());

  // An exact linear map (identity here) re-bases: a new landmark set.
  std::vector<float> eye(dim * dim, 0.0f);
  for (int i = 0; i < dim; ++i) eye[i * dim + i] = 1;
  absl::StatusOr<v1::ApplyDriftResponse> lin = client_->ApplyLinearMap("drift", 12, eye, {}, dim);
  ASSERT_THAT(lin.status(), IsOk());
  EXPECT_TRUE(lin->rebased());
  EXPECT_EQ(lin->landmark_epoch(), lm->landmark_epoch() + 1);
  EXPECT_EQ(client_->GetLandmarks("drift")->landmark_epoch(), lm->landmark_epoch() + 1);
  ExpectStillServing();
}

TEST_F(ServerTest, ReadYourWritesWithMinIndexVersion) {
  std::vector<uint64_t> ids;
  const auto x = Fill("ryw", 4, 10, v1::METRIC_INNER_PRODUCT, &ids);
  v1::MineRequest r;
  v1::MineParams p;
  p.set_k(1);
  client::BuildMineRequest("ryw", RandomVectors(1, 4, 1), 4, p, {}, &r);
  r.set_min_index_version(last_version_);
  EXPECT_THAT(client_->Mine(r).status(), IsOk());
  r.set_min_index_version(last_version_ + 1);
  EXPECT_THAT(client_->Mine(r), StatusIs(absl::StatusCode::kFailedPrecondition,
                                         HasSubstr("min_index_version = ")));
}

// backend = CUDA where there is none: refused by default (FAILED_PRECONDITION
// without a GPU, UNIMPLEMENTED without a CUDA build), served on the CPU with
// --allow_cpu_fallback, also after a restart (recovery replays the create).
TEST(ServerBackendTest, CudaCollectionsFallBackToTheCpuOnlyWhenAllowed) {
  if (CudaBuilt() && CudaDeviceCount() > 0) GTEST_SKIP() << "a GPU is visible here";
  v1::CollectionConfig config;
  config.set_name("gpu");
  config.set_dim(8);
  config.set_backend(v1::BACKEND_CUDA);
  {
    testing::ServerProcess server;
    ASSERT_TRUE(server.Start(NEGMINE_SERVER_BIN));
    auto c = client::Client::Connect(server.address());
    ASSERT_THAT(c->WaitForReady(std::chrono::seconds(30)), ::negmine::testing::IsOk());
    EXPECT_THAT(c->CreateCollection(config),
                ::negmine::testing::StatusIs(CudaBuilt() ? absl::StatusCode::kFailedPrecondition
                                                         : absl::StatusCode::kUnimplemented,
                                             HasSubstr("cuda")));
    EXPECT_EQ(server.Stop(), 0);
  }
  testing::ServerProcess server;
  ASSERT_TRUE(server.Start(NEGMINE_SERVER_BIN, {"--allow_cpu_fallback"}));
  {
    auto c = client::Client::Connect(server.address());
    ASSERT_THAT(c->WaitForReady(std::chrono::seconds(30)), ::negmine::testing::IsOk());
    absl::StatusOr<v1::CollectionInfo> info = c->CreateCollection(config);
    ASSERT_THAT(info, ::negmine::testing::IsOk());
    EXPECT_EQ(info->active_backend(), v1::BACKEND_CPU);
    std::vector<float> x = RandomVectors(50, 8, 3);
    ASSERT_THAT(c->Upsert("gpu", Ids(50, 1), x, 8, 0).status(), ::negmine::testing::IsOk());
  }
  // The same data dir recovers with the flag.
  ASSERT_TRUE(server.Restart(NEGMINE_SERVER_BIN, {"--allow_cpu_fallback"}));
  auto c = client::Client::Connect(server.address());
  ASSERT_THAT(c->WaitForReady(std::chrono::seconds(30)), ::negmine::testing::IsOk());
  absl::StatusOr<v1::GetIndexInfoResponse> info = c->GetIndexInfo("gpu");
  ASSERT_THAT(info, ::negmine::testing::IsOk());
  EXPECT_EQ(info->info().num_targets(), 50u);
  EXPECT_EQ(info->info().active_backend(), v1::BACKEND_CPU);
}

}  // namespace
}  // namespace negmine

namespace negmine {
namespace {

// SIGTERM while a call is in flight: that call still completes, the server
// then refuses new work and exits 0.
TEST(ServerLifecycleTest, SigtermLetsInFlightCallsFinish) {
  testing::ServerProcess server;
  ASSERT_TRUE(server.Start(NEGMINE_SERVER_BIN,
                           {"--default_dim=64", "--generate_targets=200000", "--default_index=exact",
                            "--shutdown_grace_seconds=300",
                            "--worker_threads=1"}));
  auto c = client::Client::Connect(server.address());
  ASSERT_THAT(c->WaitForReady(std::chrono::seconds(30)), ::negmine::testing::IsOk());
  // A batch big enough to be in flight when the signal lands.
  std::vector<float> q(4096 * 64);
  Rng rng(1, 1);
  for (float& v : q) v = static_cast<float>(rng.Normal());
  v1::MineParams p;
  p.set_k(32);
  absl::StatusOr<v1::MineResponse> result;
  std::thread call([&] { result = c->Mine("", q, 64, p); });
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  kill(server.pid(), SIGTERM);
  call.join();
  ASSERT_THAT(result.status(), ::negmine::testing::IsOk());
  EXPECT_EQ(result->results_size(), 4096);
  EXPECT_EQ(server.Wait(), 0);
}

}  // namespace
}  // namespace negmine
