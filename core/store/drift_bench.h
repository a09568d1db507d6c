// The drift-bench workload generator (DESIGN.md section 4), deterministic in
// its seed.
//
// Targets and queries are latent points from a clustered Gaussian mixture
// with power-law cluster sizes (cluster j has weight (j + 1)^-alpha). A random
// 2-layer tanh MLP, the encoder g_theta, maps them to R^dim, and the outputs
// are L2-normalized. One shared tower encodes queries and targets.
//
// Training moves the encoder: theta_t = theta_0 + t * sigma * Delta, with
// Delta a fixed random direction. Encoding at step t therefore gives the
// "current model" embeddings that the truth is computed from, while step 0 is
// what a static index would hold.
//
//   DriftBench bench({.num_targets = 100000, .dim = 64, .seed = 7});
//   std::vector<float> targets = bench.Targets(/*step=*/0);   // N x dim
//   std::vector<float> queries = bench.Queries(/*step=*/0);   // Q x dim
//
// Two presets set the mixture: kEasy (the defaults below: 256 well-separated
// clusters in a 32-dim latent space) and kHard (1024 clusters in a 64-dim
// latent space, each wider than the distance between two centers: std 1.5
// per axis against centers of std 1, so that they overlap and a coarse
// quantizer has to probe many cells).
//
//   DriftBenchConfig c = DriftBenchPresetConfig(DriftBenchPreset::kHard);
//   c.num_targets = 1000000;
//
// Thread safety: const methods may run concurrently.
#ifndef NEGMINE_CORE_STORE_DRIFT_BENCH_H_
#define NEGMINE_CORE_STORE_DRIFT_BENCH_H_

#include <cstdint>
#include <string>
#include <vector>

#include <Eigen/Core>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace negmine {

struct DriftBenchConfig {
  // Sizes.
  size_t num_targets = 100000;
  size_t num_queries = 1024;
  int dim = 64;          // output dimension d
  int latent_dim = 32;   // dimension of the latent mixture
  int hidden_dim = 128;  // width of the encoder's tanh layer

  // The latent mixture.
  int num_clusters = 256;
  double cluster_size_alpha = 1.0;  // power-law exponent of cluster weights
  double cluster_spread = 0.35;     // within-cluster std, per latent axis

  // The drift: per-step scale of the parameter movement.
  double drift_sigma = 0.02;

  uint64_t seed = 1;
};

enum class DriftBenchPreset { kEasy, kHard };

// "easy" or "hard"; INVALID_ARGUMENT naming the value otherwise.
absl::StatusOr<DriftBenchPreset> ParseDriftBenchPreset(absl::string_view name);
std::string DriftBenchPresetName(DriftBenchPreset preset);

// The default config with the preset's mixture (latent_dim, hidden_dim,
// num_clusters, cluster_spread); sizes, drift and seed keep their defaults.
DriftBenchConfig DriftBenchPresetConfig(DriftBenchPreset preset);

class DriftBench {
 public:
  explicit DriftBench(const DriftBenchConfig& config);

  const DriftBenchConfig& config() const { return config_; }

  // All targets encoded at `step`, num_targets x dim, row-major.
  std::vector<float> Targets(double step) const;
  // The targets with the given indices (each < num_targets) at `step`.
  std::vector<float> EncodeTargets(double step,
                                   absl::Span<const size_t> indices) const;
  // All queries encoded at `step`, num_queries x dim, row-major.
  std::vector<float> Queries(double step) const;

  // The mixture component each target / query was drawn from, in
  // [0, num_clusters).
  const std::vector<int>& target_clusters() const { return target_cluster_; }
  const std::vector<int>& query_clusters() const { return query_cluster_; }

 private:
  using RowMatrix =
      Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

  RowMatrix SampleLatent(size_t n, uint64_t stream, std::vector<int>* cluster) const;
  std::vector<float> Encode(double step, const RowMatrix& latent) const;

  DriftBenchConfig config_;
  RowMatrix centers_;              // num_clusters x latent_dim
  std::vector<double> cluster_cdf_;
  RowMatrix target_latent_;        // num_targets x latent_dim
  RowMatrix query_latent_;         // num_queries x latent_dim
  std::vector<int> target_cluster_, query_cluster_;
  // theta_0 and Delta of the encoder.
  RowMatrix w1_, dw1_;             // hidden x latent
  Eigen::RowVectorXf b1_, db1_;    // hidden
  RowMatrix w2_, dw2_;             // dim x hidden
};

}  // namespace negmine

#endif  // NEGMINE_CORE_STORE_DRIFT_BENCH_H_
