// The negmine C++ client.
//
//   ASSIGN_OR_RETURN(auto client, negmine::client::Client::Connect("127.0.0.1:50051"));
//   v1::CollectionConfig config;
//   config.set_name("docs"); config.set_dim(128);
//   config.set_metric(v1::METRIC_COSINE);
//   RETURN_IF_ERROR(client->CreateCollection(config).status());
//   RETURN_IF_ERROR(client->Upsert("docs", ids, vectors, 128, /*model_step=*/0).status());
//
//   v1::MineParams params;
//   params.set_mode(v1::MINE_MODE_SAMPLE); params.set_k(64);
//   params.set_temperature(0.05f);
//   ASSIGN_OR_RETURN(v1::MineResponse r, client->Mine("docs", queries, 128, params));
//
// Controls against false negatives are MineParams too (filters,
// distribution, simans), with each query's positives beside the queries:
//
//   params.mutable_filters()->set_relative_margin(0.05f);  // unset: off
//   std::vector<std::vector<uint64_t>> positives = {{17}, {4, 9}};  // per query
//   ASSIGN_OR_RETURN(r, client->Mine("docs", queries, 128, params, /*exclude=*/{},
//                                    positives));
//   // r.results(i): positive_scores (request order), removed (FilterCounts:
//   // why targets were not eligible), shortfall (why fewer than k came back).
//
// From a training loop, a MineSession keeps one stream open and pipelines:
//
//   auto session = client->OpenMineSession("docs");
//   session->Send(batch_0, 128, params);
//   for (int step = 0; ...; ++step) {
//     session->Send(batch_{step+1}, 128, params);   // the server starts on it
//     ASSIGN_OR_RETURN(v1::MineResponse r, session->Receive());  // batch_step
//     ...train on r...
//   }
//   RETURN_IF_ERROR(session->Close());
//
// Errors are absl::Status with the server's canonical code and message,
// prefixed with the RPC name.
//
// Thread safety: a Client may be shared by threads. A MineSession is used by
// one thread (or one sender and one receiver thread).
#ifndef NEGMINE_CLIENT_NEGMINE_CLIENT_H_
#define NEGMINE_CLIENT_NEGMINE_CLIENT_H_

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "negmine/v1/negmine.grpc.pb.h"

namespace negmine::client {

namespace v1 = ::negmine::v1;

struct ClientOptions {
  // Upsert streams are cut into messages of about this many bytes.
  size_t upsert_chunk_bytes = 4 << 20;
  // Largest message the client accepts (responses of big batches).
  int max_receive_message_bytes = 256 << 20;
  // Deadline of each unary call; 0 = none.
  std::chrono::milliseconds timeout{0};
  // TLS: the PEM CA bundle that signed the server's certificate (the
  // contents, not a path). Empty, with no client certificate: plaintext.
  std::string tls_root_certs;
  // mTLS: this client's PEM certificate chain and private key.
  std::string tls_cert_chain, tls_private_key;
  // Sent as "authorization: Bearer <auth_token>" on every call; empty: none.
  std::string auth_token;
  // A call answered UNAVAILABLE (the server is starting or recovering its
  // data dir, or not reachable yet) is retried by gRPC's retry policy, set
  // in the channel's service config for every NegativeMiner method: at most
  // retry_max_attempts attempts in all (gRPC caps it at 5; 1 turns retries
  // off), the n-th retry after a random wait in [0, min(initial * m^(n-1),
  // max)], and never past the call's deadline. With the defaults the waits
  // add up to at most 16.5 s; to wait longer for a recovery, call
  // WaitForServing first. A streaming call is retried only until it has
  // sent more than gRPC's retry buffer (256 KiB) or received a response.
  int retry_max_attempts = 5;
  std::chrono::milliseconds retry_initial_backoff{500};
  std::chrono::milliseconds retry_max_backoff{10000};
  double retry_backoff_multiplier = 3;
};

// The channel's service config for `options`: the retry policy above.
std::string RetryServiceConfig(const ClientOptions& options);

// grpc::Status -> absl::Status, with `rpc` prefixed to the message.
absl::Status FromGrpc(const grpc::Status& status, const char* rpc);

// Fills a MineRequest: queries are n x dim float32 (row-major); `exclude`
// and `positives` are each empty or one id list per query. Positives are
// always excluded, scored and returned (QueryNegatives.positive_scores); the
// margins and SimANS use each query's lowest positive score.
void BuildMineRequest(const std::string& collection,
                      absl::Span<const float> queries, uint32_t dim,
                      const v1::MineParams& params,
                      absl::Span<const std::vector<uint64_t>> exclude,
                      v1::MineRequest* request,
                      absl::Span<const std::vector<uint64_t>> positives = {});

class MineSession;

// Called after each message of a streaming upload with the rows sent so far
// and the total (from the calling thread).
using SendProgress = std::function<void(size_t sent, size_t total)>;

class Client {
 public:
  // Connects to `target` ("host:port"), insecure. Does not wait for the
  // server; the first call does.
  static std::unique_ptr<Client> Connect(const std::string& target,
                                         const ClientOptions& options = {});

