#include "server/durability.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <vector>

#include <fcntl.h>

#include <cerrno>
#include <cstring>
#include <fstream>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"
#include "core/persist/env.h"
#include "core/persist/snapshot.h"
#include "core/persist/wal.h"
#include "core/persist/wal_entry.h"
#include "core/status.h"
#include "server/log.h"
#include "server/service.h"

namespace negmine::server {
namespace {

// Generations of the files named <prefix><generation><suffix> in `dir`.
std::vector<uint64_t> Generations(const std::string& dir, absl::string_view prefix,
                                  absl::string_view suffix) {
  std::vector<uint64_t> out;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(dir, ec)) {
    const std::string file = entry.path().filename().string();
    absl::string_view name = file;
    uint64_t g;
    if (absl::ConsumePrefix(&name, prefix) && absl::ConsumeSuffix(&name, suffix) &&
        absl::SimpleAtoi(name, &g)) {
      out.push_back(g);
    }
  }
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace

std::string WalPath(const std::string& dir, uint64_t generation) {
  return absl::StrFormat("%s/wal-%06d.log", dir, generation);
}

std::string SnapshotPath(const std::string& dir, uint64_t generation) {
  return absl::StrFormat("%s/snapshot-%06d.snap", dir, generation);
}

std::string ManifestPath(const std::string& dir) { return dir + "/MANIFEST"; }

namespace {

constexpr absl::string_view kManifestMagic = "negmine-manifest 1";

std::string ManifestBody(const Manifest& m) {
  return absl::StrCat(kManifestMagic, "\nfirst_log ", m.first_log, "\ncurrent_log ",
                      m.current_log, "\nsnapshots", m.snapshots.empty() ? "" : " ",
                      absl::StrJoin(m.snapshots, " "), "\n");
}

uint32_t TextCrc(const std::string& text) {
  return Crc32c({reinterpret_cast<const uint8_t*>(text.data()), text.size()});
}

}  // namespace

absl::Status WriteManifest(const std::string& dir, const Manifest& m, Env* env) {
  env = Env::OrDefault(env);
  const std::string body = ManifestBody(m);
  const std::string text = absl::StrCat(body, "crc ", TextCrc(body), "\n");
  const std::string path = ManifestPath(dir), tmp = path + ".tmp";
  const int fd = env->Open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0640);
  auto fail = [&](const std::string& what) {
    return absl::Status(absl::ErrnoToStatusCode(errno),
                        absl::StrCat(what, " ", tmp, ": ", std::strerror(errno)));
  };
  if (fd < 0) return fail("creating");
  absl::Status s;
  for (size_t done = 0; s.ok() && done < text.size();) {
    const ssize_t n = env->Write(fd, text.data() + done, text.size() - done);
    if (n > 0) {
      done += static_cast<size_t>(n);
    } else if (n < 0 && errno == EINTR) {
      continue;
    } else {
      if (n == 0) errno = ENOSPC;
      s = fail("writing");
    }
  }
  if (s.ok() && env->Fsync(fd) != 0) s = fail("syncing");
  env->Close(fd);
  if (s.ok() && env->Rename(tmp, path) != 0) s = fail("renaming");
  if (!s.ok()) {
    env->Unlink(tmp);
    return s;
  }
  return SyncDir(dir, env);
}

absl::StatusOr<std::optional<Manifest>> ReadManifest(const std::string& dir) {
  const std::string path = ManifestPath(dir);
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    std::error_code ec;
    if (!std::filesystem::exists(path, ec)) return std::optional<Manifest>();
    return absl::DataLossError(absl::StrCat("cannot read ", path));
  }
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  auto corrupt = [&](const char* why) {
    return absl::DataLossError(absl::StrCat("the manifest ", path, " ", why,
                                            "; the data dir is not loaded"));
  };
  const size_t crc_at = text.rfind("crc ");
  uint32_t crc = 0;
  if (crc_at == std::string::npos ||
      !absl::SimpleAtoi(absl::StripAsciiWhitespace(text.substr(crc_at + 4)), &crc)) {
    return corrupt("has no checksum line");
  }
  const std::string body = text.substr(0, crc_at);
  if (TextCrc(body) != crc) return corrupt("fails its checksum");
  const std::vector<std::string> lines = absl::StrSplit(body, '\n', absl::SkipEmpty());
  Manifest m;
  bool ok = lines.size() == 4 && lines[0] == kManifestMagic;
  auto number = [&](const std::string& line, absl::string_view key, uint64_t* out) {
    absl::string_view v = line;
    return absl::ConsumePrefix(&v, key) && absl::ConsumePrefix(&v, " ") &&
           absl::SimpleAtoi(v, out);
  };
  ok = ok && number(lines[1], "first_log", &m.first_log) &&
       number(lines[2], "current_log", &m.current_log) && m.first_log <= m.current_log;
  if (ok) {
    absl::string_view v = lines[3];
    ok = absl::ConsumePrefix(&v, "snapshots");
    for (absl::string_view g : absl::StrSplit(v, ' ', absl::SkipEmpty())) {
      uint64_t n = 0;
      ok = ok && absl::SimpleAtoi(g, &n);
      m.snapshots.push_back(n);
    }
  }
  if (!ok) return corrupt("does not parse");
  return std::optional<Manifest>(std::move(m));
}

