#include "client/negmine_client.h"

#include <algorithm>

#include <grpcpp/generic/generic_stub.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace negmine::client {

absl::Status FromGrpc(const grpc::Status& status, const char* rpc) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()),
                      absl::StrCat(rpc, ": ", status.error_message()));
}

// values.size() / cols rows of float32, as a Matrix.
void EncodeMatrix(absl::Span<const float> values, uint32_t cols, v1::Matrix* m) {
  m->set_rows(cols == 0 ? 0 : static_cast<uint32_t>(values.size() / cols));
  m->set_cols(cols);
  m->set_dtype(v1::DTYPE_FLOAT32);
  m->set_data(reinterpret_cast<const char*>(values.data()),
              values.size() * sizeof(float));
}

void BuildMineRequest(const std::string& collection,
                      absl::Span<const float> queries, uint32_t dim,
                      const v1::MineParams& params,
                      absl::Span<const std::vector<uint64_t>> exclude,
                      v1::MineRequest* request,
                      absl::Span<const std::vector<uint64_t>> positives) {
  request->set_collection(collection);
  EncodeMatrix(queries, dim, request->mutable_queries());
  for (const std::vector<uint64_t>& ids : exclude) {
    request->add_exclude()->mutable_ids()->Add(ids.begin(), ids.end());
  }
  for (const std::vector<uint64_t>& ids : positives) {
    request->add_positives()->mutable_ids()->Add(ids.begin(), ids.end());
  }
  *request->mutable_params() = params;
}

std::string RetryServiceConfig(const ClientOptions& options) {
  if (options.retry_max_attempts <= 1) return "{}";
  return absl::StrFormat(
      R"({"methodConfig": [{"name": [{"service": "negmine.v1.NegativeMiner"}], )"
      R"("retryPolicy": {"maxAttempts": %d, "initialBackoff": "%.3fs", "maxBackoff": "%.3fs", )"
      R"("backoffMultiplier": %g, "retryableStatusCodes": ["UNAVAILABLE"]}}]})",
      std::min(options.retry_max_attempts, 5), options.retry_initial_backoff.count() / 1000.0,
      std::max(options.retry_max_backoff, options.retry_initial_backoff).count() / 1000.0,
      std::max(options.retry_backoff_multiplier, 1.0));
}

std::unique_ptr<Client> Client::Connect(const std::string& target,
                                        const ClientOptions& options) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(options.max_receive_message_bytes);
  args.SetMaxSendMessageSize(-1);
  // Retries are on by default in gRPC >= 1.40 (1.51 here); said anyway, as
  // the service config's retry policy depends on it.
  args.SetInt(GRPC_ARG_ENABLE_RETRIES, options.retry_max_attempts > 1 ? 1 : 0);
  args.SetServiceConfigJSON(RetryServiceConfig(options));
  std::shared_ptr<grpc::ChannelCredentials> credentials = grpc::InsecureChannelCredentials();
  if (!options.tls_root_certs.empty() || !options.tls_cert_chain.empty()) {
    credentials = grpc::SslCredentials({.pem_root_certs = options.tls_root_certs,
                                        .pem_private_key = options.tls_private_key,
                                        .pem_cert_chain = options.tls_cert_chain});
  }
  auto channel = grpc::CreateCustomChannel(target, credentials, args);
  return std::unique_ptr<Client>(new Client(std::move(channel), options));
}

Client::Client(std::shared_ptr<grpc::Channel> channel,
               const ClientOptions& options)
    : options_(options),
      channel_(std::move(channel)),
      stub_(v1::NegativeMiner::NewStub(channel_)) {}

void Client::Prepare(grpc::ClientContext* ctx, bool deadline) const {
  if (deadline && options_.timeout.count() > 0) {
    ctx->set_deadline(std::chrono::system_clock::now() + options_.timeout);
  }
  if (!options_.auth_token.empty()) {
    ctx->AddMetadata("authorization", "Bearer " + options_.auth_token);
  }
}

absl::Status Client::WaitForReady(std::chrono::milliseconds timeout) {
  if (channel_->WaitForConnected(std::chrono::system_clock::now() + timeout)) {
    return absl::OkStatus();
  }
  return absl::UnavailableError(
      absl::StrCat("no connection to the server within ", timeout.count(), " ms"));
}

