#include "server/service.h"

#include <algorithm>
#include <chrono>
#include <deque>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "core/cuda/device.h"
#include "core/random.h"
#include "core/status.h"
#include "server/batch_jobs.h"
#include "server/durability.h"
#include "server/log.h"
#include "server/wire.h"

namespace negmine::server {
namespace {

using Clock = std::chrono::steady_clock;

double SecondsSince(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

absl::Status NotReady() {
  return absl::UnavailableError(
      "the server is starting (recovering its data dir); retry shortly");
}

// The retry hint of RESOURCE_EXHAUSTED answers, also sent as the trailing
// metadata "retry-after-ms" on unary calls.
constexpr int kRetryAfterMs = 100;

}  // namespace

const char* CodeName(grpc::StatusCode code) {
  static const char* const kNames[] = {
      "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED",
      "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
      "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED",
      "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"};
  const int i = static_cast<int>(code);
  return i >= 0 && i < 17 ? kNames[i] : "UNKNOWN";
}

NegativeMinerService::NegativeMinerService(const ServiceOptions& options,
                                           Metrics* metrics)
    : options_(options),
      metrics_(metrics),
      batch_jobs_(std::make_unique<BatchJobs>(std::max(1, options.max_batch_jobs),
                                              /*max_kept=*/64,
                                              std::max(1, options.batch_job_threads))),
      bulk_pool_(std::make_unique<WorkerPool>(std::max(1, options.worker_threads - 1))),
      pool_(std::make_unique<WorkerPool>(std::max(1, options.worker_threads))) {
  maintenance_thread_ = std::thread([this] { MaintenanceLoop(); });
}

void NegativeMinerService::MaintenanceLoop() {
  auto last_stats = Clock::now(), last_snapshot = Clock::now();
  auto snapshot_retry_at = Clock::now();
  std::chrono::seconds snapshot_backoff(0);
  absl::MutexLock lock(&stats_mu_);
  while (!stats_mu_.AwaitWithTimeout(absl::Condition(&stopping_), absl::Seconds(1))) {
    stats_mu_.Unlock();
    const auto now = Clock::now();
    if (options_.stats_interval_seconds > 0 &&
        now - last_stats >= absl::ToChronoSeconds(absl::Seconds(options_.stats_interval_seconds))) {
      RefreshIndexMetrics();
      last_stats = now;
    }
    uint64_t wal_bytes = 0;
    {
      absl::MutexLock map_lock(&mu_);
      if (wal_ != nullptr) {
        wal_bytes = wal_->size();
        const WalWriter::SyncStats sync = wal_->sync_stats();
        metrics_->SetWal(static_cast<double>(wal_bytes),
                         static_cast<double>(retired_syncs_.syncs + sync.syncs),
                         retired_syncs_.seconds + sync.seconds);
      }
    }
    const bool interval_due =
        options_.snapshot_interval_seconds > 0 && wal_bytes > 0 &&
        now - last_snapshot >=
            absl::ToChronoSeconds(absl::Seconds(options_.snapshot_interval_seconds));
    const bool size_due = options_.snapshot_wal_bytes > 0 && wal_bytes >= options_.snapshot_wal_bytes;
    if ((interval_due || size_due) && now >= snapshot_retry_at) {
      absl::StatusOr<SnapshotInfo> info = TakeSnapshot();
      if (info.ok()) {
        Log(LogLevel::kInfo, "periodic snapshot",
            {{"path", info->path}, {"bytes", absl::StrCat(info->bytes)}});
        snapshot_backoff = std::chrono::seconds(0);
      } else {
        // A failed attempt (a full disk) may have started a new, empty log
        // generation: retry with backoff (10 s doubling to 10 min), not at
        // every tick of the size trigger.
        snapshot_backoff = std::clamp(2 * snapshot_backoff, std::chrono::seconds(10),
                                      std::chrono::seconds(600));
        snapshot_retry_at = now + snapshot_backoff;
        Log(LogLevel::kError, "periodic snapshot failed",
            {{"error", info.status().ToString()},
             {"retry_in_seconds", absl::StrCat(snapshot_backoff.count())}});
      }
      last_snapshot = now;
    }
    stats_mu_.Lock();
  }
}

NegativeMinerService::~NegativeMinerService() {
  {
    absl::MutexLock lock(&stats_mu_);
    stopping_ = true;
  }
  if (maintenance_thread_.joinable()) maintenance_thread_.join();
  pool_.reset();
  bulk_pool_.reset();
  batch_jobs_.reset();  // cancels running assignments and waits for them
}

absl::Status NegativeMinerService::Authorize(const grpc::CallbackServerContext* ctx,
                                             const char* method) const {
  absl::Status status = CheckToken(ctx);
  if (!status.ok()) metrics_->ObserveRequest(method, CodeName(grpc::StatusCode::UNAUTHENTICATED), 0);
  return status;
}

absl::Status NegativeMinerService::CheckToken(const grpc::CallbackServerContext* ctx) const {
  return CheckBearerToken(ctx->client_metadata(), options_.auth_token);
}

absl::Status CheckBearerToken(const std::multimap<grpc::string_ref, grpc::string_ref>& md,
                              const std::string& want) {
  if (want.empty()) return absl::OkStatus();
  auto it = md.find("authorization");
  if (it == md.end()) {
    return absl::UnauthenticatedError(
        "this server requires a bearer token: send the metadata 'authorization: Bearer "
        "<token>'");
  }
  absl::string_view value(it->second.data(), it->second.size());
  bool ok = absl::ConsumePrefix(&value, "Bearer ") && value.size() == want.size();
  // Compared in constant time for tokens of the right length.
  unsigned char diff = 0;
  for (size_t i = 0; ok && i < want.size(); ++i) diff |= value[i] ^ want[i];
  if (!ok || diff != 0) return absl::UnauthenticatedError("invalid bearer token");
  return absl::OkStatus();
}

// A stream refused at its start (e.g. UNAUTHENTICATED).
template <typename Base>
class RejectingReactor final : public Base {
 public:
  explicit RejectingReactor(const grpc::Status& status) { this->Finish(status); }
  void OnDone() override { delete this; }
};

// The one reader of streamed messages: each arrives as raw bytes (the
// methods are registered raw, see service.h) and is parsed here, so that a
// message that does not parse fails its stream instead of ending it.
// A read with ok = false is then always the client closing its side.
//
// Use: StartRead(reader.buffer()); in OnReadDone(ok), reader.Parse(&msg).
// Not thread-safe: one read in flight, as the callback API requires.
template <typename Msg>
class MessageReader {
 public:
  explicit MessageReader(const char* method) : method_(method) {}

  grpc::ByteBuffer* buffer() { return &buffer_; }

  // Parses the message just read into *out (1-based index: count()).
  //   INVALID_ARGUMENT: the bytes are not a `Msg`; the message names it.
  absl::Status Parse(Msg* out) {
    ++count_;
    const size_t bytes = buffer_.Length();
    const grpc::Status s = grpc::SerializationTraits<Msg>::Deserialize(&buffer_, out);
    buffer_.Clear();
    if (!s.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "message ", count_, " of the ", method_, " stream (", bytes,
          " bytes) does not parse as ", Msg::descriptor()->full_name(),
          "; the stream is refused from there"));
    }
    return absl::OkStatus();
  }

