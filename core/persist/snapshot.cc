#include "core/persist/snapshot.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "core/persist/bytes.h"
#include "core/persist/wal.h"
#include "core/persist/wal_entry.h"

namespace negmine {
namespace {

constexpr char kMagic[8] = {'N', 'E', 'G', 'M', 'S', 'N', 'A', 'P'};
constexpr uint32_t kFormat = 1;

absl::Status Errno(const std::string& what) {
  return absl::Status(absl::ErrnoToStatusCode(errno), absl::StrCat(what, ": ", std::strerror(errno)));
}

absl::Status WriteAll(Env* env, int fd, const std::string& bytes, const std::string& path) {
  for (size_t done = 0; done < bytes.size();) {
    const ssize_t n = env->Write(fd, bytes.data() + done, bytes.size() - done);
    if (n > 0) {
      done += static_cast<size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n == 0) errno = ENOSPC;  // no progress: the device takes no more
    return Errno(absl::StrCat("writing ", path));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status SyncDir(const std::string& dir, Env* env) {
  env = Env::OrDefault(env);
  const int dfd = env->Open(dir.empty() ? "." : dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC, 0);
  absl::Status s;
  if (dfd < 0 || env->Fsync(dfd) != 0) s = Errno(absl::StrCat("syncing the directory ", dir));
  if (dfd >= 0) env->Close(dfd);
  return s;
}

absl::StatusOr<uint64_t> WriteSnapshot(const std::string& path, const SnapshotContents& c,
                                       Env* env) {
  ByteWriter w;
  w.bytes().append(kMagic, sizeof(kMagic));
  w.Put<uint32_t>(kFormat);
  w.Put<uint64_t>(c.generation);
  w.Put<uint64_t>(c.collections.size());
  for (const SnapshotCollection& col : c.collections) {
    w.PutString(col.name);
    EncodeIndexOptions(col.options, w);
    w.PutString(col.index);
  }
  const std::string& body = w.bytes();
  w.Put<uint32_t>(Crc32c({reinterpret_cast<const uint8_t*>(body.data()), body.size()}));
  const std::string tmp = path + ".tmp";
  env = Env::OrDefault(env);
  const int fd = env->Open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0640);
  if (fd < 0) return Errno(absl::StrCat("creating ", tmp));
  absl::Status s = WriteAll(env, fd, w.bytes(), tmp);
  if (s.ok() && env->Fsync(fd) != 0) s = Errno(absl::StrCat("syncing ", tmp));
  env->Close(fd);
  if (s.ok() && env->Rename(tmp, path) != 0) s = Errno(absl::StrCat("renaming to ", path));
  if (!s.ok()) {
    env->Unlink(tmp);
    return s;
  }
  if (absl::Status d = SyncDir(std::filesystem::path(path).parent_path().string(), env); !d.ok()) {
    return absl::Status(d.code(), absl::StrCat(d.message(), " (after writing ", path, ")"));
  }
  return w.bytes().size();
}

absl::StatusOr<SnapshotContents> ReadSnapshot(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read the snapshot ", path));
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  auto corrupt = [&](const char* why) {
    return absl::DataLossError(absl::StrCat("snapshot ", path, " (", bytes.size(), " bytes): ", why,
                                            "; it is not loaded"));
  };
  if (bytes.size() < sizeof(kMagic) + 4 || std::memcmp(bytes.data(), kMagic, sizeof(kMagic)) != 0) {
    return corrupt("not a negmine snapshot");
  }
  const size_t body = bytes.size() - 4;
  uint32_t crc;
  std::memcpy(&crc, bytes.data() + body, 4);
  if (Crc32c({reinterpret_cast<const uint8_t*>(bytes.data()), body}) != crc) {
    return corrupt("the checksum fails");
  }
  ByteReader r(std::string_view(bytes.data() + sizeof(kMagic), body - sizeof(kMagic)));
  SnapshotContents c;
  uint32_t format = 0;
  uint64_t count = 0;
  bool ok = r.Get(&format) && format == kFormat && r.Get(&c.generation) && r.Get(&count);
  for (uint64_t i = 0; ok && i < count; ++i) {
    SnapshotCollection col;
    ok = r.GetString(&col.name) && DecodeIndexOptions(r, &col.options) && r.GetString(&col.index);
    c.collections.push_back(std::move(col));
  }
  if (!ok || !r.done()) return corrupt("the layout does not parse (another version?)");
  return c;
}

}  // namespace negmine
