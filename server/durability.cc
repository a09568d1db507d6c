#include "server/durability.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"
#include "core/persist/snapshot.h"
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

absl::Status Recover(NegativeMinerService& service, const std::string& dir,
                     const WalWriter::Options& options) {
  const auto start = std::chrono::steady_clock::now();
  // A snapshot cut short by a crash was never renamed into place: drop it.
  std::error_code ec;
  for (uint64_t g : Generations(dir, "snapshot-", ".snap.tmp")) {
    std::filesystem::remove(SnapshotPath(dir, g) + ".tmp", ec);
  }
  const std::vector<uint64_t> snapshots = Generations(dir, "snapshot-", ".snap");
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
    for (const SnapshotCollection& c : snap->collections) {
      if (absl::Status s = service.RestoreCollection(c); !s.ok()) {
        return absl::DataLossError(absl::StrCat("snapshot ", SnapshotPath(dir, generation),
                                                ", collection '", c.name, "': ", s.message()));
      }
    }
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
    for (const WalRecord& r : wal.records) {
      absl::StatusOr<WalEntry> e = DecodeWalEntry(r.type, r.payload);
      absl::Status s = e.ok() ? service.Replay(*e) : e.status();
      if (!s.ok()) {
        return absl::DataLossError(absl::StrCat("write-ahead log ", path,
                                                ": the record at offset ", r.offset,
                                                " does not replay: ", s.message()));
      }
    }
    records += wal.records.size();
    if (last) {
      generation = logs[i];
      valid = wal.valid_bytes;
      if (wal.torn_bytes > 0) {
        Log(LogLevel::kWarning, "cutting a torn write at the end of the write-ahead log",
            {{"path", path}, {"offset", absl::StrCat(wal.valid_bytes)},
             {"bytes", absl::StrCat(wal.torn_bytes)}});
      }
    }
  }
  ASSIGN_OR_RETURN(std::unique_ptr<WalWriter> writer,
                   WalWriter::Open(WalPath(dir, generation), valid, options));
  service.SetDurability(dir, generation, std::move(writer), options);
  // A crash between a snapshot's rename and the pruning after it leaves a
  // third snapshot (and its logs): the newest one just restored, finish it.
  if (!snapshots.empty()) RemoveObsoleteFiles(dir, snapshots.back());
  Log(LogLevel::kInfo, "recovered",
      {{"snapshot", snapshots.empty() ? "none" : SnapshotPath(dir, snapshots.back())},
       {"log_records", absl::StrCat(records)},
       {"generation", absl::StrCat(generation)},
       {"seconds", absl::StrCat(std::chrono::duration<double>(
                                    std::chrono::steady_clock::now() - start).count())}});
  return absl::OkStatus();
}

void RemoveObsoleteFiles(const std::string& dir, uint64_t newest) {
  const std::vector<uint64_t> snapshots = Generations(dir, "snapshot-", ".snap");
  // Keep the newest two snapshots (up to `newest`) and the logs from the
  // older of them on; with one snapshot, every log stays.
  std::vector<uint64_t> kept;
  for (uint64_t g : snapshots) {
    if (g <= newest) kept.push_back(g);
  }
  if (kept.size() < 2) return;
  const uint64_t keep_from = kept[kept.size() - 2];
  std::error_code ec;
  for (uint64_t g : snapshots) {
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
