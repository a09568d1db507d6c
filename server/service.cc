#include "server/service.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "core/random.h"
#include "core/status.h"
#include "server/log.h"
#include "server/reactors.h"
#include "server/wire.h"

namespace negmine::server {
namespace {

// The mine mode label of a request (see RequestLabels).
std::string ModeLabel(const SearchParams& p) {
  const char* mode = p.mode == MineMode::kTopK     ? "top_k"
                     : p.mode == MineMode::kSample ? "sample"
                                                   : "mixed";
  return p.want_log_z && p.mode != MineMode::kTopK ? absl::StrCat(mode, "_log_z") : mode;
}

}  // namespace

NegativeMinerService::NegativeMinerService(const ServiceOptions& options, Metrics* metrics)
    : options_(options),
      metrics_(metrics),
      registry_({.allow_cpu_fallback = options.allow_cpu_fallback,
                 .coalesce = options.coalesce,
                 .coalesce_cpu = options.coalesce_cpu,
                 .index_factory = options.index_factory}),
      commits_(&registry_, metrics),
      batch_jobs_(std::make_unique<BatchJobs>(std::max(1, options.max_batch_jobs),
                                              /*max_kept=*/64,
                                              std::max(1, options.batch_job_threads))),
      maintenance_(std::make_unique<MaintenanceThread>(
          MaintenanceThread::Options{
              .stats_interval_seconds = options.stats_interval_seconds,
              .snapshot_interval_seconds = options.snapshot_interval_seconds,
              .snapshot_wal_bytes = options.snapshot_wal_bytes},
          &registry_, &commits_, metrics)),
      bulk_turns_(std::make_unique<FairTurns>(std::max(1, options.worker_threads - 1))),
      write_pool_(std::make_unique<WorkerPool>(std::max(1, options.write_threads))),
      bulk_pool_(std::make_unique<WorkerPool>(4 * std::max(1, options.worker_threads - 1))),
      pool_(std::make_unique<WorkerPool>(std::max(1, options.worker_threads))) {}

NegativeMinerService::~NegativeMinerService() {
  maintenance_.reset();
  pool_.reset();
  bulk_pool_.reset();
  write_pool_.reset();
  batch_jobs_.reset();  // cancels running assignments and waits for them
}

absl::Status NegativeMinerService::Authorize(const grpc::CallbackServerContext* ctx,
                                             const char* method) const {
  absl::Status status = CheckBearerToken(ctx->client_metadata(), options_.auth_token);
  if (!status.ok()) {
    metrics_->ObserveRequest(method, CodeName(grpc::StatusCode::UNAUTHENTICATED), 0);
  }
  return status;
}

absl::Status NegativeMinerService::Enqueue(std::function<void()> task, Pool which) {
  WorkerPool& pool = which == Pool::kWrites ? *write_pool_
                     : which == Pool::kBulk ? *bulk_pool_
                                            : *pool_;
  if (pool.TrySubmit(std::move(task), options_.max_queued_requests)) return absl::OkStatus();
  return absl::ResourceExhaustedError(absl::StrCat(
      "the server is overloaded: ", options_.max_queued_requests,
      " requests are waiting for a worker (--max_queued_requests); retry after ",
      kRetryAfterMs, " ms or more, with backoff"));
}

template <typename Req, typename Resp, typename Work>
grpc::ServerUnaryReactor* NegativeMinerService::RunUnary(grpc::CallbackServerContext* ctx,
                                                         const char* method,
                                                         const grpc::ByteBuffer* in,
                                                         grpc::ByteBuffer* out, Pool pool,
                                                         Work work) {
  auto* call = new UnaryCall<Req, Resp>();
  const Clock::time_point start = Clock::now();
  if (absl::Status auth = Authorize(ctx, method); !auth.ok()) {
    call->Finish(ToGrpc(auth));
    return call;
  }
  absl::Status queued = Enqueue(
      [this, ctx, call, in, out, method, start, work = std::move(work)]() {
        absl::Status status;
        RequestLabels labels;
        if (!ready()) {
          status = NotReady();
        } else if (ctx->IsCancelled()) {
          // The client is gone or its deadline passed: do no work for it.
          status = absl::CancelledError("the call was cancelled before it ran");
        } else {
          grpc::ByteBuffer copy(*in);  // Deserialize consumes its buffer
          const size_t bytes = copy.Length();
          if (!grpc::SerializationTraits<Req>::Deserialize(&copy, &call->request).ok()) {
            status = absl::InvalidArgumentError(
                absl::StrCat("the ", method, " request (", bytes, " bytes) does not parse as ",
                             Req::descriptor()->full_name()));
          } else {
            status = work(&call->request, &call->response, &labels);
            if (status.ok()) SerializeTo(call->response, out);
          }
        }
        if (absl::IsResourceExhausted(status)) {
          ctx->AddTrailingMetadata("retry-after-ms", absl::StrCat(kRetryAfterMs));
        }
        const grpc::Status g = ToGrpc(status);
        metrics_->ObserveRequest(method, CodeName(g.error_code()), SecondsSince(start), labels);
        call->Finish(g);
      },
      pool);
  if (!queued.ok()) {
    ctx->AddTrailingMetadata("retry-after-ms", absl::StrCat(kRetryAfterMs));
    metrics_->ObserveRequest(method, CodeName(grpc::StatusCode::RESOURCE_EXHAUSTED), 0);
    call->Finish(ToGrpc(queued));
  }
  return call;
}

// ------------------------------------------------------------ collections

grpc::ServerUnaryReactor* NegativeMinerService::CreateCollection(
    grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* raw_req,
    grpc::ByteBuffer* raw_resp) {
  using Req = v1::CreateCollectionRequest;
  using Resp = v1::CreateCollectionResponse;
  return RunUnary<Req, Resp>(
      ctx, "CreateCollection", raw_req, raw_resp, Pool::kWrites,
      [this](const Req* req, Resp* resp, RequestLabels* labels) -> absl::Status {
        WalEntry e{.op = WalOp::kCreateCollection};
        ASSIGN_OR_RETURN(e.collection, CollectionName(req->config().name()));
        ASSIGN_OR_RETURN(e.options, ToIndexOptions(req->config()));
        ASSIGN_OR_RETURN(CommitResult r, commits_.Commit(e));
        labels->collection = r.collection->name;
        ToWireCollectionInfo(r.collection->name, *r.collection->index, resp->mutable_info());
        return absl::OkStatus();
      });
}

grpc::ServerUnaryReactor* NegativeMinerService::ListCollections(
    grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* raw_req,
    grpc::ByteBuffer* raw_resp) {
  using Req = v1::ListCollectionsRequest;
  using Resp = v1::ListCollectionsResponse;
  return RunUnary<Req, Resp>(ctx, "ListCollections", raw_req, raw_resp, Pool::kRequests,
                             [this](const Req*, Resp* resp, RequestLabels*) -> absl::Status {
                               for (const std::shared_ptr<Collection>& c : registry_.List()) {
                                 ToWireCollectionInfo(c->name, *c->index,
                                                      resp->add_collections());
                               }
                               return absl::OkStatus();
                             });
}

grpc::ServerUnaryReactor* NegativeMinerService::DropCollection(
    grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* raw_req,
    grpc::ByteBuffer* raw_resp) {
  using Req = v1::DropCollectionRequest;
  using Resp = v1::DropCollectionResponse;
  return RunUnary<Req, Resp>(
      ctx, "DropCollection", raw_req, raw_resp, Pool::kWrites,
      [this](const Req* req, Resp*, RequestLabels* labels) -> absl::Status {
        WalEntry e{.op = WalOp::kDropCollection};
        ASSIGN_OR_RETURN(e.collection, CollectionName(req->collection()));
        labels->collection = e.collection;
        return commits_.Commit(e).status();
      });
}

// ---------------------------------------------------------------- targets

absl::Status NegativeMinerService::DoUpsert(const v1::UpsertTargetsRequest& req,
                                            const std::string& stream_collection,
                                            v1::UpsertTargetsResponse* resp,
                                            RequestLabels* labels) {
  if (req.collection() != stream_collection) {
    return absl::InvalidArgumentError(
        absl::StrCat("collection = '", req.collection(), "' differs from '", stream_collection,
                     "' of the stream's first message"));
  }
  ASSIGN_OR_RETURN(std::shared_ptr<Collection> c, registry_.Find(req.collection()));
  labels->collection = c->name;
  ASSIGN_OR_RETURN(WalEntry e, FromUpsertRequest(req, c->name, c->index->options().dim));
  RETURN_IF_ERROR(commits_.Commit(e).status());
  resp->set_upserted(resp->upserted() + req.ids_size());
  resp->set_index_version(IndexVersion(*c));
  return absl::OkStatus();
}

grpc::ServerReadReactor<grpc::ByteBuffer>* NegativeMinerService::UpsertTargets(
    grpc::CallbackServerContext* ctx, grpc::ByteBuffer* resp) {
  if (absl::Status auth = Authorize(ctx, "UpsertTargets"); !auth.ok()) {
    return new RejectingReactor<grpc::ServerReadReactor<grpc::ByteBuffer>>(ToGrpc(auth));
  }
  return NewUpsertReactor(this, resp);
}

grpc::ServerUnaryReactor* NegativeMinerService::DeleteTargets(
    grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* raw_req,
    grpc::ByteBuffer* raw_resp) {
  using Req = v1::DeleteTargetsRequest;
  using Resp = v1::DeleteTargetsResponse;
  return RunUnary<Req, Resp>(
      ctx, "DeleteTargets", raw_req, raw_resp, Pool::kWrites,
      [this](const Req* req, Resp* resp, RequestLabels* labels) -> absl::Status {
        ASSIGN_OR_RETURN(WalEntry e, FromDeleteRequest(*req));
        labels->collection = e.collection;
        ASSIGN_OR_RETURN(CommitResult r, commits_.Commit(e));
        resp->set_deleted(r.deleted);
        resp->set_index_version(IndexVersion(*r.collection));
        return absl::OkStatus();
      });
}

grpc::ServerUnaryReactor* NegativeMinerService::GetTargets(grpc::CallbackServerContext* ctx,
                                                           const grpc::ByteBuffer* raw_req,
                                                           grpc::ByteBuffer* raw_resp) {
  using Req = v1::GetTargetsRequest;
  using Resp = v1::GetTargetsResponse;
  return RunUnary<Req, Resp>(
      ctx, "GetTargets", raw_req, raw_resp, Pool::kRequests,
      [this](const Req* req, Resp* resp, RequestLabels* labels) -> absl::Status {
        ASSIGN_OR_RETURN(std::shared_ptr<Collection> c, registry_.Find(req->collection()));
        labels->collection = c->name;
        std::vector<float> vectors;
        std::vector<int64_t> steps;
        RETURN_IF_ERROR(c->index->Get(req->ids(), &vectors, &steps));
        if (req->scored()) RETURN_IF_ERROR(c->index->GetScored(req->ids(), &vectors));
        *resp->mutable_ids() = req->ids();
        EncodeMatrix(vectors, req->ids_size(), c->index->options().dim, resp->mutable_vectors());
        resp->mutable_model_steps()->Add(steps.begin(), steps.end());
        return absl::OkStatus();
      });
}

// ----------------------------------------------------------------- mining

absl::Status NegativeMinerService::DoMine(const v1::MineRequest& req, v1::MineResponse* resp,
                                          std::function<bool()> cancelled,
                                          RequestLabels* labels) {
  resp->set_request_id(req.request_id());
  ASSIGN_OR_RETURN(std::shared_ptr<Collection> c, registry_.Find(req.collection()));
  labels->collection = c->name;
  const uint32_t dim = c->index->options().dim;
  ASSIGN_OR_RETURN(MineInput in, FromMineRequest(req, dim,
                                                 {.max_batch = options_.max_batch,
                                                  .max_k = options_.max_k,
                                                  .max_message_bytes = options_.max_message_bytes}));
  labels->mode = ModeLabel(in.params);
  in.params.cancelled = std::move(cancelled);
  in.params.work_unit_queries = options_.work_unit_queries;
  // A bulk request (it runs on the bulk pool) takes turns with the others.
  if (req.ByteSizeLong() > options_.bulk_request_bytes) in.params.turns = bulk_turns_.get();
  // The memory this request holds while it is served: its decoded queries,
  // the results and the response (about 56 bytes per result).
  const uint64_t n = in.n, k = req.params().k();
  const uint64_t memory = n * (uint64_t{dim} * 8 + 56 * k + 128);
  if (memory > options_.max_mine_memory_bytes) {
    const uint64_t fit = options_.max_mine_memory_bytes / (memory / n);
    return absl::InvalidArgumentError(absl::StrCat(
        "queries.rows = ", n, " at dim ", dim, " and params.k = ", k, " would hold about ",
        memory, " bytes, over the server's max_mine_memory_bytes = ",
        options_.max_mine_memory_bytes, ": split it into requests of at most ", fit,
        " queries"));
  }
  const uint64_t held = mine_memory_.fetch_add(memory) + memory;
  struct Release {
    std::atomic<uint64_t>& used;
    uint64_t bytes;
    ~Release() { used.fetch_sub(bytes); }
  } release{mine_memory_, memory};
  if (held > options_.max_mine_memory_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "the server is mining requests that hold ", held - memory,
        " of its max_mine_memory_bytes = ", options_.max_mine_memory_bytes,
        " bytes and this one needs ", memory, "; retry after ", kRetryAfterMs,
        " ms or more, with backoff"));
  }
  if (in.params.seed == 0) in.params.seed = Mix64(Clock::now().time_since_epoch().count());
  ASSIGN_OR_RETURN(SearchResult result,
                   c->coalescer ? c->coalescer->Search(in.queries, in.exclude, in.params)
                                : c->index->Search(in.queries, in.exclude, in.params));
  if (result.index_version < req.min_index_version()) {
    return absl::FailedPreconditionError(
        absl::StrCat("min_index_version = ", req.min_index_version(),
                     " is ahead of the index (version ", result.index_version, ")"));
  }
  FilterCounts removed;
  size_t short_queries = 0;
  for (const QueryResult& q : result.queries) {
    removed.Add(q.removed);
    short_queries += !q.shortfall.empty();
  }
  metrics_->ObserveFiltered(removed, short_queries);
  const size_t negatives = ToWireMineResponse(result, in.params.want_log_z, resp);
  metrics_->ObserveMine(n, negatives);
  return absl::OkStatus();
}

