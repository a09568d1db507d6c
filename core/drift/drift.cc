#include "core/drift/drift.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include <Eigen/Eigenvalues>

#include "absl/strings/str_cat.h"
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
  for (size_t b = 0; b < n; b += kApplyBlock) {
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
}

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

  for (DriftModel& cand : kernels) {
    cand.landmarks = frame;
    MatrixD k = cand.Features(frame.data(), m).cast<double>();
    k = 0.5 * (k + k.transpose()).eval();
    Eigen::SelfAdjointEigenSolver<MatrixD> eig(k);
    if (eig.info() != Eigen::Success) continue;
    const MatrixD& u = eig.eigenvectors();
    const Eigen::VectorXd ev = eig.eigenvalues().cwiseMax(0.0);
    const MatrixD ut_disp = u.transpose() * disp;
    const MatrixD u2 = u.cwiseAbs2();
    const double mean_diag = std::max(k.diagonal().mean(), 1e-12);
    for (double c : {1e-3, 1e-2, 1e-1, 1.0, 10.0}) {
      ++best.candidates;
      const double lambda = c * mean_diag;
      const Eigen::VectorXd inv = (ev.array() + lambda).inverse().matrix();
      const MatrixD coef = u * (inv.asDiagonal() * ut_disp);  // (K + lambda I)^-1 D
      const Eigen::VectorXd h_diag = u2 * inv;
      // Leave-one-out: landmark i predicted from the others.
      RowMatrixF pred(m, d);
      for (Eigen::Index i = 0; i < m; ++i) {
        pred.row(i) = (e.row(i) + disp.row(i) - coef.row(i) / h_diag[i]).cast<float>();
      }
      if (normalize) NormalizeRows(pred.data(), m, d);
      const double residual =
          std::sqrt((pred.cast<double>() - g).squaredNorm() / g_norm);
      if (residual < best.heldout_residual) {
        best.heldout_residual = residual;
        best.model.kernel = cand.kernel;
        best.model.width = cand.width;
        best.model.center = cand.center;
        best.model.lambda = lambda;
        best.model.coef = coef.cast<float>();
      }
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
