// NegativeMinerService: the gRPC callback service of negmine.v1.
//
// Each RPC validates its request at the wire boundary (server/wire.h), runs
// the work on the WorkerPool (reactions never block), and answers with a
// canonical code whose message names the field and value at fault.
//
// Streaming RPCs have one named reactor each (in service.cc):
//   UpsertTargets  a read reactor; each message is applied as a whole, the
//                  one response acknowledges the stream.
//   MineStream     a bidi reactor; requests are answered in order, one write
//                  in flight, a failed item carries its own status.
//   AssignBatches  a read reactor; the examples of every message, then one
//                  job.
// A streamed message that does not parse ends its stream with
// INVALID_ARGUMENT naming it; nothing after it is applied or answered.
//
// Thread safety: every method may run concurrently. Collections live in a
// registry guarded by a mutex; each Index synchronizes itself.
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
#include "server/durability.h"
#include "server/metrics.h"
#include "server/worker_pool.h"

namespace negmine::server {

struct ServiceOptions {
  // Limits, reported by GetIndexInfo.
  uint64_t max_message_bytes = 64 << 20;
  uint32_t max_batch = 65536;  // queries per MineRequest
  uint32_t max_k = 4096;
  // Threads that run request work.
  int worker_threads = 2;
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
};

// One named index.
struct Collection {
  std::string name;
  std::unique_ptr<Index> index;
  // Merges concurrent searches (null: searches go to the index directly).
  std::unique_ptr<SearchCoalescer> coalescer;
  // Held across a change and its log record, so that the log's order is
  // the order the changes were applied in.
  absl::Mutex write_mu;
  bool dropped ABSL_GUARDED_BY(write_mu) = false;
  // A GetLandmarks returned here: later ones only read the set.
  bool landmarks_chosen ABSL_GUARDED_BY(write_mu) = false;
};

// What a committed change produced, for the RPC's response.
struct CommitResult {
  std::shared_ptr<Collection> collection;
  size_t deleted = 0;       // kDelete
  LandmarkSet landmarks;    // kChooseLandmarks
  DriftReport drift;        // kDrift
  // The index refused the change (nothing changed): the call's answer.
  absl::Status refused;
  // Its log record, if one was appended, is cut back off (refused, or it
  // changed nothing).
  bool retract = false;
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

  // Logs every committed change from now on to `wal`, log generation
  // `generation` in `data_dir` (see server/durability.h). Set before serving.
  // `manifest` is what the dir holds now (server/durability.h); snapshots
  // keep it up to date.
  void SetDurability(std::string data_dir, uint64_t generation, std::shared_ptr<WalWriter> wal,
                     const WalWriter::Options& options, const Manifest& manifest);

  // Recovery: adds a collection from a snapshot.
  absl::Status RestoreCollection(const SnapshotCollection& snapshot);

  // Writes every collection to a new snapshot file, continues the log in a
  // new generation, and deletes the files no longer needed (the snapshot
  // before the previous one and the logs it needed). Writers pause only
  // while the indexes are copied; queries go on.
  struct SnapshotInfo {
    std::string path;
    uint64_t bytes = 0;
    uint64_t generation = 0;
  };
  absl::StatusOr<SnapshotInfo> TakeSnapshot();

  // Logs one change, applies it and waits until its log record is durable:
  // the one path of every change of state, for RPCs and for the embedded
  // default. The record is appended (to the page cache) before the change
  // is applied, so a change the log refuses is never seen:
  //   RESOURCE_EXHAUSTED: the log cannot be written (a full disk); the
  //     record was cut back off and nothing changed. Writes are retried
  //     with backoff and resume by themselves once the disk has room.
  //   INTERNAL: the log failed for good (a failed fsync: the change may or
  //     may not survive a restart); every later change fails the same way
  //     until a restart recovers.
  // A change the index refuses is cut back off the log, and its error is
  // returned. The state is published as negmine_wal_writable, logged at
  // each transition, and passed to OnWritableChange's callback.
  absl::StatusOr<CommitResult> Commit(const WalEntry& entry);
  // `callback(writable)` at each change of the log's writability (from the
  // thread that saw it).
  void OnWritableChange(std::function<void(bool)> callback);
  // Recovery: applies a logged change again, without logging it.
  absl::Status Replay(const WalEntry& entry);

  // The collection `name` ("" = "default"), or NOT_FOUND.
  absl::StatusOr<std::shared_ptr<Collection>> Find(const std::string& name) const;
  // CreateIndex, with the CPU fallback of ServiceOptions::allow_cpu_fallback.
  absl::StatusOr<std::unique_ptr<Index>> MakeIndex(const std::string& name,
                                                   const IndexOptions& options) const;
  // A collection over `index`, with a coalescer where the options want one.
  std::shared_ptr<Collection> NewCollection(const std::string& name,
                                            std::unique_ptr<Index> index,
                                            Backend requested) const;