grpc::ServerUnaryReactor* NegativeMinerService::Mine(grpc::CallbackServerContext* ctx,
                                                     const grpc::ByteBuffer* raw_req,
                                                     grpc::ByteBuffer* raw_resp) {
  using Req = v1::MineRequest;
  using Resp = v1::MineResponse;
  const bool bulk = raw_req->Length() > options_.bulk_request_bytes;
  return RunUnary<Req, Resp>(
      ctx, "Mine", raw_req, raw_resp, bulk ? Pool::kBulk : Pool::kRequests,
      [this, ctx](const Req* req, Resp* resp, RequestLabels* labels) -> absl::Status {
        return DoMine(*req, resp, [ctx] { return ctx->IsCancelled(); }, labels);
      });
}

grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* NegativeMinerService::MineStream(
    grpc::CallbackServerContext* ctx) {
  if (absl::Status auth = Authorize(ctx, "MineStream"); !auth.ok()) {
    return new RejectingReactor<grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>>(
        ToGrpc(auth));
  }
  return NewMineStreamReactor(this, ctx);
}

// ------------------------------------------------------------------ drift

grpc::ServerUnaryReactor* NegativeMinerService::GetLandmarks(
    grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* raw_req,
    grpc::ByteBuffer* raw_resp) {
  using Req = v1::GetLandmarksRequest;
  using Resp = v1::GetLandmarksResponse;
  return RunUnary<Req, Resp>(
      ctx, "GetLandmarks", raw_req, raw_resp, Pool::kWrites,
      [this](const Req* req, Resp* resp, RequestLabels* labels) -> absl::Status {
        WalEntry e{.op = WalOp::kChooseLandmarks};
        ASSIGN_OR_RETURN(e.collection, CollectionName(req->collection()));
        labels->collection = e.collection;
        ASSIGN_OR_RETURN(CommitResult r, commits_.Commit(e));
        resp->mutable_ids()->Add(r.landmarks.ids.begin(), r.landmarks.ids.end());
        resp->set_landmark_epoch(r.landmarks.epoch);
        resp->set_index_version(IndexVersion(*r.collection));
        return absl::OkStatus();
      });
}

