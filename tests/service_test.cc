// NegativeMinerService in process, over a real gRPC server on loopback:
//   - a drift update in flight, with a write queued behind it, holds no
//     thread that serves Mine (the order of events is what is checked: the
//     update is held open by a gate in the index until the Mine returned);
//   - the request metrics carry the collection and the mine mode, and the
//     collection label folds into "other" past its cap;
//   - negmine_build_info says what was built.
#include <atomic>
#include <chrono>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "absl/synchronization/notification.h"
#include "core/cuda/device.h"
#include "core/index.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "negmine/v1/negmine.grpc.pb.h"
#include "server/metrics.h"
#include "server/service.h"
#include "server/wire.h"
#include "tests/metrics_util.h"
#include "tests/test_util.h"

namespace negmine::server {
namespace {

using ::negmine::testing::IsOk;
using ::negmine::testing::MetricValue;

constexpr int kDim = 8;
constexpr int kTargets = 300;

// Holds every ApplyDrift of the index it wraps until Release(): the test
// then knows that a drift update is in flight, for as long as it wants.
struct DriftGate {
  absl::Notification entered;
  absl::Notification released;
  std::atomic<int> upserts{0};
};

// A real index whose ApplyDrift waits at the gate; everything else is the
// wrapped index's.
class GatedIndex final : public Index {
 public:
  GatedIndex(std::unique_ptr<Index> inner, DriftGate* gate)
      : inner_(std::move(inner)), gate_(gate) {}
  const IndexOptions& options() const override { return inner_->options(); }
  Backend active_backend() const override { return inner_->active_backend(); }
  IndexStats Stats() const override { return inner_->Stats(); }
  std::optional<TreeSummary> TreeInfo() const override { return inner_->TreeInfo(); }
  absl::Status Upsert(absl::Span<const uint64_t> ids, absl::Span<const float> vectors,
                      int64_t model_step) override {
    gate_->upserts.fetch_add(1);
    return inner_->Upsert(ids, vectors, model_step);
  }
  absl::StatusOr<size_t> Delete(absl::Span<const uint64_t> ids, bool allow_missing) override {
    return inner_->Delete(ids, allow_missing);
  }
  absl::Status Get(absl::Span<const uint64_t> ids, std::vector<float>* vectors,
                   std::vector<int64_t>* steps) const override {
    return inner_->Get(ids, vectors, steps);
  }
  absl::Status GetScored(absl::Span<const uint64_t> ids,
                         std::vector<float>* vectors) const override {
    return inner_->GetScored(ids, vectors);
  }
  absl::StatusOr<LandmarkSet> GetLandmarks() override { return inner_->GetLandmarks(); }
  absl::StatusOr<DriftReport> ApplyDrift(const DriftUpdate& update) override {
    gate_->entered.Notify();
    gate_->released.WaitForNotification();
    return inner_->ApplyDrift(update);
  }
  DriftSummary DriftInfo() const override { return inner_->DriftInfo(); }
  absl::StatusOr<std::string> Snapshot() const override { return inner_->Snapshot(); }
  absl::Status Restore(std::string_view snapshot) override { return inner_->Restore(snapshot); }
  absl::StatusOr<SearchResult> Search(absl::Span<const float> queries,
                                      absl::Span<const std::vector<uint64_t>> exclude,
                                      const SearchParams& params) const override {
    return inner_->Search(queries, exclude, params);
  }

 private:
  std::unique_ptr<Index> inner_;
  DriftGate* gate_;
};

v1::Matrix Matrix(const std::vector<float>& v, uint32_t rows) {
  v1::Matrix m;
  EncodeMatrix(v, rows, kDim, &m);
  return m;
}

class ServiceTest : public ::testing::TestWithParam<int> {
 protected:
  void SetUp() override {
    ServiceOptions options{.worker_threads = GetParam(),
                           .stats_interval_seconds = 0,
                           .snapshot_interval_seconds = 0,
                           .snapshot_wal_bytes = 0};
    options.index_factory =
        [this](const IndexOptions& o) -> absl::StatusOr<std::unique_ptr<Index>> {
      absl::StatusOr<std::unique_ptr<Index>> inner = CreateIndex(o);
      if (!inner.ok()) return inner.status();
      return std::make_unique<GatedIndex>(*std::move(inner), &gate_);
    };
    service_ = std::make_unique<NegativeMinerService>(options, &metrics_);
    service_->SetReady(true);
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(service_.get());
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    ASSERT_NE(port, 0);
    stub_ = v1::NegativeMiner::NewStub(grpc::CreateChannel(
        "127.0.0.1:" + std::to_string(port), grpc::InsecureChannelCredentials()));
  }

  void TearDown() override {
    if (!gate_.released.HasBeenNotified()) gate_.released.Notify();
    server_->Shutdown();
    server_.reset();
    service_.reset();
  }

