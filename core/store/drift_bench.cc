#include "core/store/drift_bench.h"

#include <algorithm>
#include <cmath>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/random.h"

namespace negmine {
namespace {

// Stream numbers keep each random quantity independent of the sizes of the
// others, so growing num_targets does not change the queries or the encoder.
enum Stream : uint64_t {
  kCenters = 1,
  kClusterCdf,
  kTargets,
  kQueries,
  kW1,
  kB1,
  kW2,
  kDw1,
  kDb1,
  kDw2,
};

template <typename M>
void FillNormal(M& m, double scale, uint64_t seed, uint64_t stream) {
  Rng rng(seed, stream);
  for (Eigen::Index i = 0; i < m.size(); ++i) {
    m.data()[i] = static_cast<float>(scale * rng.Normal());
  }
}

}  // namespace

absl::StatusOr<DriftBenchPreset> ParseDriftBenchPreset(absl::string_view name) {
  if (name == "easy") return DriftBenchPreset::kEasy;
  if (name == "hard") return DriftBenchPreset::kHard;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown drift-bench preset '", name, "' (want easy or hard)"));
}

std::string DriftBenchPresetName(DriftBenchPreset preset) {
  return preset == DriftBenchPreset::kHard ? "hard" : "easy";
}

DriftBenchConfig DriftBenchPresetConfig(DriftBenchPreset preset) {
  DriftBenchConfig c;
  if (preset == DriftBenchPreset::kHard) {
    // Calibrated at 1M x 128 (BENCHMARKS.md, "Hard preset and real data"):
    // FAISS IVF-Flat with 4 sqrt(N) lists needs nprobe >= 256 for
    // recall@64 0.94. The spread is the knob: at 100k (1,265 lists)
    // nprobe 128 reaches recall 0.979 at spread 1.0, 0.921 at 1.5 and 0.881
    // at 2.0; a 128-dim latent space at spread 1.0 barely moves it (0.979).
    c.latent_dim = 64;
    c.hidden_dim = 256;
    c.num_clusters = 1024;
    c.cluster_spread = 1.5;
  }
  return c;
}

DriftBench::DriftBench(const DriftBenchConfig& c) : config_(c) {
  centers_.resize(c.num_clusters, c.latent_dim);
  FillNormal(centers_, 1.0, c.seed, kCenters);
  double total = 0;
  for (int j = 0; j < c.num_clusters; ++j) {
    total += std::pow(j + 1.0, -c.cluster_size_alpha);
    cluster_cdf_.push_back(total);
  }
  for (double& v : cluster_cdf_) v /= total;

  target_latent_ = SampleLatent(c.num_targets, kTargets, &target_cluster_);
  query_latent_ = SampleLatent(c.num_queries, kQueries, &query_cluster_);

  w1_.resize(c.hidden_dim, c.latent_dim);
  dw1_.resize(c.hidden_dim, c.latent_dim);
  b1_.resize(c.hidden_dim);
  db1_.resize(c.hidden_dim);
  w2_.resize(c.dim, c.hidden_dim);
  dw2_.resize(c.dim, c.hidden_dim);
  const double s1 = 1.0 / std::sqrt(c.latent_dim);
  const double s2 = 1.0 / std::sqrt(c.hidden_dim);
  FillNormal(w1_, s1, c.seed, kW1);
  FillNormal(b1_, 0.1, c.seed, kB1);
  FillNormal(w2_, s2, c.seed, kW2);
  FillNormal(dw1_, s1, c.seed, kDw1);
  FillNormal(db1_, 0.1, c.seed, kDb1);
  FillNormal(dw2_, s2, c.seed, kDw2);
}

DriftBench::RowMatrix DriftBench::SampleLatent(size_t n, uint64_t stream,
                                               std::vector<int>* cluster) const {
  Rng rng(config_.seed, stream);
  RowMatrix z(n, config_.latent_dim);
  cluster->resize(n);
  for (size_t i = 0; i < n; ++i) {
    const double u = rng.Uniform();
    const size_t j =
        std::min<size_t>(std::lower_bound(cluster_cdf_.begin(),
                                          cluster_cdf_.end(), u) -
                             cluster_cdf_.begin(),
                         cluster_cdf_.size() - 1);
    (*cluster)[i] = static_cast<int>(j);
    for (int a = 0; a < config_.latent_dim; ++a) {
      z(i, a) = centers_(j, a) +
                static_cast<float>(config_.cluster_spread * rng.Normal());
    }
  }
  return z;
}

std::vector<float> DriftBench::Encode(double step,
                                      const RowMatrix& latent) const {
  const float t = static_cast<float>(step * config_.drift_sigma);
  const RowMatrix w1 = w1_ + t * dw1_;
  const Eigen::RowVectorXf b1 = b1_ + t * db1_;
  const RowMatrix w2 = w2_ + t * dw2_;
  RowMatrix h = (latent * w1.transpose()).rowwise() + b1;
  h = h.array().tanh();
  RowMatrix out = h * w2.transpose();
  out.rowwise().normalize();
  return std::vector<float>(out.data(), out.data() + out.size());
}

std::vector<float> DriftBench::Targets(double step) const {
  return Encode(step, target_latent_);
}

std::vector<float> DriftBench::EncodeTargets(
    double step, absl::Span<const size_t> indices) const {
  RowMatrix z(indices.size(), config_.latent_dim);
  for (size_t i = 0; i < indices.size(); ++i) z.row(i) = target_latent_.row(indices[i]);
  return Encode(step, z);
}

std::vector<float> DriftBench::Queries(double step) const {
  return Encode(step, query_latent_);
}

}  // namespace negmine
