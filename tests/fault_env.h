// FaultEnv: an Env (core/persist/env.h) that fakes a full disk, short
// writes and failed fsyncs, for the durability tests. It forwards every call
// to POSIX and fails the ones its faults select.
//
//   FaultEnv env;
//   env.SetSpaceLeft(100);   // the next 100 bytes written fit, then ENOSPC
//                            // (a write crossing the limit stops short)
//   env.FailSyncs(EIO);      // every fsync / fdatasync fails
//   env.FailSyncsAfter(1, EIO);  // the next one works, then they fail
//   env.Clear();             // a healthy disk again
//
// Thread safety: every method may be called from any thread.
#ifndef NEGMINE_TESTS_FAULT_ENV_H_
#define NEGMINE_TESTS_FAULT_ENV_H_

#include <cerrno>
#include <cstdint>
#include <limits>
#include <string>

#include "absl/synchronization/mutex.h"
#include "core/persist/env.h"

namespace negmine::testing {

class FaultEnv final : public Env {
 public:
  // Bytes that may still be written (all files together); past them writes
  // fail with ENOSPC, and the write that crosses the limit is short.
  void SetSpaceLeft(uint64_t bytes) {
    absl::MutexLock lock(&mu_);
    space_left_ = bytes;
  }
  // Every fsync and fdatasync fails with `error` (0: they work).
  void FailSyncs(int error) { FailSyncsAfter(0, error); }
  // The next `passing` fsyncs and fdatasyncs work, then every one fails
  // with `error`.
  void FailSyncsAfter(uint64_t passing, int error) {
    absl::MutexLock lock(&mu_);
    syncs_passing_ = passing;
    sync_error_ = error;
  }
  // Every write fails with `error` at once, nothing written (0: they work).
  void FailWrites(int error) {
    absl::MutexLock lock(&mu_);
    write_error_ = error;
  }
  void Clear() {
    absl::MutexLock lock(&mu_);
    space_left_ = std::numeric_limits<uint64_t>::max();
    sync_error_ = write_error_ = 0;
  }
  // Calls that failed because of a fault, and short writes made.
  uint64_t faults() const {
    absl::MutexLock lock(&mu_);
    return faults_;
  }
  uint64_t short_writes() const {
    absl::MutexLock lock(&mu_);
    return short_writes_;
  }

  ssize_t Write(int fd, const void* data, size_t n) override {
    size_t allowed = n;
    {
      absl::MutexLock lock(&mu_);
      if (write_error_ != 0) {
        ++faults_;
        errno = write_error_;
        return -1;
      }
      if (space_left_ == 0 && n > 0) {
        ++faults_;
        errno = ENOSPC;
        return -1;
      }
      if (n > space_left_) {
        allowed = static_cast<size_t>(space_left_);
        ++short_writes_;
      }
    }
    const ssize_t done = Env::Write(fd, data, allowed);
    if (done > 0) {
      absl::MutexLock lock(&mu_);
      if (space_left_ != std::numeric_limits<uint64_t>::max()) {
        space_left_ -= static_cast<uint64_t>(done);
      }
    }
    return done;
  }
  int Fdatasync(int fd) override { return SyncFault() ? -1 : Env::Fdatasync(fd); }
  int Fsync(int fd) override { return SyncFault() ? -1 : Env::Fsync(fd); }

 private:
  bool SyncFault() {
    absl::MutexLock lock(&mu_);
    if (sync_error_ == 0) return false;
    if (syncs_passing_ > 0) {
      --syncs_passing_;
      return false;
    }
    ++faults_;
    errno = sync_error_;
    return true;
  }

  mutable absl::Mutex mu_;
  uint64_t space_left_ ABSL_GUARDED_BY(mu_) = std::numeric_limits<uint64_t>::max();
  int sync_error_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t syncs_passing_ ABSL_GUARDED_BY(mu_) = 0;
  int write_error_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t faults_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t short_writes_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace negmine::testing

#endif  // NEGMINE_TESTS_FAULT_ENV_H_
