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

// Writes a 2-D array as .npy (dtype <f4 / <u8 / <i8 by T).
absl::Status SaveNpy(const std::string& path, size_t rows, size_t cols,
                     absl::Span<const float> data);
absl::Status SaveNpy(const std::string& path, size_t rows, size_t cols,
                     absl::Span<const uint64_t> data);

// Loads an .fvecs file. All vectors must have the same dim.
absl::StatusOr<Array<float>> LoadFvecs(const std::string& path);

}  // namespace negmine::client

#endif  // NEGMINE_CLIENT_NPY_H_
