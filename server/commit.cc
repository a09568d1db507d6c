#include "server/commit.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "core/status.h"
#include "server/log.h"
#include "server/rpc.h"

namespace negmine::server {

void PublishCollection(Metrics& metrics, const Collection& c) {
  metrics.SetCollection(c.name, static_cast<double>(c.index->Stats().num_targets),
                        static_cast<double>(IndexVersion(c)));
}

absl::StatusOr<CommitResult> CommitPath::Apply(const WalEntry& e, const LogStep& log) {
  CommitResult out;
  // Only changes (Commit, under commit_mu_; recovery, before serving) add
  // or remove collections, so the name checked here is still free (or
  // still taken) after the log step. That step fsyncs, and runs outside the
  // registry's lock so that it does not stall every lookup.
  const auto none = [] { return absl::OkStatus(); };
  if (e.op == WalOp::kCreateCollection) {
    ASSIGN_OR_RETURN(out.collection, registry_->Make(e.collection, e.options));
    if (registry_->Find(out.collection->name).ok()) {
      return absl::AlreadyExistsError(
          absl::StrCat("collection '", out.collection->name, "' already exists"));
    }
    RETURN_IF_ERROR(log());
    if (absl::Status s = registry_->Insert(out.collection, none); !s.ok()) {
      out.refused = s;
      out.retract = true;
    }
    return out;
  }
  if (e.op == WalOp::kDropCollection) {
    ASSIGN_OR_RETURN(out.collection, registry_->Find(e.collection));
    RETURN_IF_ERROR(log());
    // In-flight reads that already hold the collection finish on it.
    absl::StatusOr<std::shared_ptr<Collection>> erased = registry_->Erase(e.collection, none);
    if (!erased.ok()) {
      out.refused = erased.status();
      out.retract = true;
    }
    return out;
  }
  return ApplyToCollection(e, log);
}

absl::StatusOr<CommitResult> CommitPath::ApplyToCollection(const WalEntry& e,
                                                           const LogStep& log) {
  CommitResult out;
  ASSIGN_OR_RETURN(out.collection, registry_->Find(e.collection));
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
  // The record is appended and made durable first, and the change applied
  // only if both succeeded, so a change the log refused (a full disk, a
  // failed fsync) is never seen. A change that the index then refuses (a
  // bad id, a stale epoch) is cut back off the log.
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
      // A drift update takes seconds at a million targets: say so where an
      // operator looks, at its start (its end is logged with its figures).
      Log(LogLevel::kInfo, "drift update started",
          {{"collection", c.name},
           {"model_step", absl::StrCat(e.model_step)},
           {"landmarks", absl::StrCat(e.vectors.size() / std::max(1, c.index->options().dim))},
           {"linear_map", e.linear_a.empty() ? "false" : "true"},
           {"targets", absl::StrCat(c.index->Stats().num_targets)}});
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

absl::StatusOr<CommitResult> CommitPath::Commit(const WalEntry& entry) {
  std::shared_ptr<WalWriter> used;
  uint64_t start = 0;
  absl::StatusOr<CommitResult> out;
  {
    // Appends and applies in one order: the log's order is the order the
    // changes were applied in, and nothing is appended after a record
    // while its change is applied (so a refused one can be cut back off).
    waiting_.fetch_add(1);
    absl::MutexLock order(&commit_mu_);
    waiting_.fetch_sub(1);
    const std::shared_ptr<WalWriter> wal = CurrentLog();
    if (wal != nullptr) {
      if (absl::Status s = wal->health(); !s.ok()) {
        NoteWritable(false, s);
        return absl::InternalError(absl::StrCat(
            "the write-ahead log failed (", s.message(),
            "); no change is accepted until the server restarts and recovers"));
      }
    }
    const std::string payload = wal != nullptr ? EncodeWalEntry(entry) : std::string();
    // Appends the record and waits until it is durable, before the change
    // is applied: a change whose fsync failed is never seen, and the log
    // cuts its record off (core/persist/wal.h), so a restart does not bring
    // it back either. The fsync runs under commit_mu_, so changes do not
    // share fsyncs; the order is what lets a refused change be cut back.
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
      if (absl::Status s = wal->Sync(*appended); !s.ok()) {
        NoteWritable(false, s);
        return absl::InternalError(absl::StrCat(
            "the write-ahead log could not be synced (", s.message(),
            "): this change was not applied; no change is accepted until the server restarts "
            "and recovers"));
      }
      used = wal;
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
  if (used != nullptr) NoteWritable(true, absl::OkStatus());
  if (entry.op == WalOp::kDropCollection) {
    metrics_->RemoveCollection(entry.collection);
  } else {
    PublishCollection(*metrics_, *out->collection);
  }
  return out;
}

void CommitPath::NoteWritable(bool writable, const absl::Status& why) {
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

void CommitPath::OnWritableChange(std::function<void(bool)> callback) {
  absl::MutexLock lock(&callback_mu_);
  on_writable_change_ = std::move(callback);
}

absl::Status CommitPath::Replay(const WalEntry& entry, bool* refused) {
  LogStep none = [] { return absl::OkStatus(); };
  ASSIGN_OR_RETURN(CommitResult out, Apply(entry, none));
  if (!out.refused.ok()) {
    if (refused != nullptr) *refused = true;
    return out.refused;
  }
  if (entry.op != WalOp::kDropCollection) PublishCollection(*metrics_, *out.collection);
  return absl::OkStatus();
}

void CommitPath::SetDurability(std::string data_dir, uint64_t generation,
                               std::shared_ptr<WalWriter> wal, const WalWriter::Options& options,
                               const Manifest& manifest) {
  absl::MutexLock snapshots(&snapshot_mu_);
  absl::MutexLock order(&commit_mu_);
  manifest_ = manifest;
  data_dir_ = std::move(data_dir);
  wal_options_ = options;
  generation_ = generation;
  {
    absl::MutexLock lock(&wal_mu_);
    wal_ = std::move(wal);
  }
  metrics_->SetWalWritable(true);
}

absl::Status CommitPath::Restore(const SnapshotCollection& snapshot) {
  ASSIGN_OR_RETURN(std::shared_ptr<Collection> c, registry_->Make(snapshot.name, snapshot.options));
  RETURN_IF_ERROR(c->index->Restore(snapshot.index));
  absl::Status inserted = registry_->Insert(c, [] { return absl::OkStatus(); });
  if (absl::IsAlreadyExists(inserted)) {
    return absl::DataLossError(absl::StrCat("the snapshot holds '", c->name, "' twice"));
  }
  RETURN_IF_ERROR(inserted);
  PublishCollection(*metrics_, *c);
  return absl::OkStatus();
}

absl::StatusOr<CommitPath::SnapshotInfo> CommitPath::TakeSnapshot() {
  absl::MutexLock one_at_a_time(&snapshot_mu_);
  const Clock::time_point start = Clock::now();
  SnapshotContents contents;
  {
    // Pause every writer while the indexes are copied and the log switches.
    // Collections are created and dropped only by commits, so the registry
    // does not change meanwhile; its lock is not held, so reads go on.
    absl::MutexLock order(&commit_mu_);
    const std::shared_ptr<WalWriter> wal = CurrentLog();
    if (wal == nullptr) {
      return absl::FailedPreconditionError("this server keeps no write-ahead log");
    }
    // The log the snapshot covers must be whole and durable before a later
    // generation follows it (recovery allows a torn tail only in the last
    // log): a log that failed for good may end in garbage, so no snapshot
    // switches away from it; the restart that recovers it is the way out.
    if (absl::Status s = wal->health(); !s.ok()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "no snapshot: the write-ahead log failed (", s.message(),
          "); restart the server to recover"));
    }
    RETURN_IF_ERROR(wal->Sync(wal->size()));
    for (const std::shared_ptr<Collection>& c : registry_->List()) {
      absl::MutexLock paused(&c->write_mu);
      ASSIGN_OR_RETURN(std::string bytes, c->index->Snapshot());
      contents.collections.push_back({c->name, c->index->options(), std::move(bytes)});
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
    {
      absl::MutexLock lock(&wal_mu_);
      retired_syncs_.syncs += wal->sync_stats().syncs;
      retired_syncs_.seconds += wal->sync_stats().seconds;
      wal_ = std::move(next);
    }
    contents.generation = ++generation_;
  }
  // If this fails (a full disk), the new log generation stays: the older
  // snapshot and every log since it still recover the state.
  SnapshotInfo info{.path = SnapshotPath(data_dir_, contents.generation),
                    .generation = contents.generation};
  ASSIGN_OR_RETURN(info.bytes, WriteSnapshot(info.path, contents, wal_options_.env));
  manifest_.snapshots.push_back(contents.generation);
  RemoveObsoleteFiles(data_dir_, &manifest_, wal_options_.env);
  if (manifest_.snapshots.size() == 1) {
    // The first snapshot: recorded now (RemoveObsoleteFiles records two).
    if (absl::Status s = WriteManifest(data_dir_, manifest_, wal_options_.env); !s.ok()) {
      Log(LogLevel::kWarning, "cannot update the manifest", {{"error", s.ToString()}});
    }
  }
  metrics_->ObserveSnapshot(static_cast<double>(info.bytes), SecondsSince(start));
  return info;
}

uint64_t CommitPath::PublishWalMetrics() {
  absl::MutexLock lock(&wal_mu_);
  if (wal_ == nullptr) return 0;
  const uint64_t bytes = wal_->size();
  const WalWriter::SyncStats sync = wal_->sync_stats();
  metrics_->SetWal(static_cast<double>(bytes),
                   static_cast<double>(retired_syncs_.syncs + sync.syncs),
                   retired_syncs_.seconds + sync.seconds);
  metrics_->SetCommitsWaiting(waiting());
  return bytes;
}

}  // namespace negmine::server
