// NegativeMinerService: the gRPC callback service of negmine.v1.
//
// Each handler decodes its request at the wire boundary (server/wire.h),
// calls the core or the commit path, and encodes the answer; the work runs
// on a worker pool (reactions never block), and the answer carries a
// canonical code whose message names the field and value at fault.
//
// The parts it is built from:
//   server/rpc.h          token check, code names, the raw message reader
//   server/reactors.h     the streaming RPCs' reactors
//   server/registry.h     the collections
//   server/commit.h       every change of state: the log, replay, snapshots
//   server/maintenance.h  metrics refresh and periodic snapshots
//
// Pools: reads (Mine, MineStream, GetTargets, GetIndexInfo, ...) run on the
// request pool, or on the bulk pool when large; every change (upserts,
// deletes, drift updates, collections, snapshots) runs on the write pool.
// A slow change (a drift fit) and the changes queued behind it then hold
// only write threads, never the threads that serve Mine. The bulk pool has
// more threads than CPU turns: its mining requests take turns per work unit
// (FairTurns, worker_threads - 1 at once), so a huge request does not hold
// it until it is done.
//
// Thread safety: every method may run concurrently.
#ifndef NEGMINE_SERVER_SERVICE_H_
#define NEGMINE_SERVER_SERVICE_H_

#include <atomic>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "core/index.h"
#include "core/persist/wal.h"
#include "core/persist/snapshot.h"
#include "core/persist/wal_entry.h"
#include "negmine/v1/negmine.grpc.pb.h"
#include "server/batch_jobs.h"
#include "server/coalescer.h"
#include "server/commit.h"
#include "server/durability.h"
#include "server/fair_turns.h"
#include "server/maintenance.h"
#include "server/metrics.h"
#include "server/registry.h"
#include "server/rpc.h"
#include "server/worker_pool.h"

namespace negmine::server {

struct ServiceOptions {
  // Limits, reported by GetIndexInfo.
  uint64_t max_message_bytes = 64 << 20;
  uint32_t max_batch = 65536;  // queries per MineRequest
  uint32_t max_k = 4096;
  // Threads that run request work (reads: Mine, GetTargets, ...).
  int worker_threads = 2;
  // Threads that run changes (upserts, deletes, drift updates, ...). Changes
  // are fsynced and applied one at a time, in the log's order (each is
  // fsynced before it is applied, so they do not share fsyncs); more than
  // one thread lets the changes behind one wait at the commit order, with
  // their requests already read.
  int write_threads = 4;
  // Requests waiting for a worker beyond which new ones are refused with
  // RESOURCE_EXHAUSTED (bounded memory and latency under overload).
  size_t max_queued_requests = 1024;
  // Mine / MineStream requests larger than this (bytes on the wire) run on
  // a pool of their own, of worker_threads - 1 threads (at least 1), so
  // that huge batches never hold every worker and a small request behind
  // them is answered at once.
  uint64_t bulk_request_bytes = 1 << 20;
  // The memory the mining requests being served may hold together (their
  // queries, results and responses, estimated from rows x dim and rows x
  // k); past it a request gets RESOURCE_EXHAUSTED with a retry hint, and
  // one that alone exceeds it INVALID_ARGUMENT saying how to split it.
  uint64_t max_mine_memory_bytes = uint64_t{2} << 30;
  // Queries per work unit of a CPU search (SearchParams::work_unit_queries).
  int work_unit_queries = 256;
  // AssignBatches: most examples in one assignment; most in a synchronous
  // one (more need `async`); jobs running at once; threads per job.
  uint64_t max_batch_examples = 2000000;
  uint64_t max_sync_batch_examples = 100000;
  int max_batch_jobs = 2;
  int batch_job_threads = 2;
  // When set, every negmine.v1 call must carry the metadata
  // "authorization: Bearer <auth_token>" (else UNAUTHENTICATED). The health
  // service stays open, for probes.
  std::string auth_token;
  // Every collection's tree and drift figures are published to the metrics
  // this often (they cost O(N) to gather); 0: never.
  double stats_interval_seconds = 15;
  // A snapshot is taken this often when the log is not empty (0: never),
  // and whenever the log reaches snapshot_wal_bytes (0: no size trigger).
  double snapshot_interval_seconds = 3600;
  uint64_t snapshot_wal_bytes = uint64_t{1} << 30;
  // Micro-batching of concurrent top-k Mine / MineStream requests on one
  // collection (server/coalescer.h): on CUDA collections, and on CPU ones
  // too when coalesce_cpu (a merged CPU search runs on one thread, so it
  // only pays when requests are tiny). max_queries 0: never.
  SearchCoalescer::Options coalesce;
  bool coalesce_cpu = false;
  // A collection created with backend `cuda` where CUDA is not built or no
  // GPU is visible is served on the CPU (logged) instead of refused; this
  // also lets a data dir written on a GPU node recover on a CPU one.
  bool allow_cpu_fallback = false;
  // Makes the collections' indexes; null: CreateIndex. Tests wrap a real
  // index here to hold a change in flight.
  std::function<absl::StatusOr<std::unique_ptr<Index>>(const IndexOptions&)> index_factory;
};

// Every method is registered raw (grpc::ByteBuffer) and parses its messages
// itself (MessageReader and RunUnary in service.cc): the generated typed
// reader reports a streamed message that does not parse as a read with
// ok = false, the same as the client closing its side, so a stream
// [A, garbage, B] would end OK with B silently dropped; and a unary request
// that does not parse would be answered UNIMPLEMENTED with no message. Raw,
// both are INVALID_ARGUMENT naming the message.
using nm = v1::NegativeMiner;
using ServiceBase = nm::WithRawCallbackMethod_CreateCollection<
    nm::WithRawCallbackMethod_ListCollections<nm::WithRawCallbackMethod_DropCollection<
        nm::WithRawCallbackMethod_UpsertTargets<nm::WithRawCallbackMethod_DeleteTargets<
            nm::WithRawCallbackMethod_GetTargets<nm::WithRawCallbackMethod_Mine<
                nm::WithRawCallbackMethod_MineStream<nm::WithRawCallbackMethod_GetLandmarks<
                    nm::WithRawCallbackMethod_ApplyDrift<nm::WithRawCallbackMethod_AssignBatches<
                        nm::WithRawCallbackMethod_GetBatchJob<nm::WithRawCallbackMethod_GetIndexInfo<
                            nm::WithRawCallbackMethod_CreateSnapshot<nm::Service>>>>>>>>>>>>>>;

class NegativeMinerService final : public ServiceBase {
 public:
  NegativeMinerService(const ServiceOptions& options, Metrics* metrics);
  ~NegativeMinerService() override;

