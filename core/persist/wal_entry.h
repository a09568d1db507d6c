// The changes the write-ahead log records (core/persist/wal.h frames them),
// and their byte encoding. One WalEntry is one acknowledged change: the
// server applies it, logs it, and replays it at recovery through the same
// code path.
//
// Encoding (core/persist/bytes.h; little-endian): u8 format version (1),
// the collection name (u64 length + bytes), then per op:
//   kCreateCollection  the IndexOptions fields (see EncodeWalEntry)
//   kDropCollection    nothing
//   kUpsert            i64 model_step, u64 n, n x u64 ids, u64 m, m x f32 vectors
//   kDelete            u8 allow_missing, u64 n, n x u64 ids
//   kChooseLandmarks   nothing (the choice is deterministic at that point)
//   kDrift             i64 model_step, u64 epoch, then three f32 arrays
//                      (u64 count + values): landmarks, linear a, linear b
//
// Thread safety: pure functions.
#ifndef NEGMINE_CORE_PERSIST_WAL_ENTRY_H_
#define NEGMINE_CORE_PERSIST_WAL_ENTRY_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "core/index.h"
#include "core/persist/bytes.h"

namespace negmine {

enum class WalOp : uint8_t {
  kCreateCollection = 1,
  kDropCollection = 2,
  kUpsert = 3,
  kDelete = 4,
  kChooseLandmarks = 5,
  kDrift = 6,
};

struct WalEntry {
  WalOp op = WalOp::kUpsert;
  std::string collection;
  IndexOptions options;              // kCreateCollection
  int64_t model_step = 0;            // kUpsert, kDrift
  bool allow_missing = false;        // kDelete
  uint64_t landmark_epoch = 0;       // kDrift
  std::vector<uint64_t> ids;         // kUpsert, kDelete
  std::vector<float> vectors;        // kUpsert: ids x dim; kDrift: the landmarks
  std::vector<float> linear_a, linear_b;  // kDrift with a linear map
};

std::string EncodeWalEntry(const WalEntry& entry);
// IndexOptions' fields, also used by snapshots.
void EncodeIndexOptions(const IndexOptions& options, ByteWriter& w);
bool DecodeIndexOptions(ByteReader& r, IndexOptions* options);
// `type` is the record's type byte (a WalOp).
//   DATA_LOSS: an unknown op or version, or a payload that does not parse.
absl::StatusOr<WalEntry> DecodeWalEntry(uint8_t type, std::string_view payload);

}  // namespace negmine

#endif  // NEGMINE_CORE_PERSIST_WAL_ENTRY_H_
