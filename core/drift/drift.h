// Nystrom drift correction (DESIGN.md idea 2): the math, free of any index.
//
// The trainer's encoder moves at every step; the index holds stale
// embeddings and hears, per step, only the re-encodings of m landmarks.
//
// Notation. The frame E: one vector per target, the index's embedding of it
// at the last re-base, in scoring space (cosine: unit rows). The landmarks L:
// m targets; E(L) their frame rows (m x d) and G_t(L) the trainer's
// re-encodings at step t (scoring space too). The displacement form:
//
//   ghat_t(y) = E(y) + k(E(y), E(L)) C_t,
//   C_t       = (K_LL + lambda I)^-1 (G_t(L) - E(L)),      K_LL = k(E(L), E(L)),
//
// re-normalized to unit length when the collection is cosine. It interpolates
// the landmarks' *displacements*, not the embeddings: with lambda large, or
// with no landmark near y, k(y, L) C_t -> 0 and ghat stays at the stale E(y).
// That is the shrinkage toward "no correction". Interpolating the embeddings
// themselves (ghat = k(y, L) (K + lambda I)^-1 G) was measured worse than no
// correction at small drift: it throws away E(y), the best single guess.
//
// Kernels, over frame vectors x and landmark frame rows l:
//   linear     k = <x, l>
//   Gaussian   k = exp(-||x - l||^2 / w),   w = f * median ||l_i - l_j||^2
//   exp-inner  k = exp((<x, l> - s) / w),   w = f * s, s = mean ||l||^2
//              (s centers the exponent: it only rescales k, and keeps it
//              finite)
// with f in {0.5, 1, 2}. Exp-inner equals the Gaussian on unit vectors up to
// the width; it differs for inner-product collections.
//
// Selection. (kernel, f, lambda), with "no correction" always a candidate, is
// the one with the smallest held-out residual, where every landmark is held
// out in turn (exact leave-one-out ridge: with (K + lambda I)^-1 = H, the
// displacement predicted for landmark i from the others is
// D_i - (H D)_i / H_ii). One eigendecomposition of K per kernel serves
// every lambda, H_ii and H D in closed form; the
// linear kernel's comes from the d x d Gram matrix, O(m d^2). Leave-one-out
// over all m landmarks is steadier than one held-out split at small m, and
// costs the same. lambda = c * mean(diag K), c in {1e-3, 1e-2, 1e-1, 1, 10}.
// Above kScreenLandmarks landmarks the six non-linear kernels are screened
// on the first kScreenLandmarks (a k-means++ prefix) and only the best is
// decomposed at full m, with the linear one: six full-m eigendecompositions
// would not fit a drift update's budget.
//
// The residual reported is the relative error of the re-normalized
// leave-one-out predictions: ||ghat(L) - G(L)||_F / ||G(L)||_F, and the
// stale residual is the same for ghat = E (no correction).
//
// Thread safety: DriftModel is immutable after FitDrift; its const methods
// may run concurrently. Apply splits its rows over the cores (ParallelFor).
// The functions are pure.
#ifndef NEGMINE_CORE_DRIFT_DRIFT_H_
#define NEGMINE_CORE_DRIFT_DRIFT_H_

#include <cstdint>
#include <vector>

#include <Eigen/Core>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "core/linalg.h"

namespace negmine {

using RowMatrixF =
    Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

enum class DriftKernel { kNone, kLinear, kGaussian, kExpInner };
const char* DriftKernelName(DriftKernel k);

// A fitted correction x -> x + k(x, L) C.
struct DriftModel {
  DriftKernel kernel = DriftKernel::kNone;
  float width = 1;   // w above
  float center = 0;  // s above (exp-inner)
  double lambda = 0;
  RowMatrixF landmarks;  // m x d: E(L)
  RowMatrixF coef;       // m x d: C (empty for kNone)

  bool is_identity() const { return kernel == DriftKernel::kNone; }
  // k(x_i, l_j) for the n rows of x (n x d): an n x m matrix.
  RowMatrixF Features(const float* x, size_t n) const;
  // out_i = x_i + k(x_i, L) C, re-normalized if `normalize`; n rows of d.
  // `out` may equal `x`.
  void Apply(const float* x, size_t n, bool normalize, float* out) const;
};

struct DriftFit {
  DriftModel model;
  double heldout_residual = 0;  // of the chosen model, leave-one-out
  double stale_residual = 0;    // of "no correction"
  int candidates = 0;           // models compared
  bool screened = false;        // kernels screened on a prefix (m > kScreenLandmarks)
};

// Above this many landmarks, FitDrift screens the kernels on the first
// kScreenLandmarks and refits only the best one (and the linear kernel) on
// all of them.
inline constexpr int kScreenLandmarks = 512;

// Fits C_t from the landmarks' frame rows `frame` (m x d) and their
// re-encodings `current` (m x d), both in scoring space; `normalize` for
// cosine collections.
//   INVALID_ARGUMENT: mismatched shapes, or no landmarks.
absl::StatusOr<DriftFit> FitDrift(const RowMatrixF& frame,
                                  const RowMatrixF& current, bool normalize);

// k-means++ seeding (D^2 sampling) over the n rows of x: m distinct row
// indices, m <= n. Deterministic in seed.
std::vector<size_t> KMeansPlusPlus(const float* x, size_t n, int dim, int m,
                                   uint64_t seed);

}  // namespace negmine

#endif  // NEGMINE_CORE_DRIFT_DRIFT_H_
