// Shared test helpers: status matchers (Debian's abseil has none), oracles
// and a chi-square goodness-of-fit check.
#ifndef NEGMINE_TESTS_TEST_UTIL_H_
#define NEGMINE_TESTS_TEST_UTIL_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <numeric>
#include <string>
#include <tuple>
#include <vector>

#include "Eigen/Dense"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "core/index.h"
#include "core/random.h"
#include "absl/status/statusor.h"
#include "gmock/gmock.h"

namespace negmine::testing {

inline const absl::Status& GetStatus(const absl::Status& s) { return s; }
template <typename T>
const absl::Status& GetStatus(const absl::StatusOr<T>& s) {
  return s.status();
}

// EXPECT_THAT(status_or, StatusIs(absl::StatusCode::kInvalidArgument,
//                                 HasSubstr("dim")));
MATCHER_P2(StatusIs, code, message_matcher, "") {
  const absl::Status& s = GetStatus(arg);
  *result_listener << "status is " << s;
  return s.code() == code &&
         ::testing::ExplainMatchResult(message_matcher,
                                       std::string(s.message()),
                                       result_listener);
}

MATCHER_P(IsOkAndHolds, value_matcher, "") {
  if (!arg.ok()) {
    *result_listener << "status is " << arg.status();
    return false;
  }
  return ::testing::ExplainMatchResult(value_matcher, *arg, result_listener);
}

MATCHER(IsOk, "") {
  const absl::Status& s = GetStatus(arg);
  *result_listener << "status is " << s;
  return s.ok();
}

// n x dim standard normal floats, deterministic in `seed`.
inline std::vector<float> RandomVectors(size_t n, int dim, uint64_t seed) {
  Rng rng(seed, 0);
  std::vector<float> v(n * dim);
  for (float& x : v) x = static_cast<float>(rng.Normal());
  return v;
}

// Oracle: the top-k ids of each query over `targets` by inner product
// (ties to the lower id), by brute force.
inline std::vector<std::vector<uint64_t>> BruteForceTopK(const std::vector<float>& targets,
                                                         const std::vector<float>& queries,
                                                         int dim, int k) {
  const size_t n = targets.size() / dim, q = queries.size() / dim;
  using Rows = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  Eigen::Map<const Rows> t(targets.data(), n, dim), qs(queries.data(), q, dim);
  const Rows s = qs * t.transpose();
  std::vector<std::vector<uint64_t>> out(q);
  std::vector<uint64_t> idx(n);
  for (size_t i = 0; i < q; ++i) {
    std::iota(idx.begin(), idx.end(), 0);
    std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), [&](uint64_t a, uint64_t b) {
      return s(i, a) > s(i, b) || (s(i, a) == s(i, b) && a < b);
    });
    out[i].assign(idx.begin(), idx.begin() + k);
  }
  return out;
}

// Mean share of each truth list found in the matching `got` list.
inline double Recall(const std::vector<std::vector<uint64_t>>& got,
                     const std::vector<std::vector<uint64_t>>& truth) {
  double sum = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    absl::flat_hash_set<uint64_t> t(truth[i].begin(), truth[i].end());
    for (uint64_t id : got[i]) sum += t.contains(id);
  }
  return sum / (got.size() * truth[0].size());
}

// Oracle: double-precision dot product.
inline double Dot(const float* a, const float* b, int dim) {
  double s = 0;
  for (int j = 0; j < dim; ++j) s += double{a[j]} * b[j];
  return s;
}

// The upper `1 - p` quantile of chi-square with `df` degrees of freedom, by
// the Wilson-Hilferty approximation (accurate to ~1% for df >= 10). `z` is
// the standard normal quantile: 3.09 for p = 0.001.
inline double ChiSquareCritical(int df, double z = 3.09) {
  const double h = 2.0 / (9.0 * df);
  return df * std::pow(1.0 - h + z * std::sqrt(h), 3.0);
}

// Pearson's statistic of `counts` against `probs` (summing to 1) over
// `draws` draws. Bins whose expected count is below 5 are pooled into one,
// so the approximation holds. Returns {statistic, degrees of freedom}.
inline std::pair<double, int> ChiSquare(const std::vector<int64_t>& counts,
                                        const std::vector<double>& probs,
                                        int64_t draws) {
  double stat = 0, pooled_obs = 0, pooled_exp = 0;
  int bins = 0;
  for (size_t i = 0; i < counts.size(); ++i) {
    const double expected = probs[i] * draws;
    if (expected < 5) {
      pooled_obs += counts[i];
      pooled_exp += expected;
      continue;
    }
    stat += (counts[i] - expected) * (counts[i] - expected) / expected;
    ++bins;
  }
  if (pooled_exp > 0) {
    stat += (pooled_obs - pooled_exp) * (pooled_obs - pooled_exp) / pooled_exp;
    ++bins;
  }
  return {stat, bins - 1};
}

// Softmax of `scores / tau` in double precision.
inline std::vector<double> Softmax(const std::vector<double>& scores,
                                   double tau) {
  const double m = *std::max_element(scores.begin(), scores.end());
  std::vector<double> p(scores.size());
  double z = 0;
  for (size_t i = 0; i < scores.size(); ++i) z += p[i] = std::exp((scores[i] - m) / tau);
  for (double& v : p) v /= z;
  return p;
}

// A frequency test of sampled results against their own log q (the
// proposal samplers): every draw of a target must carry the same log q
// (within `tol`), and the draws must follow exp(log q). The bins: one per
// target expected at least 20 times (all but surely drawn, so the choice of
// bins does not depend on the outcome), one for the rest.
struct LogQFrequencies {
  size_t inconsistent = 0;  // draws whose log q is not their target's
  double seen_mass = 0;     // sum of exp(log q) over the targets drawn (<= 1)
  size_t bins = 0;
  double stat = 0;  // chi-square over the bins, with df degrees of freedom
  int df = 0;
};
inline LogQFrequencies LogQFrequencyTest(const std::vector<QueryResult>& results, double tol) {
  LogQFrequencies f;
  std::map<uint64_t, double> log_q;
  std::map<uint64_t, int64_t> count;
  int64_t draws = 0;
  for (const QueryResult& r : results) {
    for (size_t j = r.num_top; j < r.ids.size(); ++j) {
      auto [it, fresh] = log_q.emplace(r.ids[j], r.log_q[j]);
      if (!fresh && std::abs(it->second - r.log_q[j]) > tol) ++f.inconsistent;
      ++count[r.ids[j]];
      ++draws;
    }
  }
  std::vector<int64_t> counts = {0};
  std::vector<double> probs = {1.0};
  for (const auto& [id, lq] : log_q) {
    f.seen_mass += std::exp(lq);
    if (std::exp(lq) * draws < 20) {
      counts[0] += count[id];
      continue;
    }
    counts.push_back(count[id]);
    probs.push_back(std::exp(lq));
    probs[0] -= probs.back();
  }
  f.bins = counts.size();
  std::tie(f.stat, f.df) = ChiSquare(counts, probs, draws);
  return f;
}

}  // namespace negmine::testing

#endif  // NEGMINE_TESTS_TEST_UTIL_H_
