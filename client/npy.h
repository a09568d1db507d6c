// Reading and writing the array files users hold: NumPy .npy (version 1-3,
// C order, little-endian) and .fvecs (per vector: int32 dim, then dim
// float32).
//
// Thread safety: all functions are reentrant.
#ifndef NEGMINE_CLIENT_NPY_H_
#define NEGMINE_CLIENT_NPY_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace negmine::client {

// A 1-D or 2-D array. A 1-D array of n values has rows = n, cols = 1.
template <typename T>
struct Array {
  size_t rows = 0;
  size_t cols = 0;
  std::vector<T> data;  // rows x cols, row-major
};

// Loads a float array: dtype <f4, <f2 or <f8 (converted to float32).
//   INVALID_ARGUMENT: not an .npy, Fortran order, more than 2 dims, or
//     another dtype (named in the message). NOT_FOUND: no such file.
absl::StatusOr<Array<float>> LoadNpyFloat(const std::string& path);

// Loads an integer array (<i4, <i8, <u4, <u8) as int64 (ids above 2^63
// arrive as negative values; callers that want uint64 cast back).
absl::StatusOr<Array<int64_t>> LoadNpyInt(const std::string& path);

// The id that marks "no id" in the id arrays negmine writes (a short row of
// `mine --out`, a short last batch of `batches`), and padding in the arrays
// it reads.
inline constexpr uint64_t kPaddingId = ~uint64_t{0};

// What a negative entry of a signed id array (<i4, <i8) means.
enum class NegativeIds {
  kError,    // INVALID_ARGUMENT naming the entry: ids are >= 0
  kPadding,  // padding: read as kPaddingId
};

// Loads an id array: unsigned dtypes (<u4, <u8) keep every uint64 value
// (hashed ids >= 2^63 included); signed ones (<i4, <i8) map negative entries
// by `negative`. `what` names the array in messages ("--ids").
absl::StatusOr<Array<uint64_t>> LoadNpyIds(const std::string& path, NegativeIds negative,
                                           const std::string& what);

// Writes a 2-D array as .npy (dtype <f4 / <u8 / <f8 by T).
absl::Status SaveNpy(const std::string& path, size_t rows, size_t cols,
                     absl::Span<const float> data);
absl::Status SaveNpy(const std::string& path, size_t rows, size_t cols,
                     absl::Span<const uint64_t> data);
absl::Status SaveNpy(const std::string& path, size_t rows, size_t cols,
                     absl::Span<const double> data);

// Loads an .fvecs file. All vectors must have the same dim.
absl::StatusOr<Array<float>> LoadFvecs(const std::string& path);

}  // namespace negmine::client

#endif  // NEGMINE_CLIENT_NPY_H_
