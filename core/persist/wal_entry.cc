#include "core/persist/wal_entry.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "core/persist/bytes.h"

namespace negmine {
namespace {

constexpr uint8_t kVersion = 1;

}  // namespace

void EncodeIndexOptions(const IndexOptions& o, ByteWriter& w) {
  w.Put<int32_t>(o.dim);
  w.Put<uint8_t>(static_cast<uint8_t>(o.metric));
  // The backend in the low 4 bits, the device dtype in the high 4 (files
  // written before the dtype existed hold 0 there: float32).
  w.Put<uint8_t>(static_cast<uint8_t>(static_cast<uint8_t>(o.backend) |
                                      (static_cast<uint8_t>(o.device_dtype) << 4)));
  w.Put<uint8_t>(static_cast<uint8_t>(o.kind));
  w.Put<uint64_t>(o.initial_capacity);
  w.Put<int32_t>(o.tree.leaf_size);
  w.Put<int32_t>(o.tree.branching);
  w.Put<uint8_t>(o.tree.background_rebuild ? 1 : 0);
  w.Put<int32_t>(o.drift.num_landmarks);
  w.Put<double>(o.drift.rebase_residual);
  w.Put<int64_t>(o.drift.rebase_every_steps);
  w.Put<uint64_t>(o.drift.seed);
}

bool DecodeIndexOptions(ByteReader& r, IndexOptions* o) {
  uint8_t metric = 0, backend = 0, kind = 0, rebuild = 0;
  const bool ok = r.Get(&o->dim) && r.Get(&metric) && r.Get(&backend) && r.Get(&kind) &&
                  r.Get(&o->initial_capacity) && r.Get(&o->tree.leaf_size) &&
                  r.Get(&o->tree.branching) && r.Get(&rebuild) &&
                  r.Get(&o->drift.num_landmarks) && r.Get(&o->drift.rebase_residual) &&
                  r.Get(&o->drift.rebase_every_steps) && r.Get(&o->drift.seed) &&
                  metric <= 1 && (backend & 15) <= 2 && (backend >> 4) <= 2 &&
                  kind <= 1 && rebuild <= 1;
  o->metric = static_cast<Metric>(metric);
  o->backend = static_cast<Backend>(backend & 15);
  o->device_dtype = static_cast<DeviceDtype>(backend >> 4);
  o->kind = static_cast<IndexKind>(kind);
  o->tree.background_rebuild = rebuild != 0;
  return ok;
}

std::string EncodeWalEntry(const WalEntry& e) {
  ByteWriter w;
  w.Put<uint8_t>(kVersion);
  w.PutString(e.collection);
  switch (e.op) {
    case WalOp::kCreateCollection:
      EncodeIndexOptions(e.options, w);
      break;
    case WalOp::kDropCollection:
    case WalOp::kChooseLandmarks:
      break;
    case WalOp::kUpsert:
      w.Put<int64_t>(e.model_step);
      w.PutArray(e.ids);
      w.PutArray(e.vectors);
      break;
    case WalOp::kDelete:
      w.Put<uint8_t>(e.allow_missing ? 1 : 0);
      w.PutArray(e.ids);
      break;
    case WalOp::kDrift:
      w.Put<int64_t>(e.model_step);
      w.Put<uint64_t>(e.landmark_epoch);
      w.PutArray(e.vectors);
      w.PutArray(e.linear_a);
      w.PutArray(e.linear_b);
      break;
  }
  return std::move(w.bytes());
}

absl::StatusOr<WalEntry> DecodeWalEntry(uint8_t type, std::string_view payload) {
  WalEntry e;
  if (type < 1 || type > 6) {
    return absl::DataLossError(absl::StrCat("unknown write-ahead log record type ", type));
  }
  e.op = static_cast<WalOp>(type);
  ByteReader r(payload);
  uint8_t version = 0;
  bool ok = r.Get(&version) && version == kVersion && r.GetString(&e.collection);
  switch (e.op) {
    case WalOp::kCreateCollection:
      ok = ok && DecodeIndexOptions(r, &e.options);
      break;
    case WalOp::kDropCollection:
    case WalOp::kChooseLandmarks:
      break;
    case WalOp::kUpsert:
      ok = ok && r.Get(&e.model_step) && r.GetArray(&e.ids) && r.GetArray(&e.vectors);
      break;
    case WalOp::kDelete: {
      uint8_t allow = 0;
      ok = ok && r.Get(&allow) && r.GetArray(&e.ids);
      e.allow_missing = allow != 0;
      break;
    }
    case WalOp::kDrift:
      ok = ok && r.Get(&e.model_step) && r.Get(&e.landmark_epoch) && r.GetArray(&e.vectors) &&
           r.GetArray(&e.linear_a) && r.GetArray(&e.linear_b);
      break;
  }
  if (!ok || !r.done()) {
    return absl::DataLossError(absl::StrCat(
        "a write-ahead log record of type ", type, " (", payload.size(),
        " bytes) does not parse: written by another version, or corrupt"));
  }
  return e;
}

}  // namespace negmine