absl::Status Client::WaitForServing(std::chrono::milliseconds timeout) {
  grpc::GenericStub stub(channel_);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + timeout);
  ctx.set_wait_for_ready(true);  // through "connection refused" until the deadline
  grpc::CompletionQueue cq;
  auto next = [&cq]() {
    void* tag;
    bool ok = false;
    return cq.Next(&tag, &ok) && ok;
  };
  std::unique_ptr<grpc::GenericClientAsyncReaderWriter> call =
      stub.PrepareCall(&ctx, "/grpc.health.v1.Health/Watch", &cq);
  // HealthCheckRequest{service: ""} is the empty message; each response is
  // HealthCheckResponse{status}: SERVING is the bytes 08 01.
  std::string last = "no answer";
  bool serving = false;
  call->StartCall(nullptr);
  if (next()) {
    grpc::Slice empty;
    grpc::ByteBuffer request(&empty, 1);
    call->Write(request, nullptr);
    if (next()) {
      call->WritesDone(nullptr);
      next();
      while (!serving) {
        grpc::ByteBuffer response;
        call->Read(&response, nullptr);
        if (!next()) break;
        std::vector<grpc::Slice> slices;
        std::string bytes;
        if (response.Dump(&slices).ok()) {
          for (const grpc::Slice& sl : slices) {
            bytes.append(reinterpret_cast<const char*>(sl.begin()), sl.size());
          }
        }
        serving = bytes == std::string("\x08\x01", 2);
        last = bytes == std::string("\x08\x02", 2) ? "NOT_SERVING" : serving ? "SERVING" : "UNKNOWN";
      }
    }
  }
  if (serving) ctx.TryCancel();
  grpc::Status status;
  call->Finish(&status, nullptr);
  next();
  cq.Shutdown();
  void* tag;
  bool ok;
  while (cq.Next(&tag, &ok)) {
  }
  if (serving) return absl::OkStatus();
  if (status.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED) {
    return absl::DeadlineExceededError(absl::StrCat(
        "the server was not SERVING within ", timeout.count() / 1000.0, " s (last health: ",
        last, last == "no answer" ? ", no connection" : "", ")"));
  }
  return FromGrpc(status, "Health/Watch");
}

absl::StatusOr<v1::CollectionInfo> Client::CreateCollection(
    const v1::CollectionConfig& config) {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  v1::CreateCollectionRequest req;
  *req.mutable_config() = config;
  v1::CreateCollectionResponse resp;
  absl::Status s = FromGrpc(stub_->CreateCollection(&ctx, req, &resp), "CreateCollection");
  if (!s.ok()) return s;
  return resp.info();
}

absl::StatusOr<std::vector<v1::CollectionInfo>> Client::ListCollections() {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  v1::ListCollectionsResponse resp;
  absl::Status s = FromGrpc(stub_->ListCollections(&ctx, {}, &resp), "ListCollections");
  if (!s.ok()) return s;
  return std::vector<v1::CollectionInfo>(resp.collections().begin(),
                                         resp.collections().end());
}

absl::Status Client::DropCollection(const std::string& collection) {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  v1::DropCollectionRequest req;
  req.set_collection(collection);
  v1::DropCollectionResponse resp;
  return FromGrpc(stub_->DropCollection(&ctx, req, &resp), "DropCollection");
}

absl::StatusOr<v1::UpsertTargetsResponse> Client::Upsert(
    const std::string& collection, absl::Span<const uint64_t> ids,
    absl::Span<const float> vectors, uint32_t dim, int64_t model_step,
    const SendProgress& progress) {
  if (dim == 0 || vectors.size() != ids.size() * dim) {
    return absl::InvalidArgumentError(absl::StrCat(
        "Upsert: ", vectors.size(), " floats do not make ", ids.size(),
        " vectors of dim ", dim));
  }
  const size_t rows_per_chunk = std::max<size_t>(
      1, options_.upsert_chunk_bytes / (size_t{dim} * sizeof(float) + 8));
  grpc::ClientContext ctx;
  Prepare(&ctx, /*deadline=*/false);  // a stream: no unary timeout
  v1::UpsertTargetsResponse resp;
  auto writer = stub_->UpsertTargets(&ctx, &resp);
  v1::UpsertTargetsRequest req;
  // At least one message, so that an empty upsert reaches the server and
  // gets its INVALID_ARGUMENT.
  size_t begin = 0;
  do {
    const size_t n = std::min(rows_per_chunk, ids.size() - begin);
    req.Clear();
    req.set_collection(collection);
    req.set_model_step(model_step);
    req.mutable_ids()->Add(ids.begin() + begin, ids.begin() + begin + n);
    EncodeMatrix(vectors.subspan(begin * dim, n * dim), dim, req.mutable_vectors());
    if (!writer->Write(req)) break;  // the server ended the stream: see Finish
    begin += n;
    if (progress) progress(begin, ids.size());
  } while (begin < ids.size());
  writer->WritesDone();
  absl::Status s = FromGrpc(writer->Finish(), "UpsertTargets");
  if (!s.ok()) return s;
  return resp;
}

