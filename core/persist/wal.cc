#include "core/persist/wal.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace negmine {
namespace {

constexpr size_t kHeader = 13;  // length, type, header crc, payload crc

std::array<uint32_t, 256> MakeCrcTable() {
  std::array<uint32_t, 256> t{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
    t[i] = c;
  }
  return t;
}

uint32_t LoadU32(const uint8_t* p) {
  return uint32_t{p[0]} | uint32_t{p[1]} << 8 | uint32_t{p[2]} << 16 | uint32_t{p[3]} << 24;
}

void StoreU32(uint32_t v, uint8_t* p) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}

bool AllZero(const uint8_t* p, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    if (p[i] != 0) return false;
  }
  return true;
}

absl::Status Errno(const std::string& what) {
  return absl::Status(absl::ErrnoToStatusCode(errno), absl::StrCat(what, ": ", std::strerror(errno)));
}

}  // namespace

uint32_t Crc32c(absl::Span<const uint8_t> data, uint32_t crc) {
  static const std::array<uint32_t, 256> table = MakeCrcTable();
  crc = ~crc;
  for (uint8_t b : data) crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8);
  return ~crc;
}

absl::StatusOr<WalContents> ReadWal(const std::string& path) {
  WalContents out;
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) return out;
    return Errno(absl::StrCat("opening the write-ahead log ", path));
  }
  std::string data;
  char buf[1 << 16];
  for (ssize_t n; (n = ::read(fd, buf, sizeof(buf))) != 0;) {
    if (n < 0) {
      if (errno == EINTR) continue;
      const absl::Status s = Errno(absl::StrCat("reading the write-ahead log ", path));
      ::close(fd);
      return s;
    }
    data.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
  const auto* p = reinterpret_cast<const uint8_t*>(data.data());
  const uint64_t size = data.size();
  uint64_t at = 0;
  while (at < size) {
    if (size - at < kHeader || AllZero(p + at, size - at)) break;  // a torn tail
    const uint32_t length = LoadU32(p + at);
    if (Crc32c({p + at, 5}) != LoadU32(p + at + 5) || length > kMaxWalRecordBytes) {
      return absl::DataLossError(absl::StrCat(
          "write-ahead log ", path, ": the header of the record at offset ", at,
          " is corrupt (", size - at, " bytes from there to the end); the log is not loaded"));
    }
    const uint64_t end = at + kHeader + length;
    if (end > size) break;  // a genuine header, its payload cut: torn
    absl::Span<const uint8_t> payload(p + at + kHeader, length);
    if (Crc32c(payload) != LoadU32(p + at + 9)) {
      // Every byte of the record is on disk, so it was not torn: a write
      // cut short leaves a file that ends inside the record. A wholly
      // present record that fails its checksum is corruption, also last.
      return absl::DataLossError(absl::StrCat(
          "write-ahead log ", path, ": the checksum of the record at offset ", at,
          " fails although all of its ", kHeader + length, " bytes are present",
          end == size ? " (it is the last record)"
                      : absl::StrCat(" and ", size - end, " bytes follow it"),
          "; corrupt, not a torn tail: the log is not loaded"));
    }
    out.records.push_back({.type = p[at + 4],
                           .payload = std::string(reinterpret_cast<const char*>(payload.data()),
                                                  payload.size()),
                           .offset = at});
    at = end;
  }
  out.valid_bytes = at;
  out.torn_bytes = size - at;
  return out;
}

absl::StatusOr<std::unique_ptr<WalWriter>> WalWriter::Open(const std::string& path,
                                                           uint64_t valid_bytes,
                                                           const Options& options) {
  Env* env = Env::OrDefault(options.env);
  const int fd = env->Open(path, O_WRONLY | O_CREAT | O_CLOEXEC, 0640);
  if (fd < 0) return Errno(absl::StrCat("opening the write-ahead log ", path));
  if (env->Ftruncate(fd, static_cast<off_t>(valid_bytes)) != 0 ||
      env->Lseek(fd, static_cast<off_t>(valid_bytes), SEEK_SET) < 0 || env->Fdatasync(fd) != 0) {
    const absl::Status s = Errno(absl::StrCat("preparing the write-ahead log ", path));
    env->Close(fd);
    return s;
  }
  return std::unique_ptr<WalWriter>(new WalWriter(fd, valid_bytes, options));
}

WalWriter::WalWriter(int fd, uint64_t size, const Options& options)
    : fd_(fd), options_(options), env_(Env::OrDefault(options.env)), size_(size), synced_(size) {}

WalWriter::~WalWriter() { env_->Close(fd_); }

uint64_t WalWriter::size() const {
  absl::MutexLock lock(&mu_);
  return size_;
}

WalWriter::SyncStats WalWriter::sync_stats() const {
  absl::MutexLock lock(&mu_);
  return sync_stats_;
}

absl::Status WalWriter::health() const {
  absl::MutexLock lock(&mu_);
  return error_;
}

absl::Status WalWriter::write_error() const {
  absl::MutexLock lock(&mu_);
  return write_error_;
}

bool WalWriter::CutBackLocked() {
  return env_->Ftruncate(fd_, static_cast<off_t>(size_)) == 0 &&
         env_->Lseek(fd_, static_cast<off_t>(size_), SEEK_SET) == static_cast<off_t>(size_);
}

