#include "core/persist/wal_entry.h"

#include <cstring>

#include "absl/strings/str_cat.h"

namespace negmine {
namespace {

constexpr uint8_t kVersion = 1;

class Writer {
 public:
  template <typename T>
  void Put(T v) {
    static_assert(std::is_trivially_copyable_v<T>);
    char b[sizeof(T)];
    std::memcpy(b, &v, sizeof(T));  // little-endian hosts only (x86-64, arm64)
    out_.append(b, sizeof(T));
  }
  void PutString(const std::string& s) {
    Put<uint32_t>(static_cast<uint32_t>(s.size()));
    out_.append(s);
  }
  template <typename T>
  void PutArray(const std::vector<T>& v) {
    Put<uint64_t>(v.size());
    if (!v.empty()) out_.append(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
  }
  std::string Done() { return std::move(out_); }

 private:
  std::string out_;
};

class Reader {
 public:
  explicit Reader(std::string_view in) : in_(in) {}
  template <typename T>
  bool Get(T* v) {
    if (in_.size() < sizeof(T)) return false;
    std::memcpy(v, in_.data(), sizeof(T));
    in_.remove_prefix(sizeof(T));
    return true;
  }
  bool GetString(std::string* s) {
    uint32_t n;
    if (!Get(&n) || in_.size() < n) return false;
    s->assign(in_.data(), n);
    in_.remove_prefix(n);
    return true;
  }
  template <typename T>
  bool GetArray(std::vector<T>* v) {
    uint64_t n;
    if (!Get(&n) || n > in_.size() / sizeof(T)) return false;
    v->resize(n);
    if (n > 0) std::memcpy(v->data(), in_.data(), n * sizeof(T));
    in_.remove_prefix(n * sizeof(T));
    return true;
  }
  bool done() const { return in_.empty(); }

 private:
  std::string_view in_;
};

}  // namespace

std::string EncodeWalEntry(const WalEntry& e) {
  Writer w;
  w.Put<uint8_t>(kVersion);
  w.PutString(e.collection);
  switch (e.op) {
    case WalOp::kCreateCollection: {
      const IndexOptions& o = e.options;
      w.Put<int32_t>(o.dim);
      w.Put<uint8_t>(static_cast<uint8_t>(o.metric));
      w.Put<uint8_t>(static_cast<uint8_t>(o.backend));
      w.Put<uint8_t>(static_cast<uint8_t>(o.kind));
      w.Put<uint64_t>(o.initial_capacity);
      w.Put<int32_t>(o.tree.leaf_size);
      w.Put<int32_t>(o.tree.branching);
      w.Put<uint8_t>(o.tree.background_rebuild ? 1 : 0);
      w.Put<int32_t>(o.drift.num_landmarks);
      w.Put<double>(o.drift.rebase_residual);
      w.Put<int64_t>(o.drift.rebase_every_steps);
      w.Put<uint64_t>(o.drift.seed);
      break;
    }
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
  return w.Done();
}

absl::StatusOr<WalEntry> DecodeWalEntry(uint8_t type, std::string_view payload) {
  WalEntry e;
  if (type < 1 || type > 6) {
    return absl::DataLossError(absl::StrCat("unknown write-ahead log record type ", type));
  }
  e.op = static_cast<WalOp>(type);
  Reader r(payload);
  uint8_t version = 0;
  bool ok = r.Get(&version) && version == kVersion && r.GetString(&e.collection);
  switch (e.op) {
    case WalOp::kCreateCollection: {
      IndexOptions& o = e.options;
      uint8_t metric = 0, backend = 0, kind = 0, rebuild = 0;
      ok = ok && r.Get(&o.dim) && r.Get(&metric) && r.Get(&backend) && r.Get(&kind) &&
           r.Get(&o.initial_capacity) && r.Get(&o.tree.leaf_size) && r.Get(&o.tree.branching) &&
           r.Get(&rebuild) && r.Get(&o.drift.num_landmarks) && r.Get(&o.drift.rebase_residual) &&
           r.Get(&o.drift.rebase_every_steps) && r.Get(&o.drift.seed) && metric <= 1 &&
           backend <= 2 && kind <= 1;
      o.metric = static_cast<Metric>(metric);
      o.backend = static_cast<Backend>(backend);
      o.kind = static_cast<IndexKind>(kind);
      o.tree.background_rebuild = rebuild != 0;
      break;
    }
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