absl::StatusOr<v1::DeleteTargetsResponse> Client::Delete(
    const std::string& collection, absl::Span<const uint64_t> ids,
    bool allow_missing) {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  v1::DeleteTargetsRequest req;
  req.set_collection(collection);
  req.mutable_ids()->Add(ids.begin(), ids.end());
  req.set_allow_missing(allow_missing);
  v1::DeleteTargetsResponse resp;
  absl::Status s = FromGrpc(stub_->DeleteTargets(&ctx, req, &resp), "DeleteTargets");
  if (!s.ok()) return s;
  return resp;
}

absl::StatusOr<v1::GetTargetsResponse> Client::GetTargets(
    const std::string& collection, absl::Span<const uint64_t> ids, bool scored) {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  v1::GetTargetsRequest req;
  req.set_collection(collection);
  req.mutable_ids()->Add(ids.begin(), ids.end());
  req.set_scored(scored);
  v1::GetTargetsResponse resp;
  absl::Status s = FromGrpc(stub_->GetTargets(&ctx, req, &resp), "GetTargets");
  if (!s.ok()) return s;
  return resp;
}

absl::StatusOr<v1::AssignBatchesResponse> Client::AssignBatches(
    const v1::AssignBatchesRequest& first, absl::Span<const float> queries,
    absl::Span<const float> positives, uint32_t dim, const SendProgress& progress) {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  v1::AssignBatchesResponse resp;
  auto writer = stub_->AssignBatches(&ctx, &resp);
  const size_t n = dim == 0 ? 0 : queries.size() / dim;
  const size_t rows_per_chunk =
      std::max<size_t>(1, options_.upsert_chunk_bytes / (2 * sizeof(float) * std::max<uint32_t>(dim, 1)));
  v1::AssignBatchesRequest req = first;
  size_t begin = 0;
  do {  // at least one message, so that an empty call gets its error
    const size_t rows = std::min(rows_per_chunk, n - begin);
    EncodeMatrix(queries.subspan(begin * dim, rows * dim), dim, req.mutable_queries());
    EncodeMatrix(positives.subspan(std::min(positives.size(), begin * dim), rows * dim), dim,
                 req.mutable_positives());
    if (!writer->Write(req)) break;  // the server ended the stream: see Finish
    req.Clear();
    begin += rows;
    if (progress) progress(begin, n);
  } while (begin < n);
  writer->WritesDone();
  absl::Status s = FromGrpc(writer->Finish(), "AssignBatches");
  if (!s.ok()) return s;
  return resp;
}

absl::StatusOr<v1::GetBatchJobResponse> Client::GetBatchJob(const std::string& job_id) {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  v1::GetBatchJobRequest req;
  req.set_job_id(job_id);
  v1::GetBatchJobResponse resp;
  absl::Status s = FromGrpc(stub_->GetBatchJob(&ctx, req, &resp), "GetBatchJob");
  if (!s.ok()) return s;
  return resp;
}

absl::StatusOr<v1::CreateSnapshotResponse> Client::CreateSnapshot(const std::string& collection) {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  v1::CreateSnapshotRequest req;
  req.set_collection(collection);
  v1::CreateSnapshotResponse resp;
  absl::Status s = FromGrpc(stub_->CreateSnapshot(&ctx, req, &resp), "CreateSnapshot");
  if (!s.ok()) return s;
  return resp;
}

absl::StatusOr<v1::GetLandmarksResponse> Client::GetLandmarks(
    const std::string& collection) {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  v1::GetLandmarksRequest req;
  req.set_collection(collection);
  v1::GetLandmarksResponse resp;
  absl::Status s = FromGrpc(stub_->GetLandmarks(&ctx, req, &resp), "GetLandmarks");
  if (!s.ok()) return s;
  return resp;
}

absl::StatusOr<v1::ApplyDriftResponse> Client::ApplyDrift(
    const std::string& collection, int64_t model_step, uint64_t landmark_epoch,
    absl::Span<const float> embeddings, uint32_t dim) {
  v1::ApplyDriftRequest req;
  req.set_landmark_epoch(landmark_epoch);
  EncodeMatrix(embeddings, dim, req.mutable_landmark_embeddings());
  return CallApplyDrift(collection, model_step, &req);
}