grpc::ServerUnaryReactor* NegativeMinerService::ApplyDrift(grpc::CallbackServerContext* ctx,
                                                           const grpc::ByteBuffer* raw_req,
                                                           grpc::ByteBuffer* raw_resp) {
  using Req = v1::ApplyDriftRequest;
  using Resp = v1::ApplyDriftResponse;
  return RunUnary<Req, Resp>(
      ctx, "ApplyDrift", raw_req, raw_resp, Pool::kWrites,
      [this](const Req* req, Resp* resp, RequestLabels* labels) -> absl::Status {
        ASSIGN_OR_RETURN(std::shared_ptr<Collection> c, registry_.Find(req->collection()));
        labels->collection = c->name;
        ASSIGN_OR_RETURN(WalEntry e,
                         FromApplyDriftRequest(*req, c->name, c->index->options().dim));
        ASSIGN_OR_RETURN(CommitResult r, commits_.Commit(e));
        const DriftReport& report = r.drift;
        ToWireDriftReport(report, resp);
        metrics_->SetDrift(c->name, req->model_step(), report.heldout_residual, report.rebased);
        Log(LogLevel::kInfo, "drift update",
            {{"collection", c->name},
             {"model_step", absl::StrCat(req->model_step())},
             {"kernel", report.kernel},
             {"heldout_residual", absl::StrCat(report.heldout_residual)},
             {"stale_residual", absl::StrCat(report.stale_residual)},
             {"rebased", report.rebased ? "true" : "false"},
             {"fit_seconds", absl::StrCat(report.fit_seconds)},
             {"apply_seconds", absl::StrCat(report.apply_seconds)}});
        return absl::OkStatus();
      });
}

