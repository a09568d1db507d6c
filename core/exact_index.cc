#include "core/exact_index.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include <Eigen/Core>

#include "core/random.h"
#include "core/status.h"
#include "core/top_k.h"

namespace negmine {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Caps the score block of one GEMM at this many floats (256 MiB), so a large
// batch against a large collection is scored in query chunks.
constexpr size_t kMaxScoreBlockFloats = size_t{64} << 20;

using RowMatrix =
    Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// The `m` best finite entries of `scores`, best first.
std::vector<Hit> TopRows(const float* scores, size_t num_rows,
                         const EmbeddingStore& store, size_t m) {
  TopHeap heap(m);
  for (size_t row = 0; row < num_rows; ++row) {
    if (scores[row] == kNegInf) continue;
    heap.Push({scores[row], store.id(row), static_cast<uint32_t>(row)});
  }
  return heap.Sorted();
}

}  // namespace

absl::StatusOr<SearchResult> ExactIndex::SearchLocked(
    absl::Span<const QueryPlan> plans, const SearchParams& params,
    std::vector<std::vector<size_t>>* above) const {
  const int dim = options_.dim;
  const size_t n = plans.size();
  SearchResult result;
  result.index_version = version_;
  result.queries.resize(n);

  const size_t num_rows = store_.num_rows();
  const size_t chunk =
      std::clamp<size_t>(kMaxScoreBlockFloats / std::max<size_t>(num_rows, 1),
                         1, n);
  const PointSource points = Points();
  Eigen::Map<const RowMatrix> targets(points.data, num_rows, dim);
  RowMatrix q;
  Eigen::MatrixXf scores;  // column-major: column j holds query j's scores
  for (size_t begin = 0; begin < n; begin += chunk) {
    RETURN_IF_ERROR(CheckCancelled(params));
    const size_t c = std::min(chunk, n - begin);
    q.resize(c, dim);
    for (size_t j = 0; j < c; ++j) std::copy_n(plans[begin + j].query.data(), dim, q.row(j).data());
    scores.noalias() = targets * q.transpose();
    for (size_t j = 0; j < c; ++j) {
      float* s = scores.col(j).data();
      if (points.scale != nullptr) {
        for (size_t row = 0; row < num_rows; ++row) s[row] *= points.scale[row];
      }
      const size_t qi = begin + j;
      result.queries[qi] = MineOne(s, plans[qi], params, params.stream_offset + qi,
                                   above != nullptr ? &(*above)[qi] : nullptr);
    }
  }
  return result;
}

QueryResult ExactIndex::MineOne(float* s, const QueryPlan& plan, const SearchParams& params,
                                uint64_t stream, std::vector<size_t>* above) const {
  const size_t num_rows = store_.num_rows();
  for (uint32_t row : plan.excluded) s[row] = kNegInf;
  const std::vector<float>& t = plan.count_above;
  if (above != nullptr) above->assign(t.size(), 0);
  const bool window = plan.window();
  for (size_t row = 0; row < num_rows; ++row) {
    if (!store_.live(row)) {
      s[row] = kNegInf;
      continue;
    }
    if (s[row] == kNegInf) continue;  // excluded
    if (above != nullptr) {
      for (size_t j = 0; j < t.size(); ++j) (*above)[j] += s[row] > t[j];
    }
    if (window && !plan.Eligible(s[row])) s[row] = kNegInf;
  }

  QueryResult out;
  const size_t num_hard = params.num_top();
  std::vector<Hit> top =
      TopRows(s, num_rows, store_, params.rank_offset + num_hard);
  // The rank window: the best rank_offset targets are not eligible at all.
  const size_t skipped = std::min<size_t>(params.rank_offset, top.size());
  for (size_t i = 0; i < skipped; ++i) s[top[i].row] = kNegInf;

  const double inv_tau = 1.0 / params.temperature;
  auto log_sum_exp = [&]() {
    float max_s = kNegInf;
    for (size_t row = 0; row < num_rows; ++row) max_s = std::max(max_s, s[row]);
    if (max_s == kNegInf) return -std::numeric_limits<double>::infinity();
    double z = 0;
    for (size_t row = 0; row < num_rows; ++row) {
      if (s[row] != kNegInf) z += std::exp((double{s[row]} - max_s) * inv_tau);
    }
    return max_s * inv_tau + std::log(z);
  };
  if (params.want_log_z) out.log_z_lo = out.log_z_hi = log_sum_exp();

  for (size_t i = skipped; i < top.size(); ++i) {
    out.ids.push_back(top[i].id);
    out.scores.push_back(top[i].score);
    out.log_q.push_back(0.0f);
    s[top[i].row] = kNegInf;  // MIXED samples come from the rest
  }
  out.num_top = static_cast<int>(out.ids.size());

  const size_t num_samples = params.num_samples();
  if (num_samples == 0) return out;
  const double log_z = log_sum_exp();
  if (!std::isfinite(log_z)) return out;  // nothing eligible is left

  Rng rng(params.seed, stream);
  auto emit = [&](size_t row) {
    out.ids.push_back(store_.id(row));
    out.scores.push_back(s[row]);
    out.log_q.push_back(static_cast<float>(s[row] * inv_tau - log_z));
  };
  if (params.with_replacement) {
    std::vector<double> cdf(num_rows);
    double total = 0;
    for (size_t row = 0; row < num_rows; ++row) {
      if (s[row] != kNegInf) total += std::exp(s[row] * inv_tau - log_z);
      cdf[row] = total;
    }
    for (size_t i = 0; i < num_samples; ++i) {
      const double u = rng.Uniform() * total;
      size_t row = std::upper_bound(cdf.begin(), cdf.end(), u) - cdf.begin();
      row = std::min(row, num_rows - 1);
      // upper_bound never lands on an ineligible row (it has zero width)
      // except through rounding at the very end; walk back to a live one.
      while (s[row] == kNegInf) --row;
      emit(row);
    }
  } else {
    // Gumbel-top-k: the k largest s/tau + Gumbel are distributed exactly as
    // k sequential softmax draws without replacement, in that order.
    std::vector<float> keys(num_rows, kNegInf);
    for (size_t row = 0; row < num_rows; ++row) {
      if (s[row] != kNegInf) {
        keys[row] = static_cast<float>(s[row] * inv_tau + rng.Gumbel());
      }
    }
    for (const Hit& d : TopRows(keys.data(), num_rows, store_, num_samples)) {
      emit(d.row);
    }
  }
  return out;
}

}  // namespace negmine
