// MinePlan: what one search needs per query, resolved once by
// StoreIndex::Search (under the reader lock) and read by every backend: the
// query in scoring space, the excluded rows (the exclude list and the positives), the positives'
// scores and the score window the filters leave (core/index.h, MineFilters).
// The pure parts of the mining controls live here too: the window from the
// filters, the attribution of removed targets to filters, SimANS draws and
// the shortfall message.
#ifndef NEGMINE_CORE_MINE_PLAN_H_
#define NEGMINE_CORE_MINE_PLAN_H_

#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "core/index.h"

namespace negmine {

struct QueryPlan {
  static constexpr float kInf = std::numeric_limits<float>::infinity();
  // The query in scoring space (unit length for cosine: divided by its
  // norm, the one normalization every backend scores with), and its norm
  // there (1 for cosine).
  std::vector<float> query;
  float norm = 0;
  // Store rows never returned nor counted: the live excluded ids and the
  // positives, sorted, without repeats.
  std::vector<uint32_t> excluded;
  size_t num_excluded = 0;   // of them, not positives
  size_t num_positives = 0;  // live positives (distinct)
  std::vector<uint32_t> positive_rows;  // in the order given
  std::vector<float> positive_scores;   // in the order given
  float s_pos = kInf;                   // the lowest of them
  // The score window: a target is eligible when lo <= s <= hi.
  float lo = -kInf;
  float hi = kInf;
  // The thresholds t (ascending, finite) at which the backend counts the
  // targets with s > t, for FilterCounts (AttributeRemoved).
  std::vector<float> count_above;

  bool window() const { return lo > -kInf || hi < kInf; }
  bool Eligible(float s) const { return s >= lo && s <= hi; }
};

// Checks the filters and the SimANS knobs of `params` (the message names the
// field). Part of ValidateSearchParams.
absl::Status ValidateFilters(const SearchParams& params);

// Sets plan->lo, hi and count_above from the filters, with s_pos the query's
// lowest positive score (ignored without margins).
void SetWindow(const MineFilters& filters, float s_pos, QueryPlan* plan);

// Fills removed.{max_score, min_score, absolute_margin, relative_margin} and
// returns num_eligible, from `above` (above[i] = live, non-excluded targets
// with s > plan.count_above[i]) and `candidates` (live, non-excluded
// targets). Exact when the counts are.
size_t AttributeRemoved(const MineFilters& filters, float s_pos, const QueryPlan& plan,
                        absl::Span<const size_t> above, size_t candidates,
                        FilterCounts* removed);

// SimANS over a pool of candidate scores: `count` draws (indices into
// `scores`, in draw order) from weights exp(-a (s - s_pos - b)^2), with
// their log q under that distribution. Without replacement they are
// sequential draws (Gumbel-top-k), all of the pool when count >= its size.
struct PoolDraws {
  std::vector<size_t> index;
  std::vector<float> log_q;
};
PoolDraws SimansDraws(absl::Span<const float> scores, float s_pos, const SimansParams& simans,
                      size_t count, bool with_replacement, uint64_t seed, uint64_t stream);

// The reason a query got fewer than k results, or "" when it got k.
std::string Shortfall(const QueryResult& r, const SearchParams& params);

}  // namespace negmine

#endif  // NEGMINE_CORE_MINE_PLAN_H_