  // A Client over this one's channel with other per-call options (chunk
  // sizes, timeout, token); the channel's own (TLS, message limits,
  // retries) stay this one's.
  std::unique_ptr<Client> WithOptions(const ClientOptions& options) const {
    return std::unique_ptr<Client>(new Client(channel_, options));
  }

  // Waits until the channel is ready, up to `timeout`.
  absl::Status WaitForReady(std::chrono::milliseconds timeout);

  // Waits until grpc.health.v1 says SERVING (the data dir recovered and the
  // indexes loaded), up to `timeout`: a Health/Watch stream that waits for
  // the connection too (wait_for_ready), so the server may not be up yet.
  // DEADLINE_EXCEEDED with the last status seen when it is not SERVING in
  // time.
  absl::Status WaitForServing(std::chrono::milliseconds timeout);

  absl::StatusOr<v1::CollectionInfo> CreateCollection(
      const v1::CollectionConfig& config);
  absl::StatusOr<std::vector<v1::CollectionInfo>> ListCollections();
  absl::Status DropCollection(const std::string& collection);

  // Streams ids.size() x dim float32 vectors in chunks of about
  // upsert_chunk_bytes. Each chunk is applied as a whole; on error, the
  // status says how many chunks were applied.
  absl::StatusOr<v1::UpsertTargetsResponse> Upsert(
      const std::string& collection, absl::Span<const uint64_t> ids,
      absl::Span<const float> vectors, uint32_t dim, int64_t model_step,
      const SendProgress& progress = nullptr);
  absl::StatusOr<v1::DeleteTargetsResponse> Delete(
      const std::string& collection, absl::Span<const uint64_t> ids,
      bool allow_missing = false);
  // The stored vectors, or with `scored` the ones the index scores with
  // (drift-corrected, unit length for cosine).
  absl::StatusOr<v1::GetTargetsResponse> GetTargets(
      const std::string& collection, absl::Span<const uint64_t> ids,
      bool scored = false);

  // Drift correction, per trainer step: GetLandmarks, re-encode those ids
  // with the current model, ApplyDrift with the set's epoch.
  absl::StatusOr<v1::GetLandmarksResponse> GetLandmarks(const std::string& collection);
  // `embeddings`: the landmarks re-encoded, ids.size() x dim, in order.
  absl::StatusOr<v1::ApplyDriftResponse> ApplyDrift(
      const std::string& collection, int64_t model_step, uint64_t landmark_epoch,
      absl::Span<const float> embeddings, uint32_t dim);
  // An exact linear map new = a old + b: a is dim x dim, b dim or empty.
  absl::StatusOr<v1::ApplyDriftResponse> ApplyLinearMap(
      const std::string& collection, int64_t model_step, absl::Span<const float> a,
      absl::Span<const float> b, uint32_t dim);