absl::StatusOr<v1::ApplyDriftResponse> Client::ApplyLinearMap(
    const std::string& collection, int64_t model_step, absl::Span<const float> a,
    absl::Span<const float> b, uint32_t dim) {
  v1::ApplyDriftRequest req;
  EncodeMatrix(a, dim, req.mutable_linear_map()->mutable_a());
  if (!b.empty()) EncodeMatrix(b, dim, req.mutable_linear_map()->mutable_b());
  return CallApplyDrift(collection, model_step, &req);
}

absl::StatusOr<v1::ApplyDriftResponse> Client::CallApplyDrift(
    const std::string& collection, int64_t model_step, v1::ApplyDriftRequest* req) {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  req->set_collection(collection);
  req->set_model_step(model_step);
  v1::ApplyDriftResponse resp;
  absl::Status s = FromGrpc(stub_->ApplyDrift(&ctx, *req, &resp), "ApplyDrift");
  if (!s.ok()) return s;
  return resp;
}

absl::StatusOr<v1::MineResponse> Client::Mine(
    const std::string& collection, absl::Span<const float> queries,
    uint32_t dim, const v1::MineParams& params,
    absl::Span<const std::vector<uint64_t>> exclude,
    absl::Span<const std::vector<uint64_t>> positives) {
  v1::MineRequest req;
  BuildMineRequest(collection, queries, dim, params, exclude, &req, positives);
  return Mine(req);
}

absl::StatusOr<v1::MineResponse> Client::Mine(const v1::MineRequest& request) {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  v1::MineResponse resp;
  absl::Status s = FromGrpc(stub_->Mine(&ctx, request, &resp), "Mine");
  if (!s.ok()) return s;
  return resp;
}

absl::StatusOr<v1::GetIndexInfoResponse> Client::GetIndexInfo(
    const std::string& collection) {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  v1::GetIndexInfoRequest req;
  req.set_collection(collection);
  v1::GetIndexInfoResponse resp;
  absl::Status s = FromGrpc(stub_->GetIndexInfo(&ctx, req, &resp), "GetIndexInfo");
  if (!s.ok()) return s;
  return resp;
}

std::unique_ptr<MineSession> Client::OpenMineSession(
    const std::string& collection) {
  return std::unique_ptr<MineSession>(
      new MineSession(stub_.get(), collection, options_.auth_token));
}

MineSession::MineSession(v1::NegativeMiner::Stub* stub, std::string collection,
                         const std::string& auth_token)
    : collection_(std::move(collection)) {
  if (!auth_token.empty()) ctx_.AddMetadata("authorization", "Bearer " + auth_token);
  stream_ = stub->MineStream(&ctx_);
}

MineSession::~MineSession() {
  if (!closed_) {
    ctx_.TryCancel();
    stream_->Finish().IgnoreError();
  }
}

absl::StatusOr<std::string> MineSession::Send(
    absl::Span<const float> queries, uint32_t dim, const v1::MineParams& params,
    absl::Span<const std::vector<uint64_t>> exclude,
    absl::Span<const std::vector<uint64_t>> positives) {
  v1::MineRequest req;
  BuildMineRequest(collection_, queries, dim, params, exclude, &req, positives);
  req.set_request_id(std::to_string(next_id_));
  std::string id = req.request_id();
  absl::Status s = Send(std::move(req));
  if (!s.ok()) return s;
  return id;
}

absl::Status MineSession::Send(v1::MineRequest request) {
  request.set_collection(collection_);
  if (request.request_id().empty()) request.set_request_id(std::to_string(next_id_));
  ++next_id_;
  if (closed_ || !stream_->Write(request)) {
    return absl::UnavailableError(
        "MineStream: the stream is closed; Close() returns its status");
  }
  return absl::OkStatus();
}

absl::StatusOr<v1::MineResponse> MineSession::Receive() {
  v1::MineResponse resp;
  if (closed_ || !stream_->Read(&resp)) {
    return absl::UnavailableError(
        "MineStream: no more responses; Close() returns the stream's status");
  }
  if (resp.status().code() != 0) {
    return absl::Status(static_cast<absl::StatusCode>(resp.status().code()),
                        absl::StrCat("MineStream item ", resp.request_id(), ": ",
                                     resp.status().message()));
  }
  return resp;
}

absl::Status MineSession::Close() {
  if (closed_) return absl::OkStatus();
  closed_ = true;
  stream_->WritesDone();
  v1::MineResponse drain;
  while (stream_->Read(&drain)) {
  }
  return FromGrpc(stream_->Finish(), "MineStream");
}

}  // namespace negmine::client