  // Messages read so far, the last one included.
  size_t count() const { return count_; }

 private:
  const char* const method_;
  grpc::ByteBuffer buffer_;
  size_t count_ = 0;
};

// `message` as the bytes of a raw response.
template <typename Msg>
void SerializeTo(const Msg& message, grpc::ByteBuffer* out) {
  bool own = false;
  grpc::SerializationTraits<Msg>::Serialize(message, out, &own);
}

absl::Status NegativeMinerService::Enqueue(std::function<void()> task, bool bulk) {
  WorkerPool& pool = bulk ? *bulk_pool_ : *pool_;
  if (pool.TrySubmit(std::move(task), options_.max_queued_requests)) return absl::OkStatus();
  return absl::ResourceExhaustedError(absl::StrCat(
      "the server is overloaded: ", options_.max_queued_requests,
      " requests are waiting for a worker (--max_queued_requests); retry after ",
      kRetryAfterMs, " ms or more, with backoff"));
}

// One unary call's reactor, owning its parsed request and its response.
template <typename Req, typename Resp>
class UnaryCall final : public grpc::ServerUnaryReactor {
 public:
  Req request;
  Resp response;
  void OnDone() override { delete this; }
};

template <typename Req, typename Resp, typename Work>
grpc::ServerUnaryReactor* NegativeMinerService::RunUnary(grpc::CallbackServerContext* ctx,
                                                         const char* method,
                                                         const grpc::ByteBuffer* in,
                                                         grpc::ByteBuffer* out, Work work,
                                                         bool bulk) {
  auto* call = new UnaryCall<Req, Resp>();
  const Clock::time_point start = Clock::now();
  if (absl::Status auth = Authorize(ctx, method); !auth.ok()) {
    call->Finish(ToGrpc(auth));
    return call;
  }
  absl::Status queued =
      Enqueue([this, ctx, call, in, out, method, start, work = std::move(work)]() {
        absl::Status status;
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
            status = work(&call->request, &call->response);
            if (status.ok()) SerializeTo(call->response, out);
          }
        }
        if (absl::IsResourceExhausted(status)) {
          ctx->AddTrailingMetadata("retry-after-ms", absl::StrCat(kRetryAfterMs));
        }
        const grpc::Status g = ToGrpc(status);
        metrics_->ObserveRequest(method, CodeName(g.error_code()), SecondsSince(start));
        call->Finish(g);
      },
      bulk);
  if (!queued.ok()) {
    ctx->AddTrailingMetadata("retry-after-ms", absl::StrCat(kRetryAfterMs));
    metrics_->ObserveRequest(method, CodeName(grpc::StatusCode::RESOURCE_EXHAUSTED), 0);
    call->Finish(ToGrpc(queued));
  }
  return call;
}

absl::StatusOr<std::unique_ptr<Index>> NegativeMinerService::MakeIndex(
    const std::string& name, const IndexOptions& options) const {
  absl::StatusOr<std::unique_ptr<Index>> index = CreateIndex(options);
  if (!index.ok() && options.backend == Backend::kCuda && options_.allow_cpu_fallback &&
      (absl::IsFailedPrecondition(index.status()) || absl::IsUnimplemented(index.status()))) {
    Log(LogLevel::kWarning, "cuda unavailable; serving the collection on the cpu",
        {{"collection", name}, {"error", index.status().ToString()}});
    IndexOptions cpu = options;
    cpu.backend = Backend::kCpu;
    index = CreateIndex(cpu);
  }
  return index;
}

std::shared_ptr<Collection> NegativeMinerService::NewCollection(const std::string& name,
                                                               std::unique_ptr<Index> index,
                                                               Backend requested) const {
  const bool cuda = index->active_backend() == Backend::kCuda;
  Log(LogLevel::kInfo, "collection index",
      {{"collection", name},
       {"backend", BackendName(index->active_backend())},
       {"requested", BackendName(requested)}});
  auto c = std::make_shared<Collection>();
  c->name = name;
  c->index = std::move(index);
  if (options_.coalesce.max_queries > 0 && (cuda || options_.coalesce_cpu)) {
    c->coalescer = std::make_unique<SearchCoalescer>(c->index.get(), options_.coalesce);
  }
  return c;
}

absl::StatusOr<CommitResult> NegativeMinerService::Apply(const WalEntry& e,
                                                         const LogStep& log) {
  CommitResult out;
  if (e.op == WalOp::kCreateCollection) {
    ASSIGN_OR_RETURN(std::unique_ptr<Index> index, MakeIndex(e.collection, e.options));
    out.collection = NewCollection(e.collection, std::move(index), e.options.backend);
    absl::MutexLock lock(&mu_);
    if (collections_.contains(e.collection)) {
      return absl::AlreadyExistsError(
          absl::StrCat("collection '", e.collection, "' already exists"));
    }
    RETURN_IF_ERROR(log());
    collections_.emplace(e.collection, out.collection);
    return out;
  }
  if (e.op == WalOp::kDropCollection) {
    absl::MutexLock lock(&mu_);
    auto it = collections_.find(e.collection);
    if (it == collections_.end()) {
      return absl::NotFoundError(absl::StrCat("collection '", e.collection, "' not found"));
    }
    RETURN_IF_ERROR(log());
    out.collection = it->second;
    absl::MutexLock write_lock(&out.collection->write_mu);
    out.collection->dropped = true;
    collections_.erase(it);
    return out;
  }
  ASSIGN_OR_RETURN(out.collection, Find(e.collection));
  Collection& c = *out.collection;
  absl::MutexLock write_lock(&c.write_mu);
  if (c.dropped) {
    return absl::NotFoundError(absl::StrCat("collection '", e.collection, "' not found"));
  }
  if (e.op == WalOp::kChooseLandmarks && c.landmarks_chosen) {
    // The set exists: GetLandmarks only reads it (nothing to log, so a
    // full disk does not refuse it).
    ASSIGN_OR_RETURN(out.landmarks, c.index->GetLandmarks());
    return out;
  }
  // The record is appended first and the change applied only if that
  // succeeded, so a change the log refused (a full disk) is never seen. A
  // change that the index then refuses (a bad id, a stale epoch) is cut
  // back off the log.
  RETURN_IF_ERROR(log());
  absl::Status applied;
  switch (e.op) {
    case WalOp::kUpsert:
      applied = c.index->Upsert(e.ids, e.vectors, e.model_step);
      break;
    case WalOp::kDelete: {
      absl::StatusOr<size_t> deleted = c.index->Delete(e.ids, e.allow_missing);
      applied = deleted.status();
      if (deleted.ok()) out.deleted = *deleted;
      break;
    }
    case WalOp::kChooseLandmarks: {
      absl::StatusOr<LandmarkSet> landmarks = c.index->GetLandmarks();
      applied = landmarks.status();
      if (landmarks.ok()) {
        out.landmarks = *std::move(landmarks);
        c.landmarks_chosen = true;
        // Chosen before (by a change replayed from a snapshot): nothing
        // changed, so nothing stays in the log.
        if (!out.landmarks.chosen) out.retract = true;
      }
      break;
    }
    case WalOp::kDrift: {
      absl::StatusOr<DriftReport> drift =
          c.index->ApplyDrift({.model_step = e.model_step,
                               .landmark_epoch = e.landmark_epoch,
                               .landmark_embeddings = e.vectors,
                               .linear_a = e.linear_a,
                               .linear_b = e.linear_b});
      applied = drift.status();
      if (drift.ok()) out.drift = *drift;
      break;
    }
    default:
      applied = absl::InternalError("unreachable");
  }
  if (!applied.ok()) {
    out.refused = applied;
    out.retract = true;
  }
  return out;
}