// ---------------------------------------------------------------- batches

grpc::ServerReadReactor<grpc::ByteBuffer>* NegativeMinerService::AssignBatches(
    grpc::CallbackServerContext* ctx, grpc::ByteBuffer* resp) {
  if (absl::Status auth = Authorize(ctx, "AssignBatches"); !auth.ok()) {
    return new RejectingReactor<grpc::ServerReadReactor<grpc::ByteBuffer>>(ToGrpc(auth));
  }
  return NewAssignBatchesReactor(this, resp);
}

grpc::ServerUnaryReactor* NegativeMinerService::GetBatchJob(grpc::CallbackServerContext* ctx,
                                                            const grpc::ByteBuffer* raw_req,
                                                            grpc::ByteBuffer* raw_resp) {
  using Req = v1::GetBatchJobRequest;
  using Resp = v1::GetBatchJobResponse;
  return RunUnary<Req, Resp>(
      ctx, "GetBatchJob", raw_req, raw_resp, Pool::kRequests,
      [this](const Req* req, Resp* resp, RequestLabels*) -> absl::Status {
        std::shared_ptr<BatchJobs::Job> job = batch_jobs_->Find(req->job_id());
        if (job == nullptr) {
          return absl::NotFoundError(absl::StrCat(
              "batch job '", req->job_id(),
              "' not found (finished jobs are kept for a while only)"));
        }
        absl::MutexLock lock(&job->mu);
        ToWireBatchJob(job->done, job->status, job->progress.load(), job->result, resp);
        return absl::OkStatus();
      });
}

