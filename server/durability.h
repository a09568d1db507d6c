// The data dir's files and recovery.
//
//   <data_dir>/LOCK                     flock: one server per data dir
//   <data_dir>/MANIFEST                 what the dir must hold (below)
//   <data_dir>/wal-<generation>.log     the write-ahead log, one file per generation
//   <data_dir>/snapshot-<generation>.snap  every collection as of the start of
//                                       that log generation
//
// The manifest is the durable record of the files recovery needs: the log
// generations first_log..current_log, and the snapshots kept. It is
// rewritten (a temporary file, fsynced, renamed, the dir fsynced) before a
// new log generation takes a change, and before files are deleted, so it
// never names less than the dir must hold. A start that finds a file it
// names missing stops with DATA_LOSS naming it, instead of starting with
// less (a deleted log used to start the server empty). The one exception is
// the documented repair: the newest snapshot moved aside while an older one
// and every log since it remain (logged as a warning). A data dir without a
// manifest (written before it existed) is recovered from what it holds,
// and gets one.
//
// Recovery loads the newest snapshot, then replays the logs from its
// generation on, in order (a torn tail is allowed, and cut, only at the end
// of the last one; so is a last record that the index refuses: a change is
// fsynced before it is applied and cut back off when refused, so a server
// stopped between the two leaves it there, unacknowledged). With no
// snapshot it replays every log from generation 1.
// A damaged snapshot or log stops the start with DATA_LOSS naming the file;
// nothing is skipped silently. After a new snapshot, the files the snapshot
// before it does not need are deleted: the two newest snapshots and the logs
// from the older one on stay, so an operator can move a damaged newest
// snapshot aside and recover from the previous one. A successful recovery
// prunes the same way (a crash may have come between a snapshot and its
// pruning).
//
// Thread safety: Recover runs before serving; the rest are pure.
#ifndef NEGMINE_SERVER_DURABILITY_H_
#define NEGMINE_SERVER_DURABILITY_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "core/persist/wal.h"

namespace negmine::server {

class NegativeMinerService;

std::string WalPath(const std::string& dir, uint64_t generation);
std::string SnapshotPath(const std::string& dir, uint64_t generation);
std::string ManifestPath(const std::string& dir);

// What the data dir must hold.
struct Manifest {
  uint64_t first_log = 1;           // the oldest log generation kept
  uint64_t current_log = 1;         // the generation being written
  std::vector<uint64_t> snapshots;  // the snapshots kept, ascending
};
// Writes `m` atomically through `env` (null: POSIX).
absl::Status WriteManifest(const std::string& dir, const Manifest& m, Env* env);
// The manifest of `dir`; nullopt when there is none. DATA_LOSS: it does
// not parse or its checksum fails.
absl::StatusOr<std::optional<Manifest>> ReadManifest(const std::string& dir);

// Recovers `dir` into `service` and hands it the log to continue.
absl::Status Recover(NegativeMinerService& service, const std::string& dir,
                     const WalWriter::Options& options);

// Once the snapshot of `m->snapshots.back()` is durable: keeps the newest
// two snapshots and the logs from the older one on, records that in the
// manifest, then deletes the rest (see above). Failures are logged, not
// fatal (and nothing is deleted if the manifest cannot be written).
void RemoveObsoleteFiles(const std::string& dir, Manifest* m, Env* env);

}  // namespace negmine::server

#endif  // NEGMINE_SERVER_DURABILITY_H_