absl::StatusOr<CommitResult> NegativeMinerService::Commit(const WalEntry& entry) {
  std::shared_ptr<WalWriter> used;
  uint64_t start = 0, end = 0;
  absl::StatusOr<CommitResult> out;
  {
    // Appends and applies in one order: the log's order is the order the
    // changes were applied in, and nothing is appended after a record
    // while its change is applied (so a refused one can be cut back off).
    absl::MutexLock order(&commit_mu_);
    std::shared_ptr<WalWriter> wal;
    {
      absl::MutexLock lock(&mu_);
      wal = wal_;
    }
    if (wal != nullptr) {
      if (absl::Status s = wal->health(); !s.ok()) {
        NoteWritable(false, s);
        return absl::InternalError(absl::StrCat(
            "the write-ahead log failed (", s.message(),
            "); no change is accepted until the server restarts and recovers"));
      }
    }
    const std::string payload = wal != nullptr ? EncodeWalEntry(entry) : std::string();
    LogStep log = [&]() -> absl::Status {
      if (wal == nullptr) return absl::OkStatus();
      start = wal->size();
      absl::StatusOr<uint64_t> appended = wal->Append(
          static_cast<uint8_t>(entry.op),
          {reinterpret_cast<const uint8_t*>(payload.data()), payload.size()});
      if (!appended.ok()) {
        NoteWritable(false, appended.status());
        return appended.status();
      }
      used = wal;
      end = *appended;
      return absl::OkStatus();
    };
    out = Apply(entry, log);
    if (out.ok() && out->retract && used != nullptr) {
      if (absl::Status s = used->Retract(start); !s.ok()) {
        NoteWritable(false, s);
        Log(LogLevel::kError, "cannot cut a refused change back off the write-ahead log",
            {{"error", s.ToString()}});
      }
      used = nullptr;
    }
  }
  if (!out.ok()) return out.status();
  if (!out->refused.ok()) return out->refused;
  if (used != nullptr) {
    if (absl::Status s = used->Sync(end); !s.ok()) {
      NoteWritable(false, s);
      return absl::InternalError(absl::StrCat(
          "the write-ahead log could not be synced (", s.message(),
          "): this change may or may not survive a restart; no change is accepted until the "
          "server restarts and recovers"));
    }
    NoteWritable(true, absl::OkStatus());
  }
  if (entry.op == WalOp::kDropCollection) {
    metrics_->RemoveCollection(entry.collection);
  } else {
    UpdateCollectionMetrics(*out->collection);
  }
  return out;
}

void NegativeMinerService::NoteWritable(bool writable, const absl::Status& why) {
  if (writable_.exchange(writable) == writable) return;
  metrics_->SetWalWritable(writable);
  if (writable) {
    Log(LogLevel::kInfo, "writes resumed: the write-ahead log takes changes again");
  } else {
    Log(LogLevel::kError, "writes refused: the write-ahead log cannot take changes",
        {{"error", why.ToString()}});
  }
  absl::MutexLock lock(&callback_mu_);
  if (on_writable_change_) on_writable_change_(writable);
}

void NegativeMinerService::OnWritableChange(std::function<void(bool)> callback) {
  absl::MutexLock lock(&callback_mu_);
  on_writable_change_ = std::move(callback);
}

absl::Status NegativeMinerService::Replay(const WalEntry& entry) {
  LogStep none = [] { return absl::OkStatus(); };
  ASSIGN_OR_RETURN(CommitResult out, Apply(entry, none));
  if (!out.refused.ok()) return out.refused;
  if (entry.op != WalOp::kDropCollection) UpdateCollectionMetrics(*out.collection);
  return absl::OkStatus();
}

void NegativeMinerService::SetDurability(std::string data_dir, uint64_t generation,
                                         std::shared_ptr<WalWriter> wal,
                                         const WalWriter::Options& options,
                                         const Manifest& manifest) {
  {
    absl::MutexLock snapshots(&snapshot_mu_);
    manifest_ = manifest;
  }
  {
    absl::MutexLock lock(&mu_);
    data_dir_ = std::move(data_dir);
    generation_ = generation;
    wal_ = std::move(wal);
    wal_options_ = options;
  }
  metrics_->SetWalWritable(true);
}

absl::Status NegativeMinerService::RestoreCollection(const SnapshotCollection& snapshot) {
  ASSIGN_OR_RETURN(std::unique_ptr<Index> index, MakeIndex(snapshot.name, snapshot.options));
  RETURN_IF_ERROR(index->Restore(snapshot.index));
  std::shared_ptr<Collection> c =
      NewCollection(snapshot.name, std::move(index), snapshot.options.backend);
  {
    absl::MutexLock lock(&mu_);
    if (!collections_.emplace(c->name, c).second) {
      return absl::DataLossError(absl::StrCat("the snapshot holds '", c->name, "' twice"));
    }
  }
  UpdateCollectionMetrics(*c);
  return absl::OkStatus();
}

absl::StatusOr<NegativeMinerService::SnapshotInfo> NegativeMinerService::TakeSnapshot() {
  absl::MutexLock one_at_a_time(&snapshot_mu_);
  const Clock::time_point start = Clock::now();
  SnapshotContents contents;
  std::string dir;
  {
    // Pause every writer while the indexes are copied and the log switches.
    absl::MutexLock order(&commit_mu_);
    absl::MutexLock lock(&mu_);
    if (wal_ == nullptr) {
      return absl::FailedPreconditionError("this server keeps no write-ahead log");
    }
    // The log the snapshot covers must be whole and durable before a later
    // generation follows it (recovery allows a torn tail only in the last
    // log): a log that failed for good may end in garbage, so no snapshot
    // switches away from it; the restart that recovers it is the way out.
    if (absl::Status s = wal_->health(); !s.ok()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "no snapshot: the write-ahead log failed (", s.message(),
          "); restart the server to recover"));
    }
    RETURN_IF_ERROR(wal_->Sync(wal_->size()));
    for (auto& [name, c] : collections_) {
      absl::MutexLock paused(&c->write_mu);
      ASSIGN_OR_RETURN(std::string bytes, c->index->Snapshot());
      contents.collections.push_back({name, c->index->options(), std::move(bytes)});
    }
    // The log continues in a new generation; the snapshot covers the old.
    // The manifest names it before it takes a change (a deleted log is then
    // found missing); if that cannot be written, the log stays where it is.
    const std::string next_path = WalPath(data_dir_, generation_ + 1);
    ASSIGN_OR_RETURN(std::shared_ptr<WalWriter> next,
                     WalWriter::Open(next_path, 0, wal_options_));
    Manifest with_next = manifest_;
    with_next.current_log = generation_ + 1;
    if (absl::Status s = WriteManifest(data_dir_, with_next, wal_options_.env); !s.ok()) {
      next.reset();
      Env::OrDefault(wal_options_.env)->Unlink(next_path);
      return s;
    }
    manifest_ = with_next;
    std::shared_ptr<WalWriter> old_wal = std::exchange(wal_, std::move(next));
    retired_syncs_.syncs += old_wal->sync_stats().syncs;
    retired_syncs_.seconds += old_wal->sync_stats().seconds;
    contents.generation = ++generation_;
    dir = data_dir_;
  }
  // If this fails (a full disk), the new log generation stays: the older
  // snapshot and every log since it still recover the state.
  SnapshotInfo info{.path = SnapshotPath(dir, contents.generation),
                    .generation = contents.generation};
  ASSIGN_OR_RETURN(info.bytes, WriteSnapshot(info.path, contents, wal_options_.env));
  manifest_.snapshots.push_back(contents.generation);
  RemoveObsoleteFiles(dir, &manifest_, wal_options_.env);
  if (manifest_.snapshots.size() == 1) {
    // The first snapshot: recorded now (RemoveObsoleteFiles records two).
    if (absl::Status s = WriteManifest(dir, manifest_, wal_options_.env); !s.ok()) {
      Log(LogLevel::kWarning, "cannot update the manifest", {{"error", s.ToString()}});
    }
  }
  metrics_->ObserveSnapshot(static_cast<double>(info.bytes), SecondsSince(start));
  return info;
}

