// Small dense-vector helpers shared across core/.
//
// Thread safety: pure functions.
#ifndef NEGMINE_CORE_LINALG_H_
#define NEGMINE_CORE_LINALG_H_

#include <cmath>
#include <cstddef>

namespace negmine {

// Scales each of the n rows of x (n x dim, row-major) to unit length; zero
// rows stay zero.
inline void NormalizeRows(float* x, size_t n, int dim) {
  for (size_t i = 0; i < n; ++i) {
    float* row = x + i * dim;
    double sq = 0;
    for (int j = 0; j < dim; ++j) sq += double{row[j]} * row[j];
    if (sq > 0) {
      const float inv = static_cast<float>(1.0 / std::sqrt(sq));
      for (int j = 0; j < dim; ++j) row[j] *= inv;
    }
  }
}

}  // namespace negmine

#endif  // NEGMINE_CORE_LINALG_H_