absl::Status Recover(NegativeMinerService& service, const std::string& dir,
                     const WalWriter::Options& options) {
  const auto start = std::chrono::steady_clock::now();
  Metrics& metrics = service.metrics();
  metrics.SetRecovery(RecoveryPhase::kStarting, 0);
  // A snapshot cut short by a crash was never renamed into place: drop it.
  std::error_code ec;
  for (uint64_t g : Generations(dir, "snapshot-", ".snap.tmp")) {
    std::filesystem::remove(SnapshotPath(dir, g) + ".tmp", ec);
  }
  std::filesystem::remove(ManifestPath(dir) + ".tmp", ec);
  ASSIGN_OR_RETURN(std::optional<Manifest> manifest, ReadManifest(dir));
  const std::vector<uint64_t> snapshots = Generations(dir, "snapshot-", ".snap");
  if (manifest.has_value()) {
    // Every file the manifest names must be there: a missing one is data
    // lost, not a smaller data dir.
    for (uint64_t g = manifest->first_log; g <= manifest->current_log; ++g) {
      if (!std::filesystem::exists(WalPath(dir, g), ec)) {
        return absl::DataLossError(absl::StrCat(
            "the log ", WalPath(dir, g), " is missing: ", ManifestPath(dir),
            " says the data dir holds the logs of generations ", manifest->first_log, " to ",
            manifest->current_log, "; the changes it held are lost (restore it, or move the "
            "data dir aside to start empty)"));
      }
    }
    std::vector<uint64_t> present;
    for (uint64_t g : manifest->snapshots) {
      if (std::binary_search(snapshots.begin(), snapshots.end(), g)) {
        present.push_back(g);
      } else {
        Log(LogLevel::kWarning, "a snapshot the manifest names is missing",
            {{"path", SnapshotPath(dir, g)}});
      }
    }
    // Without any of them, the logs before first_log (deleted after those
    // snapshots were written) are needed: lost.
    const bool newer = !snapshots.empty() && snapshots.back() >= manifest->first_log;
    if (present.empty() && !newer && manifest->first_log > 1) {
      return absl::DataLossError(absl::StrCat(
          "the snapshots ", absl::StrJoin(manifest->snapshots, ", "), " named by ",
          ManifestPath(dir), " are missing, and the logs before generation ",
          manifest->first_log, " were deleted after them: the state they held is lost"));
    }
  } else if (!snapshots.empty() || !Generations(dir, "wal-", ".log").empty()) {
    Log(LogLevel::kWarning, "the data dir has no manifest (written before it existed); "
        "recovering from the files it holds and writing one", {{"dir", dir}});
  }
  uint64_t generation = 1;
  if (!snapshots.empty()) {
    generation = snapshots.back();
    absl::StatusOr<SnapshotContents> snap = ReadSnapshot(SnapshotPath(dir, generation));
    if (!snap.ok()) {
      return absl::Status(snap.status().code(),
                          absl::StrCat(snap.status().message(),
                                       snapshots.size() > 1
                                           ? absl::StrCat(" (to recover from the previous "
                                                          "snapshot, generation ",
                                                          snapshots[snapshots.size() - 2],
                                                          ", move this one aside)")
                                           : std::string()));
    }
    if (snap->generation != generation) {
      return absl::DataLossError(absl::StrCat("snapshot ", SnapshotPath(dir, generation),
                                              " says generation ", snap->generation));
    }
    // Each collection is restored whole (its tree rebuilt): progress counts
    // the snapshot's bytes restored.
    ProgressLog progress("recovery: loading the snapshot");
    uint64_t total = 0, done = 0;
    for (const SnapshotCollection& c : snap->collections) total += c.index.size();
    for (size_t i = 0; i < snap->collections.size(); ++i) {
      const SnapshotCollection& c = snap->collections[i];
      const double fraction = total > 0 ? static_cast<double>(done) / total : 0;
      metrics.SetRecovery(RecoveryPhase::kSnapshot, fraction);
      progress.Update(fraction, {{"path", SnapshotPath(dir, generation)},
                                 {"collection", c.name},
                                 {"collections", absl::StrCat(i, "/", snap->collections.size())}});
      if (absl::Status s = service.RestoreCollection(c); !s.ok()) {
        return absl::DataLossError(absl::StrCat("snapshot ", SnapshotPath(dir, generation),
                                                ", collection '", c.name, "': ", s.message()));
      }
      done += c.index.size();
    }
    progress.Done({{"path", SnapshotPath(dir, generation)},
                   {"collections", absl::StrCat(snap->collections.size())}});
  }
  std::vector<uint64_t> logs = Generations(dir, "wal-", ".log");
  logs.erase(logs.begin(), std::lower_bound(logs.begin(), logs.end(), generation));
  if (!logs.empty() && logs.front() != generation) {
    return absl::DataLossError(absl::StrCat("the log ", WalPath(dir, generation),
                                            " is missing (", WalPath(dir, logs.front()),
                                            " exists): changes between them are lost"));
  }
  size_t records = 0;
  uint64_t valid = 0;
  // Progress: the bytes of the logs replayed, of all the logs to replay.
  uint64_t log_bytes = 0, replayed_bytes = 0;
  for (uint64_t g : logs) log_bytes += std::filesystem::file_size(WalPath(dir, g), ec);
  ProgressLog progress("recovery: replaying the write-ahead log");
  auto report = [&](uint64_t bytes) {
    const double fraction = log_bytes > 0 ? static_cast<double>(bytes) / log_bytes : 1;
    metrics.SetRecovery(RecoveryPhase::kLog, fraction);
    progress.Update(fraction, {{"records", absl::StrCat(records)},
                               {"bytes", absl::StrCat(bytes, "/", log_bytes)}});
  };
  report(0);
  for (size_t i = 0; i < logs.size(); ++i) {
    const std::string path = WalPath(dir, logs[i]);
    if (i > 0 && logs[i] != logs[i - 1] + 1) {
      return absl::DataLossError(absl::StrCat("the log generation ", logs[i - 1] + 1,
                                              " is missing before ", path));
    }
    ASSIGN_OR_RETURN(WalContents wal, ReadWal(path));
    const bool last = i + 1 == logs.size();
    if (wal.torn_bytes > 0 && !last) {
      return absl::DataLossError(absl::StrCat("write-ahead log ", path, ": ", wal.torn_bytes,
                                              " bytes at its end do not parse, and later "
                                              "logs follow it"));
    }
    uint64_t end = wal.valid_bytes;
    for (const WalRecord& r : wal.records) {
      report(replayed_bytes + r.offset);
      ++records;
      absl::StatusOr<WalEntry> e = DecodeWalEntry(r.type, r.payload);
      bool refused = false;
      absl::Status s = e.ok() ? service.Replay(*e, &refused) : e.status();
      if (!s.ok() && refused && last && &r == &wal.records.back()) {
        // A change is fsynced before the index sees it, and cut back off
        // the log if the index refuses it, before any later record: a
        // server stopped between the two leaves the refused record last.
        // It changed nothing and was never acknowledged: cut it here too.
        Log(LogLevel::kWarning,
            "cutting a change the index refuses off the end of the write-ahead log (the "
            "server stopped before cutting it back)",
            {{"path", path}, {"offset", absl::StrCat(r.offset)}, {"error", s.ToString()}});
        end = r.offset;
        --records;
        break;
      }
      if (!s.ok()) {
        return absl::DataLossError(absl::StrCat("write-ahead log ", path,
                                                ": the record at offset ", r.offset,
                                                " does not replay: ", s.message()));
      }
    }
    replayed_bytes += std::filesystem::file_size(path, ec);
    if (last) {
      generation = logs[i];
      valid = end;
      if (wal.torn_bytes > 0) {
        Log(LogLevel::kWarning, "cutting a torn write at the end of the write-ahead log",
            {{"path", path}, {"offset", absl::StrCat(wal.valid_bytes)},
             {"bytes", absl::StrCat(wal.torn_bytes)}});
      }
    }
  }
  ASSIGN_OR_RETURN(std::unique_ptr<WalWriter> writer,
                   WalWriter::Open(WalPath(dir, generation), valid, options));
  // The manifest of what is there now (and, before a fresh dir takes its
  // first change, of its first log).
  Manifest now{.current_log = generation, .snapshots = snapshots};
  const std::vector<uint64_t> all_logs = Generations(dir, "wal-", ".log");
  now.first_log = manifest.has_value() ? std::min(manifest->first_log, generation)
                  : all_logs.empty()   ? generation
                                       : std::min(all_logs.front(), generation);
  RETURN_IF_ERROR(WriteManifest(dir, now, options.env));
  // A crash between a snapshot's rename and the pruning after it leaves a
  // third snapshot (and its logs): the newest one just restored, finish it.
  if (!snapshots.empty()) RemoveObsoleteFiles(dir, &now, options.env);
  service.SetDurability(dir, generation, std::move(writer), options, now);
  progress.Done({{"records", absl::StrCat(records)}, {"bytes", absl::StrCat(log_bytes)}});
  metrics.SetRecovery(RecoveryPhase::kDone, 1);
  Log(LogLevel::kInfo, "recovered",
      {{"snapshot", snapshots.empty() ? "none" : SnapshotPath(dir, snapshots.back())},
       {"log_records", absl::StrCat(records)},
       {"generation", absl::StrCat(generation)},
       {"seconds", absl::StrCat(std::chrono::duration<double>(
                                    std::chrono::steady_clock::now() - start).count())}});
  return absl::OkStatus();
}