  // Until SetReady(true), every RPC answers UNAVAILABLE ("starting").
  void SetReady(bool ready) { ready_.store(ready); }
  bool ready() const { return ready_.load(); }

  // The commit path (server/commit.h), for recovery and the embedded
  // default collection.
  void SetDurability(std::string data_dir, uint64_t generation, std::shared_ptr<WalWriter> wal,
                     const WalWriter::Options& options, const Manifest& manifest) {
    commits_.SetDurability(std::move(data_dir), generation, std::move(wal), options, manifest);
  }
  absl::Status RestoreCollection(const SnapshotCollection& snapshot) {
    return commits_.Restore(snapshot);
  }
  using SnapshotInfo = CommitPath::SnapshotInfo;
  absl::StatusOr<SnapshotInfo> TakeSnapshot() { return commits_.TakeSnapshot(); }
  absl::StatusOr<CommitResult> Commit(const WalEntry& entry) { return commits_.Commit(entry); }
  absl::Status Replay(const WalEntry& entry, bool* refused = nullptr) {
    return commits_.Replay(entry, refused);
  }
  void OnWritableChange(std::function<void(bool)> callback) {
    commits_.OnWritableChange(std::move(callback));
  }
  CommitPath& commits() { return commits_; }

  // The collection `name` ("" = "default"), or NOT_FOUND.
  absl::StatusOr<std::shared_ptr<Collection>> Find(const std::string& name) const {
    return registry_.Find(name);
  }

  // The work of one mining request; shared by Mine and MineStream.
  // `cancelled` stops the search early (the call was cancelled). `labels`
  // gets the collection and mode, for the metrics.
  absl::Status DoMine(const v1::MineRequest& request, v1::MineResponse* response,
                      std::function<bool()> cancelled, RequestLabels* labels);
  // The work of one upsert message; adds the rows applied to the response.
  absl::Status DoUpsert(const v1::UpsertTargetsRequest& request,
                        const std::string& stream_collection,
                        v1::UpsertTargetsResponse* response, RequestLabels* labels);

