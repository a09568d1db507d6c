// The commit path: the one way every change of state is made (RPCs, the
// embedded default collection, recovery), its write-ahead log, and the
// snapshots that let the log be cut.
//
//   Commit(entry): log the record, fsync it, apply the change, answer.
//   Replay(entry): apply a logged record again, in recovery.
//   TakeSnapshot: copy every index, continue the log in a new generation.
//
// Lock order: snapshot_mu_, commit_mu_, the registry's lock, a collection's
// write_mu, wal_mu_ (a leaf), callback_mu_ (a leaf).
//
// Thread safety: every method may be called from any thread. A change
// holds commit_mu_ across its fsync and its application, so the changes
// behind it wait (a drift fit for seconds; concurrent changes do not share
// an fsync); reads never take commit_mu_, and the metrics read the log
// under wal_mu_ only.
#ifndef NEGMINE_SERVER_COMMIT_H_
#define NEGMINE_SERVER_COMMIT_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "core/index.h"
#include "core/persist/snapshot.h"
#include "core/persist/wal.h"
#include "core/persist/wal_entry.h"
#include "server/durability.h"
#include "server/metrics.h"
#include "server/registry.h"

namespace negmine::server {

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

// Publishes a collection's size and version to the metrics.
void PublishCollection(Metrics& metrics, const Collection& c);

class CommitPath {
 public:
  // `registry` and `metrics` outlive this.
  CommitPath(CollectionRegistry* registry, Metrics* metrics)
      : registry_(registry), metrics_(metrics) {}

  // Logs every committed change from now on to `wal`, log generation
  // `generation` in `data_dir` (see server/durability.h). Set before serving.
  // `manifest` is what the dir holds now; snapshots keep it up to date.
  void SetDurability(std::string data_dir, uint64_t generation, std::shared_ptr<WalWriter> wal,
                     const WalWriter::Options& options, const Manifest& manifest);

  // Logs one change, waits until its log record is durable, then applies
  // it. A change is applied only once its record is durable, so a change
  // the log refuses is never seen:
  //   RESOURCE_EXHAUSTED: the log cannot be written (a full disk); the
  //     record was cut back off and nothing changed. Writes are retried
  //     with backoff and resume by themselves once the disk has room.
  //   INTERNAL: the log failed for good (a failed fsync): the change was
  //     not applied, and its record was cut off the log, so a restart of
  //     the server does not replay it (unless the message says the cut
  //     failed too; see core/persist/wal.h for a crash of the machine).
  //     Every later change fails the same way until a restart recovers.
  // A change the index refuses is cut back off the log, and its error is
  // returned. The state is published as negmine_wal_writable, logged at
  // each transition, and passed to OnWritableChange's callback.
  absl::StatusOr<CommitResult> Commit(const WalEntry& entry);
  // Recovery: applies a logged change again, without logging it. When the
  // index refuses it (nothing changed: a change that Commit cut back off
  // the log, where the server stopped before the cut), sets *refused (if
  // given) and returns the refusal.
  absl::Status Replay(const WalEntry& entry, bool* refused = nullptr);
  // Recovery: adds a collection from a snapshot.
  absl::Status Restore(const SnapshotCollection& snapshot);

  // `callback(writable)` at each change of the log's writability (from the
  // thread that saw it).
  void OnWritableChange(std::function<void(bool)> callback);

  struct SnapshotInfo {
    std::string path;
    uint64_t bytes = 0;
    uint64_t generation = 0;
  };
  // Writes every collection to a new snapshot file, continues the log in a
  // new generation, and deletes the files no longer needed (the snapshot
  // before the previous one and the logs it needed). Writers pause only
  // while the indexes are copied; queries go on.
  absl::StatusOr<SnapshotInfo> TakeSnapshot();

  // Publishes the log's size and fsyncs to the metrics; returns the size of
  // the current generation (0 without a log).
  uint64_t PublishWalMetrics();

  // Commits waiting for the one before them to finish (a gauge for the
  // metrics, and what tests wait on to see a change queued).
  int waiting() const { return waiting_.load(); }

 private:
  using LogStep = std::function<absl::Status()>;
  // Commit's and Replay's work: applies `entry`, calling `log` once the
  // change is validated, just before it changes anything.
  absl::StatusOr<CommitResult> Apply(const WalEntry& entry, const LogStep& log);
  absl::StatusOr<CommitResult> ApplyToCollection(const WalEntry& entry, const LogStep& log);
  // Publishes a change of the log's writability (metric, log line, callback).
  void NoteWritable(bool writable, const absl::Status& why);
  std::shared_ptr<WalWriter> CurrentLog() const {
    absl::MutexLock lock(&wal_mu_);
    return wal_;
  }

  CollectionRegistry* const registry_;
  Metrics* const metrics_;

  absl::Mutex snapshot_mu_ ABSL_ACQUIRED_BEFORE(commit_mu_);  // one TakeSnapshot at a time
  Manifest manifest_ ABSL_GUARDED_BY(snapshot_mu_);
  // Held by Commit across appending a record, its fsync and applying its
  // change, and by TakeSnapshot while it switches logs: orders the log, and
  // lets a refused change's record be cut back off (nothing follows it yet).
  absl::Mutex commit_mu_;
  uint64_t generation_ ABSL_GUARDED_BY(commit_mu_) = 0;
  std::atomic<int> waiting_{0};
  std::atomic<bool> writable_{true};
  // Set by SetDurability before serving, then only read.
  std::string data_dir_;
  WalWriter::Options wal_options_;
  // The log: replaced only by TakeSnapshot, holding commit_mu_ and wal_mu_,
  // so whoever holds commit_mu_ for an Append reads a stable pointer.
  mutable absl::Mutex wal_mu_;
  std::shared_ptr<WalWriter> wal_ ABSL_GUARDED_BY(wal_mu_);
  WalWriter::SyncStats retired_syncs_ ABSL_GUARDED_BY(wal_mu_);  // of older generations
  absl::Mutex callback_mu_;
  std::function<void(bool)> on_writable_change_ ABSL_GUARDED_BY(callback_mu_);
};

}  // namespace negmine::server

#endif  // NEGMINE_SERVER_COMMIT_H_
