// libFuzzer target: the write-ahead log's readers never crash, hang or read
// out of bounds on arbitrary bytes. Built with clang (-fsanitize=fuzzer,
// address,undefined) by tests/CMakeLists.txt and run for a bounded time in
// `make test`; the seed corpus is tests/fuzz/corpus/wal/ (real logs).
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <string>

#include "core/persist/wal.h"
#include "core/persist/wal_entry.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace negmine;
  // As a log file.
  static const std::string path = "/tmp/negmine-wal-fuzz-" + std::to_string(::getpid());
  if (FILE* f = std::fopen(path.c_str(), "wb")) {
    std::fwrite(data, 1, size, f);
    std::fclose(f);
    absl::StatusOr<WalContents> c = ReadWal(path);
    if (c.ok()) {
      if (c->valid_bytes + c->torn_bytes != size) __builtin_trap();
      for (const WalRecord& r : c->records) DecodeWalEntry(r.type, r.payload).IgnoreError();
    }
  }
  // As one record's payload.
  if (size > 0) {
    absl::StatusOr<WalEntry> e = DecodeWalEntry(
        data[0], std::string_view(reinterpret_cast<const char*>(data + 1), size - 1));
    // What decodes re-encodes canonically: encode, decode, encode is stable.
    if (e.ok()) {
      const std::string once = EncodeWalEntry(*e);
      absl::StatusOr<WalEntry> again = DecodeWalEntry(data[0], once);
      if (!again.ok() || EncodeWalEntry(*again) != once) __builtin_trap();
    }
  }
  return 0;
}