void RemoveObsoleteFiles(const std::string& dir, Manifest* m, Env* env) {
  // Keep the newest two snapshots and the logs from the older of them on;
  // with one snapshot, every log stays.
  if (m->snapshots.size() < 2) return;
  const uint64_t keep_from = m->snapshots[m->snapshots.size() - 2];
  Manifest next = *m;
  next.first_log = std::max(next.first_log, keep_from);
  next.snapshots.assign(m->snapshots.end() - 2, m->snapshots.end());
  // Recorded first: the manifest never names a file already deleted.
  if (absl::Status s = WriteManifest(dir, next, env); !s.ok()) {
    Log(LogLevel::kWarning, "cannot update the manifest; keeping the obsolete files",
        {{"error", s.ToString()}});
    return;
  }
  *m = next;
  std::error_code ec;
  for (uint64_t g : Generations(dir, "snapshot-", ".snap")) {
    if (g < keep_from) std::filesystem::remove(SnapshotPath(dir, g), ec);
  }
  for (uint64_t g : Generations(dir, "wal-", ".log")) {
    if (g < keep_from) std::filesystem::remove(WalPath(dir, g), ec);
  }
  if (ec) {
    Log(LogLevel::kWarning, "cannot delete an obsolete file", {{"error", ec.message()}});
  }
}

}  // namespace negmine::server