  // Where a task runs: see "Pools" above.
  enum class Pool { kRequests, kBulk, kWrites };
  // Queues `task` on `pool`, or returns the RESOURCE_EXHAUSTED to answer
  // when max_queued_requests are already waiting there.
  absl::Status Enqueue(std::function<void()> task, Pool pool);
  BatchJobs& batch_jobs() { return *batch_jobs_; }
  const ServiceOptions& options() const { return options_; }
  Metrics& metrics() { return *metrics_; }
  // OK, or UNAUTHENTICATED (counted in the metrics under `method`) when a
  // token is required and `ctx` lacks it.
  absl::Status Authorize(const grpc::CallbackServerContext* ctx, const char* method) const;

  // --- negmine.v1.NegativeMiner ---
  grpc::ServerUnaryReactor* CreateCollection(grpc::CallbackServerContext* ctx,
                                 const grpc::ByteBuffer* req, grpc::ByteBuffer* resp) override;
  grpc::ServerUnaryReactor* ListCollections(grpc::CallbackServerContext* ctx,
                                 const grpc::ByteBuffer* req, grpc::ByteBuffer* resp) override;
  grpc::ServerUnaryReactor* DropCollection(grpc::CallbackServerContext* ctx,
                                 const grpc::ByteBuffer* req, grpc::ByteBuffer* resp) override;
  grpc::ServerReadReactor<grpc::ByteBuffer>* UpsertTargets(
      grpc::CallbackServerContext* ctx, grpc::ByteBuffer* resp) override;
  grpc::ServerUnaryReactor* DeleteTargets(grpc::CallbackServerContext* ctx,
                                 const grpc::ByteBuffer* req, grpc::ByteBuffer* resp) override;
  grpc::ServerUnaryReactor* GetTargets(grpc::CallbackServerContext* ctx,
                                 const grpc::ByteBuffer* req, grpc::ByteBuffer* resp) override;
  grpc::ServerUnaryReactor* Mine(grpc::CallbackServerContext* ctx,
                                 const grpc::ByteBuffer* req, grpc::ByteBuffer* resp) override;
  grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* MineStream(
      grpc::CallbackServerContext* ctx) override;
  grpc::ServerUnaryReactor* GetLandmarks(grpc::CallbackServerContext* ctx,
                                 const grpc::ByteBuffer* req, grpc::ByteBuffer* resp) override;
  grpc::ServerUnaryReactor* ApplyDrift(grpc::CallbackServerContext* ctx,
                                 const grpc::ByteBuffer* req, grpc::ByteBuffer* resp) override;
  grpc::ServerReadReactor<grpc::ByteBuffer>* AssignBatches(
      grpc::CallbackServerContext* ctx, grpc::ByteBuffer* resp) override;
  grpc::ServerUnaryReactor* GetBatchJob(grpc::CallbackServerContext* ctx,
                                 const grpc::ByteBuffer* req, grpc::ByteBuffer* resp) override;
  grpc::ServerUnaryReactor* GetIndexInfo(grpc::CallbackServerContext* ctx,
                                 const grpc::ByteBuffer* req, grpc::ByteBuffer* resp) override;
  grpc::ServerUnaryReactor* CreateSnapshot(grpc::CallbackServerContext* ctx,
                                 const grpc::ByteBuffer* req, grpc::ByteBuffer* resp) override;

 private:
  // Parses the request `in` as a Req (INVALID_ARGUMENT naming the message
  // type if it does not parse), runs work(&request, &response, &labels) on
  // `pool` and finishes the unary call with its status (and, when OK, the
  // response serialized to `out`), recording the call's metrics under
  // `method` and the labels the work set.
  template <typename Req, typename Resp, typename Work>
  grpc::ServerUnaryReactor* RunUnary(grpc::CallbackServerContext* ctx, const char* method,
                                     const grpc::ByteBuffer* in, grpc::ByteBuffer* out,
                                     Pool pool, Work work);

  const ServiceOptions options_;
  Metrics* metrics_;
  std::atomic<bool> ready_{false};
  CollectionRegistry registry_;
  CommitPath commits_;
  std::unique_ptr<BatchJobs> batch_jobs_;
  std::unique_ptr<MaintenanceThread> maintenance_;
  // The memory mining requests hold now (see max_mine_memory_bytes).
  std::atomic<uint64_t> mine_memory_{0};
  // The bulk mining requests' turns per work unit.
  std::unique_ptr<FairTurns> bulk_turns_;
  // Last members: destroyed first, so queued work finishes while the rest
  // of the service is still alive.
  std::unique_ptr<WorkerPool> write_pool_;
  std::unique_ptr<WorkerPool> bulk_pool_;
  std::unique_ptr<WorkerPool> pool_;
};

}  // namespace negmine::server

#endif  // NEGMINE_SERVER_SERVICE_H_