  std::unique_ptr<grpc::ClientContext> Context(int seconds = 120) {
    auto ctx = std::make_unique<grpc::ClientContext>();
    ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(seconds));
    return ctx;
  }

  void CreateCollection(const std::string& name) {
    v1::CreateCollectionRequest req;
    req.mutable_config()->set_name(name);
    req.mutable_config()->set_dim(kDim);
    req.mutable_config()->set_index_kind(v1::INDEX_KIND_EXACT);
    req.mutable_config()->set_backend(v1::BACKEND_CPU);
    v1::CreateCollectionResponse resp;
    ASSERT_TRUE(stub_->CreateCollection(Context().get(), req, &resp).ok());
  }

  grpc::Status Upsert(const std::string& collection, uint64_t first, int n, uint64_t seed) {
    std::vector<float> v = testing::RandomVectors(n, kDim, seed);
    v1::UpsertTargetsRequest req;
    req.set_collection(collection);
    for (int i = 0; i < n; ++i) req.add_ids(first + i);
    *req.mutable_vectors() = Matrix(v, n);
    v1::UpsertTargetsResponse resp;
    auto ctx = Context();
    auto writer = stub_->UpsertTargets(ctx.get(), &resp);
    writer->Write(req);
    writer->WritesDone();
    return writer->Finish();
  }

  grpc::Status Mine(const std::string& collection, v1::MineParams params,
                    v1::MineResponse* resp) {
    v1::MineRequest req;
    req.set_collection(collection);
    *req.mutable_queries() = Matrix(testing::RandomVectors(4, kDim, 77), 4);
    *req.mutable_params() = params;
    return stub_->Mine(Context().get(), req, resp);
  }

  bool Visible(const std::string& collection, uint64_t id) {
    v1::GetTargetsRequest req;
    req.set_collection(collection);
    req.add_ids(id);
    v1::GetTargetsResponse resp;
    return stub_->GetTargets(Context().get(), req, &resp).ok();
  }

