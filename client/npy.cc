#include "client/npy.h"

#include <cstring>
#include <fstream>
#include <iterator>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "core/dtype.h"

namespace negmine::client {
namespace {

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  return std::string(std::istreambuf_iterator<char>(in), {});
}

struct Header {
  std::string descr;
  bool fortran = false;
  std::vector<size_t> shape;
  size_t data_offset = 0;
};

// Finds the value of 'key' in the header dict text.
std::string DictValue(const std::string& dict, const std::string& key) {
  const size_t k = dict.find("'" + key + "'");
  if (k == std::string::npos) return "";
  size_t v = dict.find(':', k);
  if (v == std::string::npos) return "";
  ++v;
  while (v < dict.size() && dict[v] == ' ') ++v;
  if (v >= dict.size()) return "";
  const char open = dict[v];
  const char close = open == '(' ? ')' : open == '\'' ? '\'' : ',';
  const size_t end = dict.find(close, v + 1);
  return dict.substr(v, end == std::string::npos ? std::string::npos : end - v + 1);
}

absl::StatusOr<Header> ParseHeader(const std::string& file,
                                   const std::string& path) {
  if (file.size() < 10 || file.compare(0, 6, "\x93NUMPY") != 0) {
    return absl::InvalidArgumentError(absl::StrCat(path, " is not an .npy file"));
  }
  const uint8_t major = static_cast<uint8_t>(file[6]);
  size_t header_len, start;
  if (major == 1) {
    header_len = static_cast<uint8_t>(file[8]) | (static_cast<uint8_t>(file[9]) << 8);
    start = 10;
  } else if (major == 2 || major == 3) {
    if (file.size() < 12) return absl::InvalidArgumentError(absl::StrCat(path, ": truncated header"));
    uint32_t len;
    std::memcpy(&len, file.data() + 8, 4);
    header_len = len;
    start = 12;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": unsupported .npy version ", int{major}));
  }
  if (start + header_len > file.size()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": truncated header"));
  }
  const std::string dict = file.substr(start, header_len);
  Header h;
  h.data_offset = start + header_len;
  std::string descr = DictValue(dict, "descr");
  h.descr = std::string(absl::StripSuffix(absl::StripPrefix(descr, "'"), "'"));
  h.fortran = DictValue(dict, "fortran_order").rfind("True", 0) == 0;
  std::string shape = DictValue(dict, "shape");
  shape = std::string(absl::StripSuffix(absl::StripPrefix(shape, "("), ")"));
  for (absl::string_view part : absl::StrSplit(shape, ',', absl::SkipWhitespace())) {
    size_t v;
    if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(part), &v)) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": bad shape '", shape, "'"));
    }
    h.shape.push_back(v);
  }
  if (h.fortran) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, " is in Fortran order; save it in C order (np.ascontiguousarray)"));
  }
  if (h.shape.empty() || h.shape.size() > 2) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, " has ", h.shape.size(), " dimensions; expected 1 or 2"));
  }
  return h;
}

template <typename T>
absl::StatusOr<Array<T>> Load(const std::string& path,
                              const std::vector<std::string>& accepted) {
  auto file = ReadFile(path);
  if (!file.ok()) return file.status();
  auto header = ParseHeader(*file, path);
  if (!header.ok()) return header.status();
  const Header& h = *header;
  Array<T> a;
  a.rows = h.shape[0];
  a.cols = h.shape.size() == 2 ? h.shape[1] : 1;
  const size_t count = a.rows * a.cols;
  size_t elem = 0;
  for (const std::string& d : accepted) {
    if (h.descr == d) elem = static_cast<size_t>(d[2] - '0');
  }
  if (elem == 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, " has dtype '", h.descr, "'; expected one of ",
        absl::StrJoin(accepted, ", ")));
  }
  if (file->size() - h.data_offset < count * elem) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": data is truncated (", file->size() - h.data_offset,
        " bytes for ", count, " values of ", elem, " bytes)"));
  }
  const char* src = file->data() + h.data_offset;
  a.data.resize(count);
  for (size_t i = 0; i < count; ++i) {
    const char* p = src + i * elem;
    const char kind = h.descr[1];
    if (kind == 'f') {
      if (elem == 2) {
        uint16_t v;
        std::memcpy(&v, p, 2);
        a.data[i] = static_cast<T>(HalfToFloat(v));
      } else if (elem == 4) {
        float v;
        std::memcpy(&v, p, 4);
        a.data[i] = static_cast<T>(v);
      } else {
        double v;
        std::memcpy(&v, p, 8);
        a.data[i] = static_cast<T>(v);
      }
    } else if (kind == 'i') {
      if (elem == 4) {
        int32_t v;
        std::memcpy(&v, p, 4);
        a.data[i] = static_cast<T>(v);
      } else {
        int64_t v;
        std::memcpy(&v, p, 8);
        a.data[i] = static_cast<T>(v);
      }
    } else {  // 'u'
      if (elem == 4) {
        uint32_t v;
        std::memcpy(&v, p, 4);
        a.data[i] = static_cast<T>(v);
      } else {
        uint64_t v;
        std::memcpy(&v, p, 8);
        a.data[i] = static_cast<T>(v);
      }
    }
  }
  return a;
}

