// The data dir's files and recovery.
//
//   <data_dir>/LOCK                     flock: one server per data dir
//   <data_dir>/wal-<generation>.log     the write-ahead log, one file per generation
//   <data_dir>/snapshot-<generation>.snap  every collection as of the start of
//                                       that log generation
//
// Recovery loads the newest snapshot, then replays the logs from its
// generation on, in order (a torn tail is allowed, and cut, only at the end
// of the last one). With no snapshot it replays every log from generation 1.
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
#include <string>

#include "absl/status/status.h"
#include "core/persist/wal.h"

namespace negmine::server {

class NegativeMinerService;

std::string WalPath(const std::string& dir, uint64_t generation);
std::string SnapshotPath(const std::string& dir, uint64_t generation);

// Recovers `dir` into `service` and hands it the log to continue.
absl::Status Recover(NegativeMinerService& service, const std::string& dir,
                     const WalWriter::Options& options);

// Deletes what recovery no longer needs once the snapshot of `newest`
// generation is durable (see above). Failures are logged, not fatal.
void RemoveObsoleteFiles(const std::string& dir, uint64_t newest);

}  // namespace negmine::server

#endif  // NEGMINE_SERVER_DURABILITY_H_
