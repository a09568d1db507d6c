// Snapshot files: every collection's options and index state (Index::
// Snapshot) at one moment, so that recovery loads them and replays only the
// write-ahead log written after it.
//
// Layout of <data_dir>/snapshot-<generation>.snap (core/persist/bytes.h):
//   "NEGMSNAP", u32 format version (1), u64 generation (the log generation
//   that continues after this snapshot), u64 collection count, then per
//   collection: name, IndexOptions, the index bytes; last, u32 crc32c of
//   everything before it.
// Written to a temporary file, fsynced, renamed into place and the directory
// fsynced: a crash leaves the old snapshot or the new one, never a mix.
//
// Thread safety: pure functions.
#ifndef NEGMINE_CORE_PERSIST_SNAPSHOT_H_
#define NEGMINE_CORE_PERSIST_SNAPSHOT_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/index.h"
#include "core/persist/env.h"

namespace negmine {

struct SnapshotCollection {
  std::string name;
  IndexOptions options;
  std::string index;  // Index::Snapshot
};

struct SnapshotContents {
  uint64_t generation = 0;
  std::vector<SnapshotCollection> collections;
};

// Writes `contents` to `path` atomically, through `env` (null: POSIX);
// returns the bytes written. On failure nothing is left behind (the
// temporary file is removed) and an older snapshot at `path` stays.
absl::StatusOr<uint64_t> WriteSnapshot(const std::string& path, const SnapshotContents& contents,
                                       Env* env = nullptr);
// fsyncs the directory `dir` (a rename or a new file in it is durable).
absl::Status SyncDir(const std::string& dir, Env* env = nullptr);
//   DATA_LOSS: a bad checksum, magic or layout (the message names the file).
absl::StatusOr<SnapshotContents> ReadSnapshot(const std::string& path);

}  // namespace negmine

#endif  // NEGMINE_CORE_PERSIST_SNAPSHOT_H_