  // Publishes a collection's size and version to the metrics.
  void UpdateCollectionMetrics(const Collection& c);
  // Publishes every collection's full state (tree, drift) to the metrics.
  void RefreshIndexMetrics();

  // The work of one mining request; shared by Mine and MineStream.
  // `cancelled` stops the search early (the call was cancelled).
  absl::Status DoMine(const v1::MineRequest& request, v1::MineResponse* response,
                      std::function<bool()> cancelled);
  // The work of one upsert message; adds the rows applied to `*upserted`.
  absl::Status DoUpsert(const v1::UpsertTargetsRequest& request,
                        const std::string& stream_collection,
                        v1::UpsertTargetsResponse* response);

  WorkerPool& pool() { return *pool_; }
  // Queues `task` on the pool (`bulk`: the pool of large mining requests),
  // or returns the RESOURCE_EXHAUSTED to answer when max_queued_requests
  // are already waiting there.
  absl::Status Enqueue(std::function<void()> task, bool bulk = false);
  BatchJobs& batch_jobs() { return *batch_jobs_; }
  const ServiceOptions& options() const { return options_; }
  Metrics& metrics() { return *metrics_; }
  bool ready() const { return ready_.load(); }
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
  // type if it does not parse), runs work(&request, &response) on the pool
  // and finishes the unary call with its status (and, when OK, the response
  // serialized to `out`), recording the call's metrics under `method`.
  template <typename Req, typename Resp, typename Work>
  grpc::ServerUnaryReactor* RunUnary(grpc::CallbackServerContext* ctx, const char* method,
                                     const grpc::ByteBuffer* in, grpc::ByteBuffer* out,
                                     Work work, bool bulk = false);

  void FillInfo(const Collection& c, v1::CollectionInfo* info) const;
  absl::Status CheckToken(const grpc::CallbackServerContext* ctx) const;
  // Appends the change's log record (a no-op in recovery); Apply calls it
  // once the change is validated against the registry, just before it
  // changes anything.
  using LogStep = std::function<absl::Status()>;
  // Commit's and Replay's work: applies `entry`, calling `log` first.
  absl::StatusOr<CommitResult> Apply(const WalEntry& entry, const LogStep& log);
  // Publishes a change of the log's writability (metric, log line, callback).
  void NoteWritable(bool writable, const absl::Status& why);

  // Held by Commit across appending a record and applying its change, and
  // by TakeSnapshot while it switches logs: orders the log, and lets a
  // refused change's record be cut back off (nothing follows it yet).
  // Acquired before mu_ and every write_mu.
  absl::Mutex commit_mu_ ABSL_ACQUIRED_BEFORE(mu_);
  std::atomic<bool> writable_{true};
  // A leaf lock: NoteWritable runs under commit_mu_, mu_ or a write_mu.
  absl::Mutex callback_mu_;
  std::function<void(bool)> on_writable_change_ ABSL_GUARDED_BY(callback_mu_);

  // The log. Replaced only by TakeSnapshot while it holds commit_mu_ and
  // mu_, so whoever holds commit_mu_ for an Append reads a stable pointer.
  std::string data_dir_;
  uint64_t generation_ = 0;
  std::shared_ptr<WalWriter> wal_;
  WalWriter::Options wal_options_;
  WalWriter::SyncStats retired_syncs_;  // of the log generations before wal_
  absl::Mutex snapshot_mu_;  // one TakeSnapshot at a time
  Manifest manifest_ ABSL_GUARDED_BY(snapshot_mu_);

  const ServiceOptions options_;
  Metrics* metrics_;
  std::atomic<bool> ready_{false};
  mutable absl::Mutex mu_;
  std::map<std::string, std::shared_ptr<Collection>> collections_
      ABSL_GUARDED_BY(mu_);
  std::unique_ptr<BatchJobs> batch_jobs_;
  // Once a second until stopping_: RefreshIndexMetrics every
  // stats_interval_seconds, and a snapshot when one is due.
  void MaintenanceLoop();
  absl::Mutex stats_mu_;
  bool stopping_ ABSL_GUARDED_BY(stats_mu_) = false;
  std::thread maintenance_thread_;
  // The memory mining requests hold now (see max_mine_memory_bytes).
  std::atomic<uint64_t> mine_memory_{0};
  // Last members: destroyed first, so queued work finishes while the rest
  // of the service is still alive.
  std::unique_ptr<WorkerPool> bulk_pool_;
  std::unique_ptr<WorkerPool> pool_;
};

// OK when `token` is empty or `metadata` carries "authorization: Bearer
// <token>"; else UNAUTHENTICATED saying what to send.
absl::Status CheckBearerToken(const std::multimap<grpc::string_ref, grpc::string_ref>& metadata,
                              const std::string& token);

// The name of a gRPC code, as used in metric labels ("OK", "NOT_FOUND").
const char* CodeName(grpc::StatusCode code);

}  // namespace negmine::server

#endif  // NEGMINE_SERVER_SERVICE_H_
