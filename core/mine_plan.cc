#include "core/mine_plan.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/random.h"

namespace negmine {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

bool On(float v) { return !std::isnan(v); }

// The targets with s > t, from the counts at plan.count_above.
size_t Above(float t, const QueryPlan& plan, absl::Span<const size_t> above, size_t all) {
  if (t == kInf) return 0;
  if (t == -kInf) return all;
  const auto it = std::lower_bound(plan.count_above.begin(), plan.count_above.end(), t);
  return above[it - plan.count_above.begin()];  // SetWindow listed every threshold
}

// The thresholds of the partition (see AttributeRemoved): a target with
// s > t_max is removed by max_score; else one with s <= t_min (s < min_score)
// by min_score; else s > t_abs by absolute_margin; else s > t_rel by
// relative_margin.
struct Thresholds {
  float t_max, t_min, t_abs, t_rel;
};

Thresholds Of(const MineFilters& f, float s_pos) {
  return {.t_max = f.max_score,
          .t_min = std::nextafter(f.min_score, -kInf),
          .t_abs = On(f.absolute_margin) ? s_pos - f.absolute_margin : kInf,
          .t_rel = On(f.relative_margin) ? s_pos - std::abs(s_pos) * f.relative_margin : kInf};
}

}  // namespace

absl::Status ValidateFilters(const SearchParams& p) {
  const MineFilters& f = p.filters;
  if (std::isnan(f.min_score) || std::isnan(f.max_score)) {
    return absl::InvalidArgumentError("params.filters.min_score and max_score must be numbers");
  }
  if (f.min_score > f.max_score) {
    return absl::InvalidArgumentError(absl::StrCat("params.filters.min_score = ", f.min_score,
                                                   " is above max_score = ", f.max_score));
  }
  if (On(f.absolute_margin) && !(f.absolute_margin >= 0 && std::isfinite(f.absolute_margin))) {
    return absl::InvalidArgumentError(absl::StrCat(
        "params.filters.absolute_margin = ", f.absolute_margin, " must be finite and >= 0"));
  }
  if (On(f.relative_margin) && !(f.relative_margin >= 0 && std::isfinite(f.relative_margin))) {
    return absl::InvalidArgumentError(absl::StrCat(
        "params.filters.relative_margin = ", f.relative_margin, " must be finite and >= 0"));
  }
  if (!(f.dedupe_cosine >= 0 && f.dedupe_cosine <= 1)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "params.filters.dedupe_cosine = ", f.dedupe_cosine, " must be in (0, 1], or 0 (off)"));
  }
  const bool simans = p.distribution == SampleDistribution::kSimans;
  if ((f.margins() || simans) && p.positives.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        simans ? "distribution SIMANS" : "params.filters' margins",
        " need each query's positives (positives is empty)"));
  }
  if (simans) {
    if (p.mode == MineMode::kTopK) {
      return absl::InvalidArgumentError(
          "distribution SIMANS samples: use mode SAMPLE or MIXED, not TOP_K");
    }
    if (!(p.simans.a >= 0 && std::isfinite(p.simans.a)) || !std::isfinite(p.simans.b)) {
      return absl::InvalidArgumentError(absl::StrCat("params.simans.a = ", p.simans.a,
                                                     " must be finite and >= 0, and b = ",
                                                     p.simans.b, " finite"));
    }
    if (p.simans.candidates < p.k) {
      return absl::InvalidArgumentError(absl::StrCat("params.simans.candidates = ",
                                                     p.simans.candidates,
                                                     " must be >= k = ", p.k));
    }
  }
  return absl::OkStatus();
}

void SetWindow(const MineFilters& filters, float s_pos, QueryPlan* plan) {
  const Thresholds t = Of(filters, s_pos);
  plan->lo = filters.min_score;
  plan->hi = std::min({t.t_max, t.t_abs, t.t_rel});
  plan->count_above.clear();
  if (!plan->window()) return;
  const float u_abs = std::max(t.t_abs, t.t_min), u_rel = std::max(t.t_rel, t.t_min),
              c_rel = std::min(t.t_max, t.t_abs);
  for (float v : {t.t_max, t.t_min, u_abs, u_rel, c_rel}) {
    if (std::isfinite(v)) plan->count_above.push_back(v);
  }
  std::sort(plan->count_above.begin(), plan->count_above.end());
  plan->count_above.erase(std::unique(plan->count_above.begin(), plan->count_above.end()),
                          plan->count_above.end());
}