  // Mines n = queries.size() / dim queries; `exclude` and `positives` as in
  // BuildMineRequest. Each result carries its positives' scores, the
  // FilterCounts of the targets that were not eligible, and a shortfall
  // text when it holds fewer than params.k() results. An unknown positive
  // id is NOT_FOUND.
  absl::StatusOr<v1::MineResponse> Mine(
      const std::string& collection, absl::Span<const float> queries,
      uint32_t dim, const v1::MineParams& params,
      absl::Span<const std::vector<uint64_t>> exclude = {},
      absl::Span<const std::vector<uint64_t>> positives = {});
  absl::StatusOr<v1::MineResponse> Mine(const v1::MineRequest& request);

  // GCBS: streams n examples (queries and positives, n x dim each) in chunks
  // of about upsert_chunk_bytes. `first` carries the batch size, seed,
  // params and async flag (its matrices are ignored). Synchronous: the
  // response holds the batches; async: its job_id, for GetBatchJob.
  absl::StatusOr<v1::AssignBatchesResponse> AssignBatches(
      const v1::AssignBatchesRequest& first, absl::Span<const float> queries,
      absl::Span<const float> positives, uint32_t dim,
      const SendProgress& progress = nullptr);
  absl::StatusOr<v1::GetBatchJobResponse> GetBatchJob(const std::string& job_id);

  // Writes a snapshot of every collection (the response's index_version is
  // `collection`'s, when named).
  absl::StatusOr<v1::CreateSnapshotResponse> CreateSnapshot(const std::string& collection = "");

  // Opens a MineStream.
  std::unique_ptr<MineSession> OpenMineSession(const std::string& collection);

  absl::StatusOr<v1::GetIndexInfoResponse> GetIndexInfo(
      const std::string& collection);

  const ClientOptions& options() const { return options_; }
  v1::NegativeMiner::Stub& stub() { return *stub_; }
  const std::shared_ptr<grpc::Channel>& channel() const { return channel_; }

 private:
  Client(std::shared_ptr<grpc::Channel> channel, const ClientOptions& options);
  // The deadline (unless `deadline` is false) and the bearer token.
  void Prepare(grpc::ClientContext* ctx, bool deadline = true) const;
  absl::StatusOr<v1::ApplyDriftResponse> CallApplyDrift(
      const std::string& collection, int64_t model_step, v1::ApplyDriftRequest* req);

  ClientOptions options_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::NegativeMiner::Stub> stub_;
};

// One open MineStream. Responses come back in the order of Send calls.
class MineSession {
 public:
  ~MineSession();

  // Sends one request (n x dim queries). Returns UNAVAILABLE if the stream
  // broke; Close() then says why. Returns the request_id used ("1", "2", ...
  // in order) so that responses can be matched if wanted.
  absl::StatusOr<std::string> Send(absl::Span<const float> queries, uint32_t dim,
                                   const v1::MineParams& params,
                                   absl::Span<const std::vector<uint64_t>> exclude = {},
                                   absl::Span<const std::vector<uint64_t>> positives = {});
  // Sends a prepared request as is (its collection is overwritten).
  absl::Status Send(v1::MineRequest request);

  // The next response. A failed item comes back as its status (code and
  // message of the server's per-item status); the stream goes on.
  absl::StatusOr<v1::MineResponse> Receive();

  // Half-closes, drains unread responses, and returns the stream's status.
  absl::Status Close();

 private:
  friend class Client;
  MineSession(v1::NegativeMiner::Stub* stub, std::string collection,
              const std::string& auth_token);

  std::string collection_;
  grpc::ClientContext ctx_;
  std::unique_ptr<grpc::ClientReaderWriter<v1::MineRequest, v1::MineResponse>> stream_;
  uint64_t next_id_ = 1;
  bool closed_ = false;
};

}  // namespace negmine::client

#endif  // NEGMINE_CLIENT_NEGMINE_CLIENT_H_
