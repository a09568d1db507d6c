#include "core/drift/drift.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include <Eigen/Eigenvalues>

#include "absl/strings/str_cat.h"
#include "core/parallel.h"
#include "core/random.h"

namespace negmine {
namespace {

using MatrixD = Eigen::MatrixXd;

// Exponents of the exp-inner kernel are capped here, so that k stays finite
// for an outlier of large norm.
constexpr float kMaxExponent = 60.0f;
constexpr size_t kApplyBlock = 1024;
constexpr int kMedianSample = 256;

// Median of ||l_i - l_j||^2 over pairs of the first kMedianSample landmarks.
float MedianSquaredDistance(const RowMatrixF& l) {
  const int n = std::min<int>(l.rows(), kMedianSample);
  std::vector<float> d;
  for (int i = 0; i < n; ++i) {
    for (int j = i + 1; j < n; ++j) d.push_back((l.row(i) - l.row(j)).squaredNorm());
  }
  if (d.empty()) return 1.0f;
  std::nth_element(d.begin(), d.begin() + d.size() / 2, d.end());
  return std::max(d[d.size() / 2], std::numeric_limits<float>::min());
}

}  // namespace

const char* DriftKernelName(DriftKernel k) {
  switch (k) {
    case DriftKernel::kNone: return "none";
    case DriftKernel::kLinear: return "linear";
    case DriftKernel::kGaussian: return "gaussian";
    case DriftKernel::kExpInner: return "exp_inner";
  }
  return "?";
}

RowMatrixF DriftModel::Features(const float* x, size_t n) const {
  const int d = static_cast<int>(landmarks.cols());
  Eigen::Map<const RowMatrixF> xs(x, n, d);
  RowMatrixF f = xs * landmarks.transpose();
  switch (kernel) {
    case DriftKernel::kNone:
    case DriftKernel::kLinear:
      break;
    case DriftKernel::kGaussian: {
      const Eigen::VectorXf xn = xs.rowwise().squaredNorm();
      const Eigen::RowVectorXf ln = landmarks.rowwise().squaredNorm().transpose();
      const float inv_w = 1.0f / width;
      for (Eigen::Index i = 0; i < f.rows(); ++i) {
        for (Eigen::Index j = 0; j < f.cols(); ++j) {
          const float sq = std::max(xn[i] + ln[j] - 2.0f * f(i, j), 0.0f);
          f(i, j) = std::exp(-sq * inv_w);
        }
      }
      break;
    }
    case DriftKernel::kExpInner: {
      const float inv_w = 1.0f / width;
      f = ((f.array() - center) * inv_w).min(kMaxExponent).exp().matrix();
      break;
    }
  }
  return f;
}

void DriftModel::Apply(const float* x, size_t n, bool normalize,
                       float* out) const {
  const int d = static_cast<int>(landmarks.cols());
  const size_t blocks = (n + kApplyBlock - 1) / kApplyBlock;
  // Blocks are independent: one GEMM pair each, spread over the cores.
  ParallelFor(blocks, 1, [&](size_t first, size_t last) {
    for (size_t blk = first; blk < last; ++blk) {
      const size_t b = blk * kApplyBlock;
      const size_t rows = std::min(kApplyBlock, n - b);
      const float* xb = x + b * d;
      float* ob = out + b * d;
      if (is_identity()) {
        if (ob != xb) std::copy_n(xb, rows * d, ob);
      } else {
        RowMatrixF moved = Features(xb, rows) * coef;
        moved += Eigen::Map<const RowMatrixF>(xb, rows, d);
        std::copy_n(moved.data(), rows * d, ob);
      }
      if (normalize) NormalizeRows(ob, rows, d);
    }
  });
}

namespace {

// The eigenpairs of a kernel matrix that the ridge needs: K = U diag(ev) U^T
// on the span of U (m x r); when r < m, K is zero on the rest (the linear
// kernel's rank is at most d).
struct KernelEigen {
  MatrixD u;
  Eigen::VectorXd ev;
  double mean_diag = 0;
};

// Symmetric eigendecomposition (Eigen's tridiagonal QR). LAPACK's dsyevd
// through OpenBLAS is faster at large m, but OpenBLAS's pthread build starts
// its threads when the library loads, before the server blocks SIGTERM for
// its signal thread, so a linked server dies on SIGTERM instead of draining.
bool SymmetricEigen(MatrixD k, KernelEigen* out) {
  out->mean_diag = std::max(k.diagonal().mean(), 1e-12);
  Eigen::SelfAdjointEigenSolver<MatrixD> eig(k);
  if (eig.info() != Eigen::Success) return false;
  out->u = eig.eigenvectors();
  out->ev = eig.eigenvalues().cwiseMax(0.0);
  return true;
}

// The linear kernel E E^T through the d x d Gram matrix E^T E = V S V^T:
// U = E V S^-1/2 on the eigenvalues above a relative floor. O(m d^2).
bool LinearEigen(const MatrixD& e, KernelEigen* out) {
  KernelEigen gram;
  if (!SymmetricEigen(e.transpose() * e, &gram)) return false;
  const double floor = 1e-12 * std::max(gram.ev.maxCoeff(), 1e-300);
  std::vector<Eigen::Index> keep;
  for (Eigen::Index i = 0; i < gram.ev.size(); ++i) {
    if (gram.ev[i] > floor) keep.push_back(i);
  }
  out->u.resize(e.rows(), keep.size());
  out->ev.resize(keep.size());
  for (size_t j = 0; j < keep.size(); ++j) {
    out->ev[j] = gram.ev[keep[j]];
    out->u.col(j) = e * gram.u.col(keep[j]) / std::sqrt(gram.ev[keep[j]]);
  }
  out->mean_diag = std::max(e.rowwise().squaredNorm().mean(), 1e-12);
  return true;
}

struct RidgeChoice {
  double residual = std::numeric_limits<double>::infinity();
  double lambda = 0;
  MatrixD coef;  // (K + lambda I)^-1 D
};

// Every lambda of the grid from one eigendecomposition, each scored by its
// exact leave-one-out residual: with H = (K + lambda I)^-1, landmark i
// predicted from the others is E_i + D_i - (H D)_i / H_ii.
RidgeChoice ChooseLambda(const KernelEigen& eig, const MatrixD& e,
                         const MatrixD& disp, const MatrixD& g, double g_norm,
                         bool normalize, int* candidates) {
  const Eigen::Index m = e.rows(), d = e.cols();
  const bool full_rank = eig.u.cols() == m;
  const MatrixD ut_disp = eig.u.transpose() * disp;
  const MatrixD u2 = eig.u.cwiseAbs2();
  RidgeChoice best;
  RowMatrixF pred(m, d);
  for (double c : {1e-3, 1e-2, 1e-1, 1.0, 10.0}) {
    ++*candidates;
    const double lambda = c * eig.mean_diag;
    Eigen::VectorXd inv = (eig.ev.array() + lambda).inverse().matrix();
    MatrixD coef;
    Eigen::VectorXd h_diag;
    if (full_rank) {
      coef = eig.u * (inv.asDiagonal() * ut_disp);
      h_diag = u2 * inv;
    } else {
      // H = U diag(1/(ev + lambda)) U^T + (I - U U^T) / lambda.
      inv.array() -= 1.0 / lambda;
      coef = eig.u * (inv.asDiagonal() * ut_disp) + disp / lambda;
      h_diag = (u2 * inv).array() + 1.0 / lambda;
    }
    for (Eigen::Index i = 0; i < m; ++i) {
      pred.row(i) = (e.row(i) + disp.row(i) - coef.row(i) / h_diag[i]).cast<float>();
    }
    if (normalize) NormalizeRows(pred.data(), m, d);
    const double residual = std::sqrt((pred.cast<double>() - g).squaredNorm() / g_norm);
    if (residual < best.residual) {
      best.residual = residual;
      best.lambda = lambda;
      best.coef = std::move(coef);
    }
  }
  return best;
}

// Fits every kernel of `kernels` on the first m rows; `out[i]` is kernel i's
// best lambda (residual infinity where its eigensolver failed).
std::vector<RidgeChoice> FitKernels(const std::vector<DriftModel>& kernels,
                                    const RowMatrixF& frame, Eigen::Index m,
                                    const MatrixD& e, const MatrixD& disp,
                                    const MatrixD& g, bool normalize,
                                    int* candidates) {
  const double g_norm = std::max(g.squaredNorm(), std::numeric_limits<double>::min());
  std::vector<RidgeChoice> out(kernels.size());
  for (size_t i = 0; i < kernels.size(); ++i) {
    KernelEigen eig;
    bool ok;
    if (kernels[i].kernel == DriftKernel::kLinear) {
      ok = LinearEigen(e, &eig);
    } else {
      DriftModel cand = kernels[i];
      cand.landmarks = frame.topRows(m);
      MatrixD k = cand.Features(frame.data(), m).cast<double>();
      k = 0.5 * (k + k.transpose()).eval();
      ok = SymmetricEigen(std::move(k), &eig);
    }
    if (!ok) continue;
    out[i] = ChooseLambda(eig, e, disp, g, g_norm, normalize, candidates);
  }
  return out;
}

}  // namespace

absl::StatusOr<DriftFit> FitDrift(const RowMatrixF& frame,
                                  const RowMatrixF& current, bool normalize) {
  const Eigen::Index m = frame.rows(), d = frame.cols();
  if (m == 0) return absl::InvalidArgumentError("drift fit: no landmarks");
  if (current.rows() != m || current.cols() != d) {
    return absl::InvalidArgumentError(
        absl::StrCat("drift fit: ", current.rows(), " x ", current.cols(),
                     " re-encoded landmarks for ", m, " x ", d, " stored ones"));
  }
  const MatrixD e = frame.cast<double>();
  const MatrixD g = current.cast<double>();
  const MatrixD disp = g - e;
  const double g_norm = std::max(g.squaredNorm(), std::numeric_limits<double>::min());

  DriftFit best;
  best.model.landmarks = frame;
  best.stale_residual = std::sqrt(disp.squaredNorm() / g_norm);
  best.heldout_residual = best.stale_residual;
  best.candidates = 1;

  const float median_sq = MedianSquaredDistance(frame);
  const float mean_sq = std::max(
      static_cast<float>(frame.rowwise().squaredNorm().mean()),
      std::numeric_limits<float>::min());
  std::vector<DriftModel> kernels;
  kernels.push_back({.kernel = DriftKernel::kLinear});
  for (float f : {0.5f, 1.0f, 2.0f}) {
    kernels.push_back({.kernel = DriftKernel::kGaussian, .width = f * median_sq});
    kernels.push_back(
        {.kernel = DriftKernel::kExpInner, .width = f * mean_sq, .center = mean_sq});
  }

  std::vector<RidgeChoice> fits;
  if (m <= kScreenLandmarks) {
    fits = FitKernels(kernels, frame, m, e, disp, g, normalize, &best.candidates);
  } else {
    // Screening: every kernel on the first kScreenLandmarks landmarks (a
    // k-means++ prefix, so spread like the whole set); then the best
    // non-linear kernel and the linear one (cheap at any m) on all of them.
    const Eigen::Index ms = kScreenLandmarks;
    const MatrixD es = e.topRows(ms), ds = disp.topRows(ms), gs = g.topRows(ms);
    const RowMatrixF fs = frame.topRows(ms);
    const std::vector<RidgeChoice> screen =
        FitKernels(kernels, fs, ms, es, ds, gs, normalize, &best.candidates);
    size_t pick = 1;
    for (size_t i = 2; i < kernels.size(); ++i) {
      if (screen[i].residual < screen[pick].residual) pick = i;
    }
    const std::vector<DriftModel> finalists = {kernels[0], kernels[pick]};
    const std::vector<RidgeChoice> full =
        FitKernels(finalists, frame, m, e, disp, g, normalize, &best.candidates);
    fits.assign(kernels.size(), RidgeChoice{});
    fits[0] = full[0];
    fits[pick] = full[1];
    best.screened = true;
  }
  for (size_t i = 0; i < kernels.size(); ++i) {
    if (fits[i].residual < best.heldout_residual) {
      best.heldout_residual = fits[i].residual;
      best.model.kernel = kernels[i].kernel;
      best.model.width = kernels[i].width;
      best.model.center = kernels[i].center;
      best.model.lambda = fits[i].lambda;
      best.model.coef = fits[i].coef.cast<float>();
    }
  }
  return best;
}

std::vector<size_t> KMeansPlusPlus(const float* x, size_t n, int dim, int m,
                                   uint64_t seed) {
  std::vector<size_t> chosen;
  if (n == 0 || m <= 0) return chosen;
  m = static_cast<int>(std::min<size_t>(m, n));
  Rng rng(seed, /*stream=*/0x6c616e64);
  std::vector<double> dist(n, std::numeric_limits<double>::infinity());
  std::vector<uint8_t> taken(n, 0);
  size_t next = rng.Below(n);
  while (true) {
    chosen.push_back(next);
    taken[next] = 1;
    if (static_cast<int>(chosen.size()) == m) break;
    const float* c = x + next * dim;
    double total = 0;
    for (size_t i = 0; i < n; ++i) {
      if (taken[i]) {
        dist[i] = 0;
        continue;
      }
      const float* xi = x + i * dim;
      double sq = 0;
      for (int j = 0; j < dim; ++j) {
        const double t = double{xi[j]} - c[j];
        sq += t * t;
      }
      dist[i] = std::min(dist[i], sq);
      total += dist[i];
    }
    if (total > 0) {
      double u = rng.Uniform() * total;
      next = n;
      for (size_t i = 0; i < n; ++i) {
        if (taken[i] || dist[i] <= 0) continue;
        next = i;
        u -= dist[i];
        if (u <= 0) break;
      }
    } else {
      next = n;
    }
    if (next == n) {  // the rest duplicate chosen points: take any free one
      next = rng.Below(n);
      while (taken[next]) next = (next + 1) % n;
    }
  }
  return chosen;
}

}  // namespace negmine