absl::StatusOr<uint64_t> WalWriter::Append(uint8_t type, absl::Span<const uint8_t> payload) {
  if (payload.size() > kMaxWalRecordBytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "a write-ahead log record of ", payload.size(), " bytes exceeds the limit of ",
        kMaxWalRecordBytes));
  }
  std::string record(kHeader, '\0');
  auto* h = reinterpret_cast<uint8_t*>(record.data());
  StoreU32(static_cast<uint32_t>(payload.size()), h);
  h[4] = type;
  StoreU32(Crc32c({h, 5}), h + 5);
  StoreU32(Crc32c(payload), h + 9);
  record.append(reinterpret_cast<const char*>(payload.data()), payload.size());
  absl::MutexLock lock(&mu_);
  if (!error_.ok()) return error_;
  const absl::Time now = absl::Now();
  if (!write_error_.ok() && now < retry_at_) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "the write-ahead log cannot be written (", write_error_.message(),
        "); the change is refused; writes are tried again in ",
        absl::ToInt64Milliseconds(retry_at_ - now) + 1, " ms: retry after that, with backoff"));
  }
  for (size_t done = 0; done < record.size();) {
    const ssize_t n = env_->Write(fd_, record.data() + done, record.size() - done);
    if (n > 0) {
      done += static_cast<size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n == 0) errno = ENOSPC;  // no progress: the device takes no more
    const absl::Status failed = Errno("writing the write-ahead log");
    // The file may now end in a partial record: cut it back so that the
    // log stays whole, and later appends (or a restart) follow good data.
    if (!CutBackLocked()) {
      error_ = absl::Status(failed.code(),
                            absl::StrCat(failed.message(), "; cutting the partial record back "
                                         "failed too: ", std::strerror(errno)));
      return error_;
    }
    write_error_ = failed;
    backoff_ = backoff_ == absl::ZeroDuration()
                   ? options_.retry_backoff
                   : std::min(2 * backoff_, options_.max_retry_backoff);
    retry_at_ = now + backoff_;
    return failed;
  }
  size_ += record.size();
  write_error_ = absl::OkStatus();
  backoff_ = absl::ZeroDuration();
  return size_;
}

absl::Status WalWriter::Retract(uint64_t offset) {
  absl::MutexLock lock(&mu_);
  if (!error_.ok()) return error_;
  if (offset > size_) {
    return absl::InternalError(absl::StrCat("retracting the write-ahead log to ", offset,
                                            " past its end ", size_));
  }
  const uint64_t was = size_;
  size_ = offset;
  if (!CutBackLocked()) {
    error_ = Errno(absl::StrCat("cutting the write-ahead log back from ", was, " to ", offset));
    return error_;
  }
  if (offset < synced_) {
    // The cut removes a durable record: make the new size durable too, or a
    // crash of the machine could bring the retracted record back.
    synced_ = offset;
    if (options_.sync == SyncPolicy::kAlways && env_->Fdatasync(fd_) != 0) {
      error_ = Errno(absl::StrCat("syncing the write-ahead log cut back from ", was, " to ",
                                  offset));
      return error_;
    }
  }
  return absl::OkStatus();
}

absl::Status WalWriter::Sync(uint64_t offset) {
  if (options_.sync == SyncPolicy::kNever) return health();
  absl::MutexLock lock(&mu_);
  while (true) {
    if (!error_.ok()) return error_;
    if (synced_ >= offset) return absl::OkStatus();
    if (!syncing_) break;
    mu_.Await(absl::Condition(
        +[](WalWriter* w) ABSL_EXCLUSIVE_LOCKS_REQUIRED(w->mu_) { return !w->syncing_; }, this));
  }
  syncing_ = true;
  if (options_.group_commit_window > absl::ZeroDuration()) {
    mu_.Unlock();
    absl::SleepFor(options_.group_commit_window);
    mu_.Lock();
  }
  const uint64_t target = size_;
  mu_.Unlock();
  const absl::Time start = absl::Now();
  const int rc = env_->Fdatasync(fd_);
  const double seconds = absl::ToDoubleSeconds(absl::Now() - start);
  mu_.Lock();
  syncing_ = false;
  ++sync_stats_.syncs;
  sync_stats_.seconds += seconds;
  if (rc != 0) {
    const int sync_errno = errno;
    // Every record past synced_ belongs to a change whose Sync now fails, so
    // its caller answers that it failed; the kernel may keep its pages in
    // the page cache (marked clean), where a restart would read and replay
    // it. Cut them off, so that the file ends at the last durable record.
    std::string cut;
    if (size_ > synced_) {
      const uint64_t was = size_;
      size_ = synced_;
      if (CutBackLocked()) {
        // Best effort: the disk that failed the fsync may take this one.
        env_->Fdatasync(fd_);
        cut = absl::StrCat("; the ", was - synced_,
                           " bytes after the last durable record were cut off");
      } else {
        cut = absl::StrCat("; cutting the ", was - synced_,
                           " bytes after the last durable record off failed too: ",
                           std::strerror(errno));
      }
    }
    error_ = absl::Status(absl::ErrnoToStatusCode(sync_errno),
                          absl::StrCat("syncing the write-ahead log: ",
                                       std::strerror(sync_errno), cut));
    return error_;
  }
  synced_ = std::max(synced_, target);
  return absl::OkStatus();
}

}  // namespace negmine