absl::Status Save(const std::string& path, const char* descr, size_t rows,
                  size_t cols, const void* data, size_t bytes) {
  std::string dict = absl::StrCat("{'descr': '", descr,
                                  "', 'fortran_order': False, 'shape': (", rows,
                                  ", ", cols, "), }");
  // Pad so that the data starts on a 64-byte boundary; the header ends in \n.
  const size_t unpadded = 10 + dict.size() + 1;
  dict.append((64 - unpadded % 64) % 64, ' ');
  dict += '\n';
  std::string out = "\x93NUMPY";
  out += '\x01';
  out += '\x00';
  out += static_cast<char>(dict.size() & 0xff);
  out += static_cast<char>(dict.size() >> 8);
  out += dict;
  out.append(static_cast<const char*>(data), bytes);
  std::ofstream f(path, std::ios::binary);
  f.write(out.data(), out.size());
  if (!f) return absl::UnavailableError(absl::StrCat("cannot write ", path));
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<Array<float>> LoadNpyFloat(const std::string& path) {
  return Load<float>(path, {"<f4", "<f2", "<f8"});
}

absl::StatusOr<Array<int64_t>> LoadNpyInt(const std::string& path) {
  return Load<int64_t>(path, {"<i8", "<i4", "<u8", "<u4"});
}

absl::StatusOr<Array<uint64_t>> LoadNpyIds(const std::string& path, NegativeIds negative,
                                           const std::string& what) {
  auto file = ReadFile(path);
  if (!file.ok()) return file.status();
  auto header = ParseHeader(*file, path);
  if (!header.ok()) return header.status();
  const std::string descr = header->descr;
  if (descr != "<u8" && descr != "<u4" && descr != "<i8" && descr != "<i4") {
    return absl::InvalidArgumentError(absl::StrCat(
        what, ": ", path, " has dtype '", descr,
        "'; expected integer ids: <u8 (uint64), <u4, <i8 or <i4"));
  }
  Array<uint64_t> out;
  if (descr[1] == 'u') {
    // Read unsigned values as they are: no detour through int64.
    auto a = Load<uint64_t>(path, {descr});
    if (!a.ok()) return a.status();
    return *std::move(a);
  }
  auto a = Load<int64_t>(path, {descr});
  if (!a.ok()) return a.status();
  out.rows = a->rows;
  out.cols = a->cols;
  out.data.resize(a->data.size());
  for (size_t i = 0; i < a->data.size(); ++i) {
    const int64_t v = a->data[i];
    if (v >= 0) {
      out.data[i] = static_cast<uint64_t>(v);
    } else if (negative == NegativeIds::kPadding) {
      out.data[i] = kPaddingId;
    } else {
      return absl::InvalidArgumentError(absl::StrCat(
          what, ": ", path, " holds the negative id ", v, " (row ", i / out.cols,
          out.cols > 1 ? absl::StrCat(", column ", i % out.cols) : "",
          "); ids are unsigned 64-bit integers (use uint64 for ids >= 2^63)"));
    }
  }
  return out;
}

absl::Status SaveNpy(const std::string& path, size_t rows, size_t cols,
                     absl::Span<const float> data) {
  return Save(path, "<f4", rows, cols, data.data(), data.size() * 4);
}

absl::Status SaveNpy(const std::string& path, size_t rows, size_t cols,
                     absl::Span<const uint64_t> data) {
  return Save(path, "<u8", rows, cols, data.data(), data.size() * 8);
}

absl::Status SaveNpy(const std::string& path, size_t rows, size_t cols,
                     absl::Span<const double> data) {
  return Save(path, "<f8", rows, cols, data.data(), data.size() * 8);
}

absl::StatusOr<Array<float>> LoadFvecs(const std::string& path) {
  auto file = ReadFile(path);
  if (!file.ok()) return file.status();
  Array<float> a;
  size_t pos = 0;
  while (pos < file->size()) {
    if (file->size() - pos < 4) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": truncated at byte ", pos));
    }
    int32_t dim;
    std::memcpy(&dim, file->data() + pos, 4);
    if (dim <= 0 || (a.rows > 0 && static_cast<size_t>(dim) != a.cols)) {
      return absl::InvalidArgumentError(absl::StrCat(
          path, ": vector ", a.rows, " has dim ", dim,
          a.rows > 0 ? absl::StrCat(", the first had ", a.cols) : ""));
    }
    a.cols = dim;
    pos += 4;
    if (file->size() - pos < a.cols * 4) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": vector ", a.rows, " is truncated"));
    }
    const size_t old = a.data.size();
    a.data.resize(old + a.cols);
    std::memcpy(a.data.data() + old, file->data() + pos, a.cols * 4);
    pos += a.cols * 4;
    ++a.rows;
  }
  return a;
}

}  // namespace negmine::client
