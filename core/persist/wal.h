// The write-ahead log: every acknowledged change of the server, in order, so
// that a restart replays what was acknowledged before a crash.
//
// File format (one file per log generation), a sequence of records:
//
//   offset 0        4      5             9              13
//          [length ][type ][header crc  ][payload crc  ][payload: length bytes]
//           u32 LE   u8     u32 LE        u32 LE
//
// Both checksums are crc32c (Castagnoli): the header's over its first 5
// bytes, the payload's over the payload. The payload encodings are in
// core/persist/wal_entry.h; this layer only frames records.
//
// Reading (ReadWal) goes record by record to the end of the file. A crash
// while appending leaves a torn tail: a header cut short, a genuine header
// (its checksum holds) whose payload runs past the end of the file, or a
// region of zeros (pages never written). That tail is reported and the
// caller cuts it off. Anything else that fails a checksum is corruption:
// DATA_LOSS naming the offset, also in the last record when all of its
// bytes are present (a torn write ends the file inside its record); nothing
// is loaded silently, and no record after a bad one is dropped quietly.
//
// Writing (WalWriter): Append writes a record to the file (the page cache)
// and returns its end offset; Sync(offset) makes everything up to it
// durable. A write that fails or stops short (a full disk) is cut back off
// the file at once, so the file always ends with a whole record; the writer
// then refuses appends for a backoff (doubling per failure) and the first
// append after it tries the disk again: writes resume by themselves once
// there is room. A failed fsync, or a cut that fails, is final: the kernel
// may have dropped the pages, so the log takes nothing more until a
// restart. A failed fsync fails every Sync not yet covered, and cuts the
// file back to the end of the last durable record: the records after it
// belong to changes answered as failed, and a restart (recovery reads the
// file) must not replay them, although the kernel may still hold their
// pages. If that cut fails too, the error says so, and those records may
// be replayed. After a crash of the machine (not only of the server)
// following a failed fsync, what the disk holds past the last durable
// record is not known: a record that reached it whole would be replayed.
// Every file call goes through an Env (core/persist/env.h), so tests
// inject these faults. Concurrent Syncs share one fdatasync (group
// commit): a Sync that finds one in progress waits for it, and the next
// covers every record appended meanwhile. With a group-commit window, a
// Sync first waits that long for more records to share its fdatasync.
//
// Thread safety: WalWriter's methods may be called from any thread; Append
// calls are serialized (callers that need an order between two records hold
// their own lock across both Appends). ReadWal is pure.
#ifndef NEGMINE_CORE_PERSIST_WAL_H_
#define NEGMINE_CORE_PERSIST_WAL_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "core/persist/env.h"

namespace negmine {

// CRC-32C (Castagnoli) of `data`, continuing from `crc` (0 to start).
uint32_t Crc32c(absl::Span<const uint8_t> data, uint32_t crc = 0);

struct WalRecord {
  uint8_t type = 0;
  std::string payload;
  uint64_t offset = 0;  // where the record starts in the file
};

struct WalContents {
  std::vector<WalRecord> records;
  uint64_t valid_bytes = 0;  // the records' extent: the file is cut here
  uint64_t torn_bytes = 0;   // a torn tail after them (0: none)
};

// Records larger than this are corruption (a garbled length).
constexpr uint32_t kMaxWalRecordBytes = 1u << 30;

// Reads the log at `path`; a missing file is an empty log.
//   DATA_LOSS: corruption before the tail (the message names the offset).
//   Other codes: I/O errors.
absl::StatusOr<WalContents> ReadWal(const std::string& path);

class WalWriter {
 public:
  enum class SyncPolicy {
    kAlways,  // Sync fdatasyncs (group commit): the default, and safe
    kNever,   // Sync returns at once: the OS writes back (unsafe on a crash of the machine)
  };
  struct Options {
    SyncPolicy sync = SyncPolicy::kAlways;
    // kAlways: wait this long for more records to share an fdatasync.
    absl::Duration group_commit_window = absl::ZeroDuration();
    // After a failed write (cut back off the file), appends are refused
    // without touching the disk for retry_backoff, doubled at each further
    // failure up to max_retry_backoff; the next append then tries again.
    absl::Duration retry_backoff = absl::Milliseconds(100);
    absl::Duration max_retry_backoff = absl::Seconds(5);
    // The file system (null: Env::Default(), POSIX). Not owned.
    Env* env = nullptr;
  };

  // Opens `path` for appending, first cutting it to `valid_bytes` (from
  // ReadWal: drops a torn tail). Creates the file if missing.
  static absl::StatusOr<std::unique_ptr<WalWriter>> Open(const std::string& path,
                                                         uint64_t valid_bytes,
                                                         const Options& options);
  ~WalWriter();

  // Appends one record; returns the offset just past it. On a failed write
  // the file is cut back to its size before the call and the error
  // returned (ENOSPC: RESOURCE_EXHAUSTED); during the backoff that follows,
  // RESOURCE_EXHAUSTED naming the error and when to retry.
  absl::StatusOr<uint64_t> Append(uint8_t type, absl::Span<const uint8_t> payload);
  // Cuts the log back to `offset` (a record boundary: size() before an
  // Append whose change was then refused). The caller holds the lock that
  // orders its Appends, so that nothing was appended after. A cut below
  // the durable end is fdatasynced (SyncPolicy::kAlways), so that a crash
  // does not bring the record back. A failed cut, or a failed sync of it,
  // is final (health()).
  absl::Status Retract(uint64_t offset);
  // Returns once every record up to `offset` is durable (per the policy).
  absl::Status Sync(uint64_t offset);

  uint64_t size() const;
  // fdatasyncs made and the seconds they took, since Open.
  struct SyncStats {
    uint64_t syncs = 0;
    double seconds = 0;
  };
  SyncStats sync_stats() const;
  // A failed sync, or a failed write that could not be cut back, leaves the
  // log unusable: every later call returns this error (the server must
  // restart and recover).
  absl::Status health() const;
  // The last failed write while appends are being refused or retried (OK
  // once an append succeeds again; see Append).
  absl::Status write_error() const;

 private:
  WalWriter(int fd, uint64_t size, const Options& options);
  // Cuts the file back to size_ after a failed write (under mu_).
  bool CutBackLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const int fd_;
  const Options options_;
  Env* const env_;
  mutable absl::Mutex mu_;
  uint64_t size_ ABSL_GUARDED_BY(mu_);
  uint64_t synced_ ABSL_GUARDED_BY(mu_);
  bool syncing_ ABSL_GUARDED_BY(mu_) = false;
  SyncStats sync_stats_ ABSL_GUARDED_BY(mu_);
  absl::Status error_ ABSL_GUARDED_BY(mu_);
  absl::Status write_error_ ABSL_GUARDED_BY(mu_);
  absl::Duration backoff_ ABSL_GUARDED_BY(mu_) = absl::ZeroDuration();
  absl::Time retry_at_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();
};

}  // namespace negmine

#endif  // NEGMINE_CORE_PERSIST_WAL_H_