absl::StatusOr<std::shared_ptr<Collection>> NegativeMinerService::Find(
    const std::string& raw_name) const {
  ASSIGN_OR_RETURN(std::string name, CollectionName(raw_name));
  absl::MutexLock lock(&mu_);
  auto it = collections_.find(name);
  if (it == collections_.end()) {
    return absl::NotFoundError(
        absl::StrCat("collection '", name, "' not found"));
  }
  return it->second;
}

void NegativeMinerService::UpdateCollectionMetrics(const Collection& c) {
  const IndexStats stats = c.index->Stats();
  metrics_->SetCollection(c.name, static_cast<double>(stats.num_targets),
                          static_cast<double>(stats.version));
}

void NegativeMinerService::RefreshIndexMetrics() {
  std::vector<std::shared_ptr<Collection>> all;
  {
    absl::ReaderMutexLock lock(&mu_);
    for (const auto& [name, c] : collections_) all.push_back(c);
  }
  bool any_gpu = false;
  for (const auto& c : all) {
    metrics_->SetIndex(c->name, c->index->Stats(), c->index->TreeInfo(),
                       c->index->DriftInfo());
    any_gpu = any_gpu || c->index->active_backend() == Backend::kCuda;
  }
  // The GPU's own figures once a collection lives there (asking earlier
  // would create a CUDA context, ~0.5 GB of device memory, for nothing).
  for (int d = 0; any_gpu && d < CudaDeviceCount(); ++d) {
    size_t used = 0, total = 0;
    if (CudaMemoryInfo(d, &used, &total)) metrics_->SetGpuMemory(d, used, total);
  }
}

void NegativeMinerService::FillInfo(const Collection& c,
                                    v1::CollectionInfo* info) const {
  const IndexOptions& o = c.index->options();
  ToWireConfig(c.name, o, info->mutable_config());
  const IndexStats stats = c.index->Stats();
  info->set_num_targets(stats.num_targets);
  info->set_index_version(stats.version);
  info->set_memory_bytes(stats.memory_bytes);
  info->set_active_backend(c.index->active_backend() == Backend::kCuda ? v1::BACKEND_CUDA
                                                                        : v1::BACKEND_CPU);
  info->set_device_memory_bytes(stats.device_memory_bytes);
}

// ------------------------------------------------------------ collections

