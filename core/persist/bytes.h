// Little-endian byte encoding shared by the write-ahead log entries and the
// snapshots: fixed-size values, length-prefixed strings and arrays.
//
// Thread safety: a ByteWriter or ByteReader is used by one thread.
#ifndef NEGMINE_CORE_PERSIST_BYTES_H_
#define NEGMINE_CORE_PERSIST_BYTES_H_

#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

namespace negmine {

class ByteWriter {
 public:
  template <typename T>
  void Put(T v) {
    static_assert(std::is_trivially_copyable_v<T>);
    char b[sizeof(T)];
    std::memcpy(b, &v, sizeof(T));  // little-endian hosts only (x86-64, arm64)
    out_.append(b, sizeof(T));
  }
  void PutString(std::string_view s) {
    Put<uint64_t>(s.size());
    out_.append(s.data(), s.size());
  }
  template <typename T>
  void PutArray(const T* data, size_t n) {
    Put<uint64_t>(n);
    if (n > 0) out_.append(reinterpret_cast<const char*>(data), n * sizeof(T));
  }
  template <typename T>
  void PutArray(const std::vector<T>& v) {
    PutArray(v.data(), v.size());
  }
  std::string& bytes() { return out_; }

 private:
  std::string out_;
};

// Every Get returns false (and leaves the reader failed) when the input is
// too short; lengths are checked against what is left before allocating.
class ByteReader {
 public:
  explicit ByteReader(std::string_view in) : in_(in) {}
  template <typename T>
  bool Get(T* v) {
    static_assert(std::is_trivially_copyable_v<T>);
    if (in_.size() < sizeof(T)) return false;
    std::memcpy(v, in_.data(), sizeof(T));
    in_.remove_prefix(sizeof(T));
    return true;
  }
  bool GetString(std::string* s) {
    uint64_t n;
    if (!Get(&n) || n > in_.size()) return false;
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

}  // namespace negmine

#endif  // NEGMINE_CORE_PERSIST_BYTES_H_