  DriftGate gate_;
  Metrics metrics_;
  std::unique_ptr<NegativeMinerService> service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<v1::NegativeMiner::Stub> stub_;
};

// A drift update is held in flight, an upsert is queued behind it (waiting
// in the commit path), and then a Mine is sent: it is answered, with the
// update still in flight and the upsert still unapplied. With one worker
// thread, a drift update run on the request workers would hold the Mine
// until its deadline.
TEST_P(ServiceTest, MineIsAnsweredWhileADriftUpdateIsInFlightWithAWriteQueued) {
  CreateCollection("c");
  ASSERT_TRUE(Upsert("c", 0, kTargets, 1).ok());
  v1::GetLandmarksRequest lm_req;
  lm_req.set_collection("c");
  v1::GetLandmarksResponse landmarks;
  ASSERT_TRUE(stub_->GetLandmarks(Context().get(), lm_req, &landmarks).ok());
  ASSERT_GT(landmarks.ids_size(), 0);

  // The landmarks re-encoded: their stored vectors, slightly moved.
  v1::GetTargetsRequest get;
  get.set_collection("c");
  *get.mutable_ids() = landmarks.ids();
  v1::GetTargetsResponse stored;
  ASSERT_TRUE(stub_->GetTargets(Context().get(), get, &stored).ok());
  std::vector<float> moved(stored.vectors().data().size() / sizeof(float));
  std::memcpy(moved.data(), stored.vectors().data().data(), moved.size() * sizeof(float));
  for (size_t i = 0; i < moved.size(); ++i) moved[i] += 0.01f * ((i % 7) - 3.0f);
  v1::ApplyDriftRequest drift;
  drift.set_collection("c");
  drift.set_model_step(10);
  drift.set_landmark_epoch(landmarks.landmark_epoch());
  *drift.mutable_landmark_embeddings() = Matrix(moved, landmarks.ids_size());

  grpc::Status drift_status;
  v1::ApplyDriftResponse drift_resp;
  std::thread drift_thread([&] {
    drift_status = stub_->ApplyDrift(Context().get(), drift, &drift_resp);
  });
  ASSERT_TRUE(gate_.entered.WaitForNotificationWithTimeout(absl::Seconds(120)))
      << "the drift update never reached the index";

  const int upserts_before = gate_.upserts.load();
  grpc::Status upsert_status;
  std::thread upsert_thread([&] { upsert_status = Upsert("c", 100000, 5, 2); });
  // Wait (bounded) until the upsert is queued in the commit path, behind the
  // drift update.
  for (int i = 0; i < 120000 && service_->commits().waiting() < 1; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  ASSERT_GE(service_->commits().waiting(), 1) << "the upsert never queued behind the update";

  v1::MineParams params;
  params.set_mode(v1::MINE_MODE_TOP_K);
  params.set_k(5);
  v1::MineResponse mined;
  const grpc::Status mine_status = Mine("c", params, &mined);
  ASSERT_TRUE(mine_status.ok()) << mine_status.error_message();
  EXPECT_EQ(mined.results_size(), 4);
  for (const v1::QueryNegatives& q : mined.results()) EXPECT_EQ(q.ids_size(), 5);

  // Ordering: the Mine was answered while the update was still held and
  // the upsert had not reached the index.
  EXPECT_FALSE(gate_.released.HasBeenNotified());
  EXPECT_EQ(gate_.upserts.load(), upserts_before);
  EXPECT_FALSE(Visible("c", 100000));

  gate_.released.Notify();
  drift_thread.join();
  upsert_thread.join();
  EXPECT_TRUE(drift_status.ok()) << drift_status.error_message();
  EXPECT_TRUE(upsert_status.ok()) << upsert_status.error_message();
  EXPECT_TRUE(Visible("c", 100000));
  EXPECT_EQ(service_->commits().waiting(), 0);
}

// Requests are labelled by collection and mine mode: a top-k Mine and a
// sampling Mine with log Z land in different series.
TEST_P(ServiceTest, RequestMetricsCarryTheCollectionAndTheMineMode) {
  CreateCollection("alpha");
  ASSERT_TRUE(Upsert("alpha", 0, kTargets, 3).ok());
  v1::MineParams top;
  top.set_mode(v1::MINE_MODE_TOP_K);
  top.set_k(3);
  v1::MineResponse resp;
  ASSERT_TRUE(Mine("alpha", top, &resp).ok());
  ASSERT_TRUE(Mine("alpha", top, &resp).ok());
  v1::MineParams sample;
  sample.set_mode(v1::MINE_MODE_SAMPLE);
  sample.set_k(3);
  sample.set_temperature(0.5);
  sample.set_return_log_z(true);
  sample.set_seed(5);
  ASSERT_TRUE(Mine("alpha", sample, &resp).ok());
  // A collection that does not exist gets no collection label.
  EXPECT_EQ(Mine("nope", top, &resp).error_code(), grpc::StatusCode::NOT_FOUND);

  const std::string kLatency = "negmine_request_duration_seconds";
  EXPECT_EQ(MetricValue(metrics_, kLatency,
                        {{"method", "Mine"}, {"collection", "alpha"}, {"mode", "top_k"},
                         {"code", "OK"}}),
            2);
  EXPECT_EQ(MetricValue(metrics_, kLatency,
                        {{"method", "Mine"}, {"collection", "alpha"}, {"mode", "sample_log_z"},
                         {"code", "OK"}}),
            1);
  EXPECT_EQ(MetricValue(metrics_, "negmine_requests_total",
                        {{"method", "Mine"}, {"collection", ""}, {"code", "NOT_FOUND"}}),
            1);
  EXPECT_EQ(MetricValue(metrics_, "negmine_requests_total",
                        {{"method", "UpsertTargets"}, {"collection", "alpha"}, {"code", "OK"}}),
            1);
}

INSTANTIATE_TEST_SUITE_P(WorkerThreads, ServiceTest, ::testing::Values(1, 2));

// Past kMaxCollectionLabels distinct collections, the rest share "other".
TEST(MetricsTest, CollectionLabelsAreCapped) {
  Metrics metrics;
  const size_t n = Metrics::kMaxCollectionLabels + 8;
  for (size_t i = 0; i < n; ++i) {
    metrics.ObserveRequest("Mine", "OK", 0.001, {.collection = "c" + std::to_string(i)});
  }
  for (size_t i = 0; i < Metrics::kMaxCollectionLabels; ++i) {
    EXPECT_EQ(MetricValue(metrics, "negmine_requests_total",
                          {{"collection", "c" + std::to_string(i)}}),
              1)
        << i;
  }
  EXPECT_EQ(MetricValue(metrics, "negmine_requests_total",
                        {{"collection", "c" + std::to_string(n - 1)}}),
            -1);
  EXPECT_EQ(MetricValue(metrics, "negmine_requests_total", {{"collection", "other"}}), 8);
}

TEST(MetricsTest, BuildInfoNamesTheVersionCommitAndBackends) {
  Metrics metrics;
  const BuildInfo build = GetBuildInfo();
  EXPECT_FALSE(build.version.empty());
  EXPECT_NE(build.version, "unknown");
  EXPECT_FALSE(build.commit.empty());
  EXPECT_EQ(build.backends, CudaBuilt() ? "cpu,cuda" : "cpu");
  EXPECT_EQ(MetricValue(metrics, "negmine_build_info",
                        {{"version", build.version},
                         {"commit", build.commit},
                         {"backends", build.backends}}),
            1);
}

}  // namespace
}  // namespace negmine::server