grpc::ServerUnaryReactor* NegativeMinerService::CreateCollection(grpc::CallbackServerContext* ctx,
                                                    const grpc::ByteBuffer* raw_req,
                                                    grpc::ByteBuffer* raw_resp) {
  return RunUnary<v1::CreateCollectionRequest, v1::CreateCollectionResponse>(
      ctx, "CreateCollection", raw_req, raw_resp,
      [this](const v1::CreateCollectionRequest* req, v1::CreateCollectionResponse* resp) -> absl::Status {
    WalEntry e{.op = WalOp::kCreateCollection};
    ASSIGN_OR_RETURN(e.collection, CollectionName(req->config().name()));
    ASSIGN_OR_RETURN(e.options, ToIndexOptions(req->config()));
    ASSIGN_OR_RETURN(CommitResult r, Commit(e));
    FillInfo(*r.collection, resp->mutable_info());
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* NegativeMinerService::ListCollections(grpc::CallbackServerContext* ctx,
                                                    const grpc::ByteBuffer* raw_req,
                                                    grpc::ByteBuffer* raw_resp) {
  return RunUnary<v1::ListCollectionsRequest, v1::ListCollectionsResponse>(
      ctx, "ListCollections", raw_req, raw_resp,
      [this](const v1::ListCollectionsRequest* req, v1::ListCollectionsResponse* resp) -> absl::Status {
    std::vector<std::shared_ptr<Collection>> all;
    {
      absl::MutexLock lock(&mu_);
      for (auto& [name, c] : collections_) all.push_back(c);
    }
    for (auto& c : all) FillInfo(*c, resp->add_collections());
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* NegativeMinerService::DropCollection(grpc::CallbackServerContext* ctx,
                                                    const grpc::ByteBuffer* raw_req,
                                                    grpc::ByteBuffer* raw_resp) {
  return RunUnary<v1::DropCollectionRequest, v1::DropCollectionResponse>(
      ctx, "DropCollection", raw_req, raw_resp,
      [this](const v1::DropCollectionRequest* req, v1::DropCollectionResponse* resp) -> absl::Status {
    WalEntry e{.op = WalOp::kDropCollection};
    ASSIGN_OR_RETURN(e.collection, CollectionName(req->collection()));
    // In-flight reads that already hold the collection finish on it.
    return Commit(e).status();
  });
}

// ---------------------------------------------------------------- targets

absl::Status NegativeMinerService::DoUpsert(
    const v1::UpsertTargetsRequest& req, const std::string& stream_collection,
    v1::UpsertTargetsResponse* resp) {
  if (req.collection() != stream_collection) {
    return absl::InvalidArgumentError(absl::StrCat(
        "collection = '", req.collection(), "' differs from '",
        stream_collection, "' of the stream's first message"));
  }
  ASSIGN_OR_RETURN(std::shared_ptr<Collection> c, Find(req.collection()));
  WalEntry e{.op = WalOp::kUpsert, .collection = c->name, .model_step = req.model_step()};
  ASSIGN_OR_RETURN(e.vectors, DecodeMatrix(req.vectors(), "vectors", c->index->options().dim));
  if (static_cast<size_t>(req.ids_size()) != req.vectors().rows()) {
    return absl::InvalidArgumentError(
        absl::StrCat("ids has ", req.ids_size(), " entries but vectors.rows = ",
                     req.vectors().rows()));
  }
  e.ids.assign(req.ids().begin(), req.ids().end());
  RETURN_IF_ERROR(Commit(e).status());
  resp->set_upserted(resp->upserted() + req.ids_size());
  resp->set_index_version(c->index->Stats().version);
  return absl::OkStatus();
}

// Reads UpsertTargets messages one at a time; each is parsed and applied on
// the pool before the next read starts, so messages apply in order and a
// slow disk or index backs pressure up to the client. The stream ends OK
// only when the client closed it and every message was applied.
class UpsertReactor final : public grpc::ServerReadReactor<grpc::ByteBuffer> {
 public:
  UpsertReactor(NegativeMinerService* service, grpc::ByteBuffer* out)
      : service_(service), out_(out), start_(Clock::now()) {
    StartRead(reader_.buffer());
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      // The client closed its side: everything it sent has been applied.
      SerializeTo(resp_, out_);
      Finish(absl::OkStatus());
      return;
    }
    absl::Status queued = service_->Enqueue([this] {
      absl::Status status;
      if (!service_->ready()) {
        status = NotReady();
      } else {
        status = reader_.Parse(&request_);
        if (status.ok()) {
          if (first_) {
            stream_collection_ = request_.collection();
            first_ = false;
          }
          status = service_->DoUpsert(request_, stream_collection_, &resp_);
        }
      }
      if (!status.ok()) {
        Fail(status);
        return;
      }
      ++messages_;
      StartRead(reader_.buffer());
    });
    if (!queued.ok()) Fail(queued);
  }

  void OnDone() override { delete this; }

 private:
  // Ends the stream with `status`, saying how much of it was applied.
  void Fail(const absl::Status& status) {
    Finish(absl::Status(status.code(),
                        absl::StrCat(status.message(), " (message ", messages_ + 1,
                                     " of the stream; the ", messages_,
                                     " messages before it were applied, ", resp_.upserted(),
                                     " rows)")));
  }

  void Finish(const absl::Status& status) {
    const grpc::Status g = ToGrpc(status);
    service_->metrics().ObserveRequest("UpsertTargets", CodeName(g.error_code()),
                                       SecondsSince(start_));
    grpc::ServerReadReactor<grpc::ByteBuffer>::Finish(g);
  }

  NegativeMinerService* service_;
  grpc::ByteBuffer* const out_;
  const Clock::time_point start_;
  MessageReader<v1::UpsertTargetsRequest> reader_{"UpsertTargets"};
  v1::UpsertTargetsRequest request_;
  v1::UpsertTargetsResponse resp_;
  std::string stream_collection_;
  bool first_ = true;
  size_t messages_ = 0;
};

grpc::ServerReadReactor<grpc::ByteBuffer>* NegativeMinerService::UpsertTargets(
    grpc::CallbackServerContext* ctx, grpc::ByteBuffer* resp) {
  if (absl::Status auth = Authorize(ctx, "UpsertTargets"); !auth.ok()) {
    return new RejectingReactor<grpc::ServerReadReactor<grpc::ByteBuffer>>(ToGrpc(auth));
  }
  return new UpsertReactor(this, resp);
}

grpc::ServerUnaryReactor* NegativeMinerService::DeleteTargets(grpc::CallbackServerContext* ctx,
                                                    const grpc::ByteBuffer* raw_req,
                                                    grpc::ByteBuffer* raw_resp) {
  return RunUnary<v1::DeleteTargetsRequest, v1::DeleteTargetsResponse>(
      ctx, "DeleteTargets", raw_req, raw_resp,
      [this](const v1::DeleteTargetsRequest* req, v1::DeleteTargetsResponse* resp) -> absl::Status {
    WalEntry e{.op = WalOp::kDelete, .allow_missing = req->allow_missing()};
    ASSIGN_OR_RETURN(e.collection, CollectionName(req->collection()));
    e.ids.assign(req->ids().begin(), req->ids().end());
    ASSIGN_OR_RETURN(CommitResult r, Commit(e));
    resp->set_deleted(r.deleted);
    resp->set_index_version(r.collection->index->Stats().version);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* NegativeMinerService::GetTargets(grpc::CallbackServerContext* ctx,
                                                    const grpc::ByteBuffer* raw_req,
                                                    grpc::ByteBuffer* raw_resp) {
  return RunUnary<v1::GetTargetsRequest, v1::GetTargetsResponse>(
      ctx, "GetTargets", raw_req, raw_resp,
      [this](const v1::GetTargetsRequest* req, v1::GetTargetsResponse* resp) -> absl::Status {
    ASSIGN_OR_RETURN(std::shared_ptr<Collection> c, Find(req->collection()));
    std::vector<float> vectors;
    std::vector<int64_t> steps;
    RETURN_IF_ERROR(c->index->Get(req->ids(), &vectors, &steps));
    if (req->scored()) RETURN_IF_ERROR(c->index->GetScored(req->ids(), &vectors));
    *resp->mutable_ids() = req->ids();
    EncodeMatrix(vectors, req->ids_size(), c->index->options().dim,
                 resp->mutable_vectors());
    resp->mutable_model_steps()->Add(steps.begin(), steps.end());
    return absl::OkStatus();
  });
}

// ----------------------------------------------------------------- mining

absl::Status NegativeMinerService::DoMine(const v1::MineRequest& req, v1::MineResponse* resp,
                                          std::function<bool()> cancelled) {
  resp->set_request_id(req.request_id());
  ASSIGN_OR_RETURN(std::shared_ptr<Collection> c, Find(req.collection()));
  const IndexOptions& o = c->index->options();
  ASSIGN_OR_RETURN(std::vector<float> queries,
                   DecodeMatrix(req.queries(), "queries", o.dim));
  const uint32_t n = req.queries().rows();
  if (n > options_.max_batch) {
    return absl::InvalidArgumentError(absl::StrCat(
        "queries.rows = ", n, " exceeds the server's max_batch = ",
        options_.max_batch));
  }
  if (req.exclude_size() != 0 && static_cast<uint32_t>(req.exclude_size()) != n) {
    return absl::InvalidArgumentError(
        absl::StrCat("exclude has ", req.exclude_size(), " lists for ", n,
                     " queries; send none or one per query"));
  }
  ASSIGN_OR_RETURN(SearchParams params, ToSearchParams(req.params()));
  params.cancelled = std::move(cancelled);
  if (req.params().k() > options_.max_k) {
    return absl::InvalidArgumentError(
        absl::StrCat("params.k = ", req.params().k(),
                     " exceeds the server's max_k = ", options_.max_k));
  }
  params.work_unit_queries = options_.work_unit_queries;
  // Refused up front: a response that could not be sent. Per result at most
  // 18 bytes (an id's varint up to 10, a score and a log q), per query its
  // framing and counts.
  const uint64_t k = req.params().k();
  const uint64_t per_query = 48 + 18 * k;
  if (64 + n * per_query > options_.max_message_bytes) {
    const uint64_t fit = (options_.max_message_bytes - 64) / per_query;
    return absl::InvalidArgumentError(absl::StrCat(
        "the response to queries.rows = ", n, " at params.k = ", k, " could take ",
        64 + n * per_query, " bytes, over the server's max_message_bytes = ",
        options_.max_message_bytes, ": split it into requests of at most ", fit,
        " queries at this k (or lower k)"));
  }
  // The memory this request holds while it is served: its decoded queries,
  // the results and the response (about 56 bytes per result).
  const uint64_t memory = n * (uint64_t{o.dim} * 8 + 56 * k + 128);
  if (memory > options_.max_mine_memory_bytes) {
    const uint64_t fit = options_.max_mine_memory_bytes / (memory / n);
    return absl::InvalidArgumentError(absl::StrCat(
        "queries.rows = ", n, " at dim ", o.dim, " and params.k = ", k, " would hold about ",
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
        "the server is mining requests that hold ", held - memory, " of its max_mine_memory_bytes = ",
        options_.max_mine_memory_bytes, " bytes and this one needs ", memory, "; retry after ",
        kRetryAfterMs, " ms or more, with backoff"));
  }
  if (params.seed == 0) params.seed = Mix64(Clock::now().time_since_epoch().count());
  std::vector<std::vector<uint64_t>> exclude(req.exclude_size());
  for (int i = 0; i < req.exclude_size(); ++i) {
    exclude[i].assign(req.exclude(i).ids().begin(), req.exclude(i).ids().end());
  }
  ASSIGN_OR_RETURN(SearchResult result,
                   c->coalescer ? c->coalescer->Search(queries, exclude, params)
                                : c->index->Search(queries, exclude, params));
  if (result.index_version < req.min_index_version()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "min_index_version = ", req.min_index_version(),
        " is ahead of the index (version ", result.index_version, ")"));
  }
  resp->set_index_version(result.index_version);
  size_t negatives = 0;
  for (QueryResult& q : result.queries) {
    v1::QueryNegatives* out = resp->add_results();
    out->mutable_ids()->Add(q.ids.begin(), q.ids.end());
    out->mutable_scores()->Add(q.scores.begin(), q.scores.end());
    out->mutable_log_q()->Add(q.log_q.begin(), q.log_q.end());
    out->set_num_top(q.num_top);
    out->set_num_eligible(q.num_eligible);
    if (params.want_log_z) {
      out->set_log_z_lo(q.log_z_lo);
      out->set_log_z_hi(q.log_z_hi);
    }
    negatives += q.ids.size();
  }
  metrics_->ObserveMine(n, negatives);
  return absl::OkStatus();
}

grpc::ServerUnaryReactor* NegativeMinerService::Mine(grpc::CallbackServerContext* ctx,
                                                    const grpc::ByteBuffer* raw_req,
                                                    grpc::ByteBuffer* raw_resp) {
  return RunUnary<v1::MineRequest, v1::MineResponse>(
      ctx, "Mine", raw_req, raw_resp,
      [this, ctx](const v1::MineRequest* req, v1::MineResponse* resp) -> absl::Status {
        return DoMine(*req, resp, [ctx] { return ctx->IsCancelled(); });
      },
      /*bulk=*/raw_req->Length() > options_.bulk_request_bytes);
}

// MineStream: each request is parsed and mined on the pool, one at a time per
// stream so that responses keep request order. Responses queue for the one
// write in flight; when kMaxQueuedWrites are waiting (a slow reader), the
// reactor stops reading, so a slow client holds its own memory bounded and
// no worker waits on it. A request that does not parse ends the stream with
// INVALID_ARGUMENT once the answers before it are written; nothing after it
// is read.
class MineStreamReactor final
    : public grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  static constexpr size_t kMaxQueuedWrites = 8;

  MineStreamReactor(NegativeMinerService* service, grpc::CallbackServerContext* ctx)
      : service_(service), ctx_(ctx), start_(Clock::now()) {
    absl::MutexLock lock(&mu_);
    read_outstanding_ = true;
    StartRead(reader_.buffer());
  }

  void OnReadDone(bool ok) override {
    {
      absl::MutexLock lock(&mu_);
      read_outstanding_ = false;
      if (!ok) {
        reads_done_ = true;
        MaybeFinishLocked();
        return;
      }
      task_running_ = true;  // no read starts until Process is done
    }
    absl::Status queued =
        service_->Enqueue([this] { Process(absl::OkStatus()); },
                          reader_.buffer()->Length() > service_->options().bulk_request_bytes);
    if (!queued.ok()) Process(queued);  // this item fails at once; the stream goes on
  }

  void OnWriteDone(bool ok) override {
    absl::MutexLock lock(&mu_);
    queued_.pop_front();
    if (!ok) {
      // The client is gone: drop what is queued and wind down.
      broken_ = true;
      queued_.clear();
    }
    if (!queued_.empty()) {
      StartWrite(queued_.front().get());
    } else {
      writing_ = false;
    }
    MaybeReadLocked();
    MaybeFinishLocked();
  }

  void OnDone() override { delete this; }

 private:
  // Answers the item read last; `refused` (not OK) answers it without work.
  void Process(const absl::Status& refused) {
    auto resp = std::make_unique<v1::MineResponse>();
    const Clock::time_point item_start = Clock::now();
    absl::Status parsed = reader_.Parse(&request_);
    if (!parsed.ok()) {
      service_->metrics().ObserveRequest("MineStream.item", CodeName(grpc::StatusCode::INVALID_ARGUMENT),
                                         SecondsSince(item_start));
      absl::MutexLock lock(&mu_);
      task_running_ = false;
      failed_ = absl::Status(parsed.code(),
                             absl::StrCat(parsed.message(), " (", reader_.count() - 1,
                                          " requests before it were answered)"));
      MaybeFinishLocked();
      return;
    }
    absl::Status status = !refused.ok()         ? refused
                          : service_->ready()   ? service_->DoMine(request_, resp.get(), [this] {
                                                    return ctx_->IsCancelled();
                                                  })
                                                : NotReady();
    if (!status.ok()) {
      resp->Clear();
      resp->set_request_id(request_.request_id());
    }
    resp->mutable_status()->set_code(static_cast<int>(status.code()));
    resp->mutable_status()->set_message(std::string(status.message()));
    service_->metrics().ObserveRequest(
        "MineStream.item", CodeName(static_cast<grpc::StatusCode>(status.code())),
        SecondsSince(item_start));
    auto bytes = std::make_unique<grpc::ByteBuffer>();
    SerializeTo(*resp, bytes.get());
    resp.reset();

    absl::MutexLock lock(&mu_);
    task_running_ = false;
    if (!broken_) {
      queued_.push_back(std::move(bytes));
      if (!writing_) {
        writing_ = true;
        StartWrite(queued_.front().get());
      }
    }
    MaybeReadLocked();
    MaybeFinishLocked();
  }

  void MaybeReadLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (read_outstanding_ || task_running_ || reads_done_ || broken_ || !failed_.ok() ||
        queued_.size() >= kMaxQueuedWrites) {
      return;
    }
    read_outstanding_ = true;
    StartRead(reader_.buffer());
  }

  void MaybeFinishLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (finished_ || read_outstanding_ || task_running_ || writing_) return;
    if (!reads_done_ && !broken_ && failed_.ok()) return;
    finished_ = true;
    const grpc::Status g =
        broken_ ? grpc::Status(grpc::StatusCode::CANCELLED, "client went away")
                : ToGrpc(failed_);
    service_->metrics().ObserveRequest("MineStream", CodeName(g.error_code()),
                                       SecondsSince(start_));
    Finish(g);
  }

  NegativeMinerService* service_;
  grpc::CallbackServerContext* const ctx_;
  const Clock::time_point start_;
  absl::Mutex mu_;
  // Written by the read, then parsed by Process (never both at once).
  MessageReader<v1::MineRequest> reader_{"MineStream"};
  v1::MineRequest request_;
  std::deque<std::unique_ptr<grpc::ByteBuffer>> queued_ ABSL_GUARDED_BY(mu_);
  bool read_outstanding_ ABSL_GUARDED_BY(mu_) = false;
  bool task_running_ ABSL_GUARDED_BY(mu_) = false;
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool reads_done_ ABSL_GUARDED_BY(mu_) = false;
  bool broken_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  // A request that did not parse: the stream's final status.
  absl::Status failed_ ABSL_GUARDED_BY(mu_);
};

grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>*
NegativeMinerService::MineStream(grpc::CallbackServerContext* ctx) {
  if (absl::Status auth = Authorize(ctx, "MineStream"); !auth.ok()) {
    return new RejectingReactor<grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>>(
        ToGrpc(auth));
  }
  return new MineStreamReactor(this, ctx);
}

// ------------------------------------------------------------------ drift

grpc::ServerUnaryReactor* NegativeMinerService::GetLandmarks(grpc::CallbackServerContext* ctx,
                                                    const grpc::ByteBuffer* raw_req,
                                                    grpc::ByteBuffer* raw_resp) {
  return RunUnary<v1::GetLandmarksRequest, v1::GetLandmarksResponse>(
      ctx, "GetLandmarks", raw_req, raw_resp,
      [this](const v1::GetLandmarksRequest* req, v1::GetLandmarksResponse* resp) -> absl::Status {
    WalEntry e{.op = WalOp::kChooseLandmarks};
    ASSIGN_OR_RETURN(e.collection, CollectionName(req->collection()));
    ASSIGN_OR_RETURN(CommitResult r, Commit(e));
    resp->mutable_ids()->Add(r.landmarks.ids.begin(), r.landmarks.ids.end());
    resp->set_landmark_epoch(r.landmarks.epoch);
    resp->set_index_version(r.collection->index->Stats().version);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* NegativeMinerService::ApplyDrift(grpc::CallbackServerContext* ctx,
                                                    const grpc::ByteBuffer* raw_req,
                                                    grpc::ByteBuffer* raw_resp) {
  return RunUnary<v1::ApplyDriftRequest, v1::ApplyDriftResponse>(
      ctx, "ApplyDrift", raw_req, raw_resp,
      [this](const v1::ApplyDriftRequest* req, v1::ApplyDriftResponse* resp) -> absl::Status {
    ASSIGN_OR_RETURN(std::shared_ptr<Collection> c, Find(req->collection()));
    const uint32_t dim = c->index->options().dim;
    WalEntry e{.op = WalOp::kDrift, .collection = c->name, .model_step = req->model_step(),
               .landmark_epoch = req->landmark_epoch()};
    switch (req->update_case()) {
      case v1::ApplyDriftRequest::kLandmarkEmbeddings: {
        ASSIGN_OR_RETURN(e.vectors, DecodeMatrix(req->landmark_embeddings(),
                                                 "landmark_embeddings", dim));
        break;
      }
      case v1::ApplyDriftRequest::kLinearMap: {
        const v1::LinearMap& map = req->linear_map();
        ASSIGN_OR_RETURN(e.linear_a, DecodeMatrix(map.a(), "linear_map.a", dim));
        if (map.a().rows() != dim) {
          return absl::InvalidArgumentError(absl::StrCat(
              "linear_map.a has ", map.a().rows(), " rows; it must be dim x dim = ",
              dim, " x ", dim));
        }
        if (map.has_b()) {
          ASSIGN_OR_RETURN(e.linear_b, DecodeMatrix(map.b(), "linear_map.b", dim));
          if (map.b().rows() != 1) {
            return absl::InvalidArgumentError(absl::StrCat(
                "linear_map.b has ", map.b().rows(), " rows; it must be 1 x dim"));
          }
        }
        break;
      }
      default:
        return absl::InvalidArgumentError(
            "ApplyDrift needs landmark_embeddings or linear_map");
    }
    ASSIGN_OR_RETURN(CommitResult r, Commit(e));
    const DriftReport& report = r.drift;
    resp->set_heldout_residual(report.heldout_residual);
    resp->set_stale_residual(report.stale_residual);
    resp->set_kernel(report.kernel);
    resp->set_lambda(report.lambda);
    resp->set_rebased(report.rebased);
    resp->set_landmark_epoch(report.landmark_epoch);
    resp->set_index_version(report.index_version);
    resp->set_fit_seconds(report.fit_seconds);
    resp->set_apply_seconds(report.apply_seconds);
    metrics_->SetDrift(c->name, req->model_step(), report.heldout_residual,
                      report.rebased);
    Log(LogLevel::kInfo, "drift update", {{"collection", c->name},
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

// Reads the examples, then runs the assignment as a BatchJobs job: the
// call finishes with the batches when the job ends (or, with `async`, at
// once with the job's id).
class AssignBatchesReactor final : public grpc::ServerReadReactor<grpc::ByteBuffer> {
 public:
  AssignBatchesReactor(NegativeMinerService* service, grpc::ByteBuffer* out)
      : service_(service), out_(out), start_(Clock::now()) {
    StartRead(reader_.buffer());
  }

  void OnReadDone(bool ok) override {
    absl::Status status = !ok ? Run() : reader_.Parse(&request_);
    if (ok && status.ok()) status = Take();
    if (!status.ok()) {
      Finish(status);
    } else if (ok) {
      StartRead(reader_.buffer());
    }
  }

  void OnCancel() override {
    absl::MutexLock lock(&mu_);
    if (job_ != nullptr) job_->cancel = true;
  }

  void OnDone() override { delete this; }

 private:
  // One message: the first carries the options; every one a chunk of rows.
  absl::Status Take() {
    if (!service_->ready()) return NotReady();
    const v1::AssignBatchesRequest& r = request_;
    if (messages_++ == 0) {
      if (r.batch_size() == 0) {
        return absl::InvalidArgumentError("batch_size = 0: set it (>= 1) in the first message");
      }
      options_.batch_size = static_cast<int>(std::min<uint32_t>(r.batch_size(), 1 << 30));
      options_.seed = r.seed() != 0 ? r.seed() : 1;
      if (r.params().neighbors() > 0) {
        options_.neighbors = static_cast<int>(std::min<uint32_t>(r.params().neighbors(), 4096));
      }
      options_.quantile = r.params().quantile();
      if (r.params().beam_width() > 0) {
        options_.beam_width = static_cast<int>(std::min<uint32_t>(r.params().beam_width(), 1 << 20));
      }
      options_.shuffle_batches = !r.params().keep_batch_order();
      async_ = r.async();
      dim_ = r.queries().cols();
      if (dim_ == 0 || dim_ > IndexOptions::kMaxDim) {
        return absl::InvalidArgumentError(absl::StrCat(
            "queries.cols = ", dim_, " must be in [1, ", IndexOptions::kMaxDim, "]"));
      }
    }
    const std::string where = absl::StrCat(" (message ", messages_, ")");
    ASSIGN_OR_RETURN(std::vector<float> q, DecodeMatrix(r.queries(), "queries", dim_));
    ASSIGN_OR_RETURN(std::vector<float> p, DecodeMatrix(r.positives(), "positives", dim_));
    if (r.queries().rows() != r.positives().rows()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "queries.rows = ", r.queries().rows(), " but positives.rows = ",
          r.positives().rows(), where, "; every example needs both"));
    }
    const uint64_t total = queries_.size() / dim_ + r.queries().rows();
    if (total > service_->options().max_batch_examples) {
      return absl::ResourceExhaustedError(absl::StrCat(
          total, " examples exceed the server's max_batch_examples = ",
          service_->options().max_batch_examples));
    }
    queries_.insert(queries_.end(), q.begin(), q.end());
    positives_.insert(positives_.end(), p.begin(), p.end());
    return absl::OkStatus();
  }

  // The client closed its side: start the job.
  absl::Status Run() {
    if (queries_.empty()) {
      return absl::InvalidArgumentError("AssignBatches got no examples");
    }
    const size_t n = queries_.size() / dim_;
    if (!async_ && n > service_->options().max_sync_batch_examples) {
      return absl::ResourceExhaustedError(absl::StrCat(
          n, " examples exceed the server's max_sync_batch_examples = ",
          service_->options().max_sync_batch_examples,
          "; set async and poll GetBatchJob"));
    }
    std::function<void(BatchJobs::Job&)> on_done;
    if (!async_) {
      on_done = [this](BatchJobs::Job& job) {
        { absl::MutexLock gate(&mu_); }  // Run has finished with the reactor
        absl::Status status;
        {
          absl::MutexLock lock(&job.mu);
          status = job.status;
          if (status.ok()) SerializeTo(job.result, out_);
        }
        Finish(status);
      };
    }
    {
      absl::MutexLock lock(&mu_);
      ASSIGN_OR_RETURN(job_, service_->batch_jobs().Start(std::move(queries_),
                                                          std::move(positives_), dim_,
                                                          options_, std::move(on_done)));
      Log(LogLevel::kInfo, "batch assignment started",
          {{"job", job_->id}, {"examples", absl::StrCat(n)},
           {"batch_size", absl::StrCat(options_.batch_size)},
           {"async", async_ ? "true" : "false"}});
      if (!async_) return absl::OkStatus();
      v1::AssignBatchesResponse resp;
      resp.set_job_id(job_->id);
      resp.set_num_examples(n);
      SerializeTo(resp, out_);
    }
    Finish(absl::OkStatus());
    return absl::OkStatus();
  }

  void Finish(const absl::Status& status) {
    const grpc::Status g = ToGrpc(status);
    service_->metrics().ObserveRequest("AssignBatches", CodeName(g.error_code()),
                                       SecondsSince(start_));
    grpc::ServerReadReactor<grpc::ByteBuffer>::Finish(g);
  }

  NegativeMinerService* service_;
  grpc::ByteBuffer* const out_;
  const Clock::time_point start_;
  MessageReader<v1::AssignBatchesRequest> reader_{"AssignBatches"};
  v1::AssignBatchesRequest request_;
  size_t messages_ = 0;
  uint32_t dim_ = 0;
  bool async_ = false;
  BatchOptions options_;
  std::vector<float> queries_, positives_;
  absl::Mutex mu_;
  std::shared_ptr<BatchJobs::Job> job_ ABSL_GUARDED_BY(mu_);
};

grpc::ServerReadReactor<grpc::ByteBuffer>* NegativeMinerService::AssignBatches(
    grpc::CallbackServerContext* ctx, grpc::ByteBuffer* resp) {
  if (absl::Status auth = Authorize(ctx, "AssignBatches"); !auth.ok()) {
    return new RejectingReactor<grpc::ServerReadReactor<grpc::ByteBuffer>>(ToGrpc(auth));
  }
  return new AssignBatchesReactor(this, resp);
}

grpc::ServerUnaryReactor* NegativeMinerService::GetBatchJob(grpc::CallbackServerContext* ctx,
                                                    const grpc::ByteBuffer* raw_req,
                                                    grpc::ByteBuffer* raw_resp) {
  return RunUnary<v1::GetBatchJobRequest, v1::GetBatchJobResponse>(
      ctx, "GetBatchJob", raw_req, raw_resp,
      [this](const v1::GetBatchJobRequest* req, v1::GetBatchJobResponse* resp) -> absl::Status {
    std::shared_ptr<BatchJobs::Job> job = batch_jobs_->Find(req->job_id());
    if (job == nullptr) {
      return absl::NotFoundError(absl::StrCat(
          "batch job '", req->job_id(), "' not found (finished jobs are kept for a while only)"));
    }
    absl::MutexLock lock(&job->mu);
    resp->set_progress(job->progress.load());
    if (!job->done) {
      resp->set_state(v1::JOB_STATE_RUNNING);
    } else if (job->status.ok()) {
      resp->set_state(v1::JOB_STATE_DONE);
      *resp->mutable_result() = job->result;
    } else {
      resp->set_state(v1::JOB_STATE_FAILED);
      resp->mutable_error()->set_code(static_cast<int>(job->status.code()));
      resp->mutable_error()->set_message(std::string(job->status.message()));
    }
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* NegativeMinerService::GetIndexInfo(grpc::CallbackServerContext* ctx,
                                                    const grpc::ByteBuffer* raw_req,
                                                    grpc::ByteBuffer* raw_resp) {
  return RunUnary<v1::GetIndexInfoRequest, v1::GetIndexInfoResponse>(
      ctx, "GetIndexInfo", raw_req, raw_resp,
      [this](const v1::GetIndexInfoRequest* req, v1::GetIndexInfoResponse* resp) -> absl::Status {
    ASSIGN_OR_RETURN(std::shared_ptr<Collection> c, Find(req->collection()));
    FillInfo(*c, resp->mutable_info());
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

grpc::ServerUnaryReactor* NegativeMinerService::CreateSnapshot(grpc::CallbackServerContext* ctx,
                                                    const grpc::ByteBuffer* raw_req,
                                                    grpc::ByteBuffer* raw_resp) {
  return RunUnary<v1::CreateSnapshotRequest, v1::CreateSnapshotResponse>(
      ctx, "CreateSnapshot", raw_req, raw_resp,
      [this](const v1::CreateSnapshotRequest* req, v1::CreateSnapshotResponse* resp) -> absl::Status {
    std::shared_ptr<Collection> c;
    if (!req->collection().empty()) {
      ASSIGN_OR_RETURN(c, Find(req->collection()));
    }
    ASSIGN_OR_RETURN(SnapshotInfo info, TakeSnapshot());
    resp->set_path(info.path);
    resp->set_bytes(info.bytes);
    if (c != nullptr) resp->set_index_version(c->index->Stats().version);
    Log(LogLevel::kInfo, "snapshot", {{"path", info.path}, {"bytes", absl::StrCat(info.bytes)}});
    return absl::OkStatus();
  });
}

}  // namespace negmine::server