// ------------------------------------------------------------------ admin

grpc::ServerUnaryReactor* NegativeMinerService::GetIndexInfo(
    grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* raw_req,
    grpc::ByteBuffer* raw_resp) {
  using Req = v1::GetIndexInfoRequest;
  using Resp = v1::GetIndexInfoResponse;
  return RunUnary<Req, Resp>(
      ctx, "GetIndexInfo", raw_req, raw_resp, Pool::kRequests,
      [this](const Req* req, Resp* resp, RequestLabels* labels) -> absl::Status {
        ASSIGN_OR_RETURN(std::shared_ptr<Collection> c, registry_.Find(req->collection()));
        labels->collection = c->name;
        ToWireCollectionInfo(c->name, *c->index, resp->mutable_info());
        if (std::optional<TreeSummary> tree = c->index->TreeInfo()) {
          ToWireTreeInfo(*tree, resp->mutable_info()->mutable_tree());
        }
        ToWireDriftInfo(c->index->DriftInfo(), resp->mutable_info()->mutable_drift());
        v1::ServerLimits* limits = resp->mutable_limits();
        limits->set_max_message_bytes(options_.max_message_bytes);
        limits->set_max_batch(options_.max_batch);
        limits->set_max_k(options_.max_k);
        return absl::OkStatus();
      });
}

grpc::ServerUnaryReactor* NegativeMinerService::CreateSnapshot(
    grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* raw_req,
    grpc::ByteBuffer* raw_resp) {
  using Req = v1::CreateSnapshotRequest;
  using Resp = v1::CreateSnapshotResponse;
  return RunUnary<Req, Resp>(
      ctx, "CreateSnapshot", raw_req, raw_resp, Pool::kWrites,
      [this](const Req* req, Resp* resp, RequestLabels* labels) -> absl::Status {
        std::shared_ptr<Collection> c;
        if (!req->collection().empty()) {
          ASSIGN_OR_RETURN(c, registry_.Find(req->collection()));
          labels->collection = c->name;
        }
        ASSIGN_OR_RETURN(SnapshotInfo info, commits_.TakeSnapshot());
        resp->set_path(info.path);
        resp->set_bytes(info.bytes);
        if (c != nullptr) resp->set_index_version(IndexVersion(*c));
        Log(LogLevel::kInfo, "snapshot",
            {{"path", info.path}, {"bytes", absl::StrCat(info.bytes)}});
        return absl::OkStatus();
      });
}

}  // namespace negmine::server