size_t AttributeRemoved(const MineFilters& filters, float s_pos, const QueryPlan& plan,
                        absl::Span<const size_t> above, size_t candidates,
                        FilterCounts* removed) {
  const Thresholds t = Of(filters, s_pos);
  auto a = [&](float v) { return Above(v, plan, above, candidates); };
  // {s > t_max}
  removed->max_score = a(t.t_max);
  // {s <= t_min}: below min_score <= max_score, so not counted above.
  removed->min_score = candidates - a(t.t_min);
  // {s > t_abs} within (t_min, t_max].
  const float u_abs = std::max(t.t_abs, t.t_min);
  removed->absolute_margin = u_abs < t.t_max ? a(u_abs) - a(t.t_max) : 0;
  // {s > t_rel} within (t_min, min(t_max, t_abs)].
  const float u_rel = std::max(t.t_rel, t.t_min), c_rel = std::min(t.t_max, t.t_abs);
  removed->relative_margin = u_rel < c_rel ? a(u_rel) - a(c_rel) : 0;
  return candidates - removed->max_score - removed->min_score - removed->absolute_margin -
         removed->relative_margin;
}

PoolDraws SimansDraws(absl::Span<const float> scores, float s_pos, const SimansParams& simans,
                      size_t count, bool with_replacement, uint64_t seed, uint64_t stream) {
  PoolDraws out;
  const size_t n = scores.size();
  if (n == 0 || count == 0) return out;
  std::vector<double> logw(n);
  for (size_t i = 0; i < n; ++i) {
    const double d = double{scores[i]} - s_pos - simans.b;
    logw[i] = -simans.a * d * d;
  }
  const double top = *std::max_element(logw.begin(), logw.end());
  double z = 0;
  for (double w : logw) z += std::exp(w - top);
  const double log_z = top + std::log(z);
  Rng rng(seed, stream);
  if (with_replacement) {
    std::vector<double> cdf(n);
    double total = 0;
    for (size_t i = 0; i < n; ++i) cdf[i] = total += std::exp(logw[i] - log_z);
    for (size_t t = 0; t < count; ++t) {
      const double u = rng.Uniform() * total;
      const size_t i = std::min<size_t>(
          std::upper_bound(cdf.begin(), cdf.end(), u) - cdf.begin(), n - 1);
      out.index.push_back(i);
    }
  } else {
    // Gumbel-top-k: the order of log w + Gumbel is that of sequential draws
    // without replacement.
    std::vector<double> key(n);
    for (size_t i = 0; i < n; ++i) key[i] = logw[i] + rng.Gumbel();
    std::vector<size_t> order(n);
    std::iota(order.begin(), order.end(), 0);
    const size_t m = std::min(count, n);
    std::partial_sort(order.begin(), order.begin() + m, order.end(),
                      [&](size_t x, size_t y) { return key[x] > key[y]; });
    out.index.assign(order.begin(), order.begin() + m);
  }
  for (size_t i : out.index) out.log_q.push_back(static_cast<float>(logw[i] - log_z));
  return out;
}

std::string Shortfall(const QueryResult& r, const SearchParams& p) {
  if (r.ids.size() >= static_cast<size_t>(p.k)) return "";
  std::string why = absl::StrCat(r.ids.size(), " of k = ", p.k, " results: ", r.num_eligible,
                                 " targets eligible");
  const FilterCounts& c = r.removed;
  std::vector<std::string> parts;
  auto add = [&](size_t v, const char* what) {
    if (v > 0) parts.push_back(absl::StrCat(v, " ", what));
  };
  add(c.excluded, "excluded");
  add(c.positives, "positives");
  add(c.max_score, "above max_score");
  add(c.min_score, "below min_score");
  add(c.absolute_margin, "within absolute_margin of the positive");
  add(c.relative_margin, "within relative_margin of the positive");
  if (!parts.empty()) absl::StrAppend(&why, " (not eligible: ", absl::StrJoin(parts, ", "), ")");
  parts.clear();
  add(c.rank_offset, "skipped by rank_offset");
  add(c.dedupe, "dropped as near-duplicates");
  if (!parts.empty()) absl::StrAppend(&why, "; of the eligible, ", absl::StrJoin(parts, ", "));
  if (p.distribution == SampleDistribution::kSimans && p.mode != MineMode::kTopK) {
    absl::StrAppend(&why, "; SimANS draws from at most simans.candidates = ",
                    p.simans.candidates);
  }
  return why;
}

}  // namespace negmine
