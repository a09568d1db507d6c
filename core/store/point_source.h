// PointSource: a read-only view of the scoring-space vectors of a store's
// rows, the one form in which the tree, the drift state and the device mirror
// read vectors (docs/ARCHITECTURE.md, "Layers").
//
// Thread safety: a view; valid while the storage it points into is unchanged.
#ifndef NEGMINE_CORE_STORE_POINT_SOURCE_H_
#define NEGMINE_CORE_STORE_POINT_SOURCE_H_

#include <algorithm>
#include <cstddef>
#include <cstdint>

namespace negmine {

// The scoring-space vector of a store row: data[row * dim + j] * scale[row]
// (scale is null for inner product).
struct PointSource {
  const float* data = nullptr;
  const float* scale = nullptr;
  int dim = 0;

  void Get(uint32_t row, float* out) const {
    const float* x = data + size_t{row} * dim;
    if (!scale) {
      std::copy_n(x, dim, out);
      return;
    }
    const float s = scale[row];
    for (int j = 0; j < dim; ++j) out[j] = x[j] * s;
  }
  // Starts loading a row's vector into the cache. A gather of scattered rows
  // is bound by memory latency; prefetching a few rows ahead overlaps it.
  void Prefetch(uint32_t row) const {
    const char* x = reinterpret_cast<const char*>(data + size_t{row} * dim);
    for (size_t b = 0; b < size_t(dim) * sizeof(float); b += 64) __builtin_prefetch(x + b);
  }
  float Scale(uint32_t row) const { return scale ? scale[row] : 1.0f; }
};

}  // namespace negmine

#endif  // NEGMINE_CORE_STORE_POINT_SOURCE_H_
