// TreeIndex's searcher, private to core/tree: the helpers, the routing groups
// (Routing), the query as the searcher sees it (Query) and the Searcher, the
// algorithms over one consistent tree (the caller holds mu_ shared). Included
// only by tree_index.cc (routing, maintenance and SearchLocked, which drives
// the Searcher), tree_search.cc (top-k, the frontier: the exact sampler and
// log Z, the counts) and tree_sampling.cc (the proposal sampler); not
// installed, and not for use outside core/tree.
//
// The small functions that both halves call in their loops (Dot, Score,
// ScoreLeaf, BestOf, ...) are defined here so that they stay inlinable.
#ifndef NEGMINE_CORE_TREE_SEARCHER_H_
#define NEGMINE_CORE_TREE_SEARCHER_H_

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/types/span.h"
#include "core/random.h"
#include "core/top_k.h"
#include "core/tree/draw_rounds.h"
#include "core/tree/tree.h"
#include "core/tree/tree_index.h"

namespace negmine {

using RowMatrix =
    Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
inline constexpr double kNegInfD = -std::numeric_limits<double>::infinity();
// Leaves of the beam: for approximate top-k by default, and as the first pass
// of exact top-k (whose threshold then prunes the rest).
inline constexpr int kDefaultBeamLeaves = 256;
inline constexpr int kCertifyBeamLeaves = 16;
// Routing (Searcher::Route): groups of at most this many leaf sizes of
// targets, and candidate leaves per routed leaf.
inline constexpr int kGroupLeafSizes = 8;
inline constexpr size_t kRouteOversample = 2;
// A leaf visited by fewer queries of a batch is scored by dot products, not
// gathered for a matrix product.
inline constexpr uint32_t kMinGemmQueries = 4;
// The proposal sampler's coarse groups (at most this many leaf sizes of
// targets); it weighs the leaves of the best 1/kExpandFraction of them (at
// least kMinExpand) one by one (DrawLeaves).
inline constexpr int kCoarseGroupLeafSizes = 32;
inline constexpr size_t kExpandFraction = 16;
inline constexpr size_t kMinExpand = 8;
// Rows a gather prefetches ahead (PointSource::Prefetch).
inline constexpr size_t kPrefetchRows = 4;

// Eigen's dot product is vectorized (a plain loop is not, without
// -ffast-math, since it reorders the sum).
inline float Dot(const float* a, const float* b, int dim) {
  return Eigen::Map<const Eigen::VectorXf>(a, dim).dot(
      Eigen::Map<const Eigen::VectorXf>(b, dim));
}

// Bounds are computed in float like the scores; this slack keeps rounding
// from pruning a target that ties the threshold.
inline float Slack(float hi) { return 1e-5f * (1.0f + std::abs(hi)); }

inline double LogSumExp(const std::vector<double>& v) {
  double m = kNegInfD;
  for (double x : v) m = std::max(m, x);
  if (m == kNegInfD) return m;
  double s = 0;
  for (double x : v) s += std::exp(x - m);
  return m + std::log(s);
}

// log(exp(a) - exp(b)) for a >= b.
inline double LogDiffExp(double a, double b) {
  if (b == kNegInfD) return a;
  if (a <= b) return kNegInfD;
  return a + std::log1p(-std::exp(b - a));
}

// Draws an index in proportion to exp(logw[i]).
class Categorical {
 public:
  explicit Categorical(const std::vector<double>& logw) {
    double m = kNegInfD;
    for (double x : logw) m = std::max(m, x);
    cdf_.resize(logw.size());
    double total = 0;
    for (size_t i = 0; i < logw.size(); ++i) {
      if (logw[i] != kNegInfD) total += std::exp(logw[i] - m);
      cdf_[i] = total;
    }
    log_total_ = m + std::log(total);
  }
  bool empty() const { return cdf_.empty() || !(cdf_.back() > 0); }
  // log of the normalizer sum exp(logw).
  double log_total() const { return log_total_; }
  size_t Draw(Rng& rng) const { return DrawAt(rng.Uniform()); }
  // The entry at u, uniform in (0, 1), of the inverse CDF.
  size_t DrawAt(double uniform) const {
    const double u = uniform * cdf_.back();
    size_t i = std::upper_bound(cdf_.begin(), cdf_.end(), u) - cdf_.begin();
    i = std::min(i, cdf_.size() - 1);
    while (i > 0 && cdf_[i] == cdf_[i - 1]) --i;  // never a zero-weight entry
    return i;
  }

 private:
  std::vector<double> cdf_;
  double log_total_ = kNegInfD;
};

// The routing groups (see Searcher::Route): the leaves grouped under the
// highest nodes holding at most kGroupLeafSizes leaves' worth of targets (a
// partition of the leaves). Built from a tree's structure and centers, which
// change only with its structure_version.
struct TreeIndex::Routing {
  uint64_t structure_version = 0;
  // Group g's leaves are leaves[begin[g], begin[g + 1]); their centers are
  // the same rows of leaf_centers (contiguous per group).
  std::vector<int32_t> begin = {0}, leaves, groups;
  RowMatrix group_centers, leaf_centers;
  // Node -> its index in `leaves` (-1: not a routed leaf).
  std::vector<int32_t> position;
  // A coarser grouping for the proposal sampler (kCoarseGroupLeafSizes):
  // coarse group g's leaves are leaves[coarse_begin[g], coarse_begin[g + 1]);
  // coarse_of maps a leaf's index to its coarse group.
  std::vector<int32_t> coarse_begin = {0}, coarse_groups, coarse_of;
  RowMatrix coarse_centers;

  explicit Routing(const Tree& tree);

  size_t num_groups() const { return begin.size() - 1; }
  size_t num_coarse() const { return coarse_begin.size() - 1; }
  size_t MemoryBytes() const {
    return (begin.capacity() + leaves.capacity() + groups.capacity() + position.capacity() +
            coarse_begin.capacity() + coarse_groups.capacity() + coarse_of.capacity()) *
               sizeof(int32_t) +
           (group_centers.size() + coarse_centers.size() + leaf_centers.size()) * sizeof(float);
  }

 private:
  // Depth first, children in order, so that both groupings see the leaves
  // in the same order.
  void Visit(const Tree& tree, int32_t f, size_t group_max, size_t coarse_max, bool in_coarse);

  static RowMatrix Centers(const Tree& tree, const std::vector<int32_t>& nodes);

  void CollectLeaves(const Tree& tree, int32_t f);
};

// One query as the searcher sees it.
struct TreeIndex::Query {
  std::vector<float> q;  // scoring space: normalized for cosine
  float norm = 0;
  absl::flat_hash_set<uint32_t> excluded;  // store rows
  // The score window (QueryPlan): eligible when lo <= s <= hi.
  float lo = -std::numeric_limits<float>::infinity();
  float hi = std::numeric_limits<float>::infinity();
  bool window = false;
  bool Eligible(float s) const { return !window || (s >= lo && s <= hi); }
};


class TreeIndex::Searcher {
 public:
  Searcher(const Tree& tree, const Routing& routing, const EmbeddingStore& store,
           const PointSource& points, const SearchParams& params)
      : tree_(tree), routing_(routing), store_(store), points_(points), p_(params),
        dim_(points.dim), inv_tau_(1.0 / params.temperature) {}

  size_t visits() const { return visits_; }

  // Counting fused into an exact top-k (Fuse): per query, thresholds at or
  // above its window's hi, and the targets not excluded scoring above each.
  // ScoreLeavesBatched counts every leaf it scores, and an exact top-k
  // scores every leaf holding a target above hi.
  struct Fused {
    std::vector<float> t;  // ascending
    std::vector<size_t> n;
  };
  void Fuse(std::vector<Fused>* fused) { fused_ = fused; }
  // Exact sampler: draws proposed and accepted, over this searcher's life.
  size_t proposals() const { return proposals_; }
  size_t accepted() const { return accepted_; }

  float Score(const Query& q, uint32_t row) const {
    return Dot(q.q.data(), points_.data + size_t{row} * dim_, dim_) *
           points_.Scale(row);
  }

  // --- top-k (tree_search.cc) ---

  // Leaf routing, for approximate top-k and the first pass of exact top-k:
  // the `width` leaves whose centers score highest, found in two steps.
  // Every group center (Routing) is scored, for a chunk of queries at once,
  // by one matrix product; the leaves of the best groups (about
  // kRouteOversample x width leaves) are scored, and the best `width` kept.
  // Routing by center score beats the tree's best-first descent: on
  // drift-bench data (1M x 128, leaves of 64) 256 routed leaves gave the
  // recall@64 that best-first needed 512 leaves for (BENCHMARKS.md).
  void Route(const std::vector<Query>& queries, int width,
             std::vector<std::vector<int32_t>>* leaves);

  // The m highest of s[0, n) as (score, index), ties by the lower index, in
  // no particular order: one pass with a bounded min-heap, so O(n) when m is
  // small against n.
  static void BestOf(const float* s, size_t n, size_t m,
                     std::vector<std::pair<float, int32_t>>* out) {
    // Under Ahead, the heap's top is the lowest score (the highest index
    // among equal scores).
    const auto worse = Ahead;
    out->clear();
    m = std::min(m, n);
    for (size_t i = 0; i < m; ++i) out->push_back({s[i], static_cast<int32_t>(i)});
    std::make_heap(out->begin(), out->end(), worse);
    float cut = m > 0 ? out->front().first : 0.0f;
    for (size_t i = m; i < n; ++i) {
      if (!(s[i] > cut)) continue;
      std::pop_heap(out->begin(), out->end(), worse);
      out->back() = {s[i], static_cast<int32_t>(i)};
      std::push_heap(out->begin(), out->end(), worse);
      cut = out->front().first;
    }
  }

  // Keeps the m highest-scoring entries of v (ties by the lower index), in
  // no particular order.
  static void KeepBest(size_t m, std::vector<std::pair<float, int32_t>>* v) {
    if (v->size() <= m) return;
    std::nth_element(v->begin(), v->begin() + m, v->end(), Ahead);
    v->resize(m);
  }

  // The order of (score, index) entries: higher score first, ties by the
  // lower index.
  static bool Ahead(const std::pair<float, int32_t>& a, const std::pair<float, int32_t>& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  }

  // s = the scores of a leaf's `rows` (its members) for queries qids[0, nq):
  // one matrix product over the gathered vectors, or dot products for a
  // leaf too few queries visit to pay for the gather.
  void ScoreLeaf(absl::Span<const uint32_t> rows, const std::vector<Query>& queries,
                 const uint32_t* qids, size_t nq, RowMatrix* s) {
    for (size_t j = 0; j < std::min<size_t>(kPrefetchRows, rows.size()); ++j) {
      points_.Prefetch(rows[j]);
    }
    if (nq < kMinGemmQueries) {
      s->resize(nq, rows.size());
      for (size_t j = 0; j < rows.size(); ++j) {
        if (j + kPrefetchRows < rows.size()) points_.Prefetch(rows[j + kPrefetchRows]);
        for (size_t i = 0; i < nq; ++i) (*s)(i, j) = Score(queries[qids[i]], rows[j]);
      }
      return;
    }
    gathered_.resize(rows.size(), dim_);
    for (size_t j = 0; j < rows.size(); ++j) {
      if (j + kPrefetchRows < rows.size()) points_.Prefetch(rows[j + kPrefetchRows]);
      points_.Get(rows[j], gathered_.row(j).data());
    }
    query_rows_.resize(nq, dim_);
    for (size_t i = 0; i < nq; ++i) {
      std::copy_n(queries[qids[i]].q.data(), dim_, query_rows_.row(i).data());
    }
    s->noalias() = query_rows_ * gathered_.transpose();
  }

  // Scores each query's leaves, grouped by leaf: one matrix product per leaf
  // against all of the queries that visit it.
  void ScoreLeavesBatched(const std::vector<Query>& queries,
                          const std::vector<std::vector<int32_t>>& leaves,
                          std::vector<TopHeap>* heaps);

  // The leaves not in `scored` whose upper bound reaches `threshold` (a lower
  // bound on the final m-th score): the only leaves that can still change
  // the top. Internal nodes below the threshold are pruned whole.
  void CandidateLeaves(const Query& q, float threshold,
                       const std::vector<int32_t>& scored,
                       std::vector<int32_t>* out);

  // The top `m` of every query (exact, or the beam alone when approximate).
  std::vector<std::vector<Hit>> TopBatch(const std::vector<Query>& queries,
                                         size_t m);

  // --- the proposal sampler (tree_sampling.cc) ---

  // One draw of a batch: its leaf (DrawLeaves), then its target
  // (DrawWithinLeaves).
  struct ProposalDraw;

  // log n_f and spread_f of a list of nodes.
  struct NodeStats;

  // Proposal sampling for a batch, `count` draws per query into results[i]
  // (after its top part), in rounds (DrawRounds). Per query, leaves are
  // drawn from the proposal (their center scores for a chunk of queries by
  // one matrix product); the drawn leaves are then scored for the whole
  // batch grouped by leaf, and each draw takes a target from its leaf's
  // exact softmax. Query i's draws use the stream (seed, i) and do not
  // depend on the rest of the batch.
  absl::Status SampleProposalBatch(const std::vector<Query>& queries, int count,
                                   std::vector<QueryResult>* results);

  // Draws leaves for the `active` queries from the proposal. A node f (a
  // leaf or a coarse group) weighs n_f exp(<q, c_f>/tau + |q|^2 spread_f /
  // (2 d tau^2)), n_f counting the eligible targets only. The coarse groups
  // are scored by one matrix product per chunk of queries; the best
  // 1/kExpandFraction of them are expanded into their leaves, each a
  // component of the proposal, and every other group is one component (once
  // drawn, it draws one of its leaves in proportion to their weights). So
  // the leaves that carry most of the mass are weighed one by one, and the
  // rest of the tree costs one score per group. The queries of this round
  // draw rounds.Need() each (their want is set in the first round).
  absl::Status DrawLeaves(const std::vector<Query>& queries, int count,
                          const NodeStats& leaf_stats, const NodeStats& group_stats,
                          DrawRounds& rounds, std::vector<ProposalDraw>* draws);

  // The random numbers of the proposal sampler are counter-based: draw t of
  // query i (over all rounds; i counted from the call's stream_offset) uses
  // KeyUniform(DrawKey(i, t), 0) for its
  // component, (.., 2) for a leaf within a group and (.., 1) for its target,
  // so they do not depend on the order in which the batch is processed.
  uint64_t DrawKey(uint32_t query, size_t t) const {
    return Mix64(Mix64(p_.seed ^ Mix64(p_.stream_offset + query + 0x632be59bd9b4e019ULL)) +
                 4 * t);
  }
  static double KeyUniform(uint64_t key, int which) {
    return (static_cast<double>(Mix64(key + which) >> 11) + 0.5) * 0x1p-53;
  }

  // Each draw's target, from the exact softmax over its leaf's eligible
  // targets: the drawn leaves scored grouped by leaf (ScoreLeaf), a query's
  // draws in a leaf made together.
  // Without replacement the draw is among the targets the query has not
  // taken (log q stays the leaf's whole softmax).
  absl::Status DrawWithinLeaves(const std::vector<Query>& queries, const DrawRounds& rounds,
                                std::vector<ProposalDraw>* draws);

  // Scores so large against the temperature that the softmax overflows.
  absl::Status Overflow(uint32_t query) const {
    return absl::InvalidArgumentError(absl::StrCat(
        "query ", query, ": its scores over the temperature ", p_.temperature,
        " overflow; scale the embeddings or raise the temperature"));
  }

  // --- the frontier: the exact sampler and log Z (tree_search.cc) ---

  // A frontier of nodes whose subtrees partition the targets, with certified
  // bounds on each subtree's softmax mass.
  struct Entry;

  Entry MakeEntry(const Query& q, int32_t f,
                  const absl::flat_hash_map<int32_t, uint32_t>& excluded_below);

  void MakeExact(const Query& q, Entry* e);

  // The frontier itself: refined loosest entry first (Refine), its log Z
  // interval (Interval).
  class Frontier;

  // Exact softmax draws by rejection from the frontier's proposal.
  void SampleExact(const Query& q, int count, size_t eligible, Rng& rng,
                   QueryResult* out);

  // The rest of a sequential draw without replacement from the softmax:
  // the frontier refined until exact, the targets not taken ordered by
  // s / tau + Gumbel (Gumbel-top-k), whose first `count` are distributed as
  // `count` further sequential draws. Fewer only when fewer are eligible.
  void Complete(Frontier& frontier, const absl::flat_hash_set<uint32_t>& taken,
                size_t count, double log_z, Rng& rng, QueryResult* out);

  // log Z's certified interval for q, refined to params.log_z_width.
  std::pair<double, double> LogZ(const Query& q);

  // --- counts (tree_search.cc) ---

  // For each query i and threshold t[i][j], (*out)[i][j] += the live
  // targets not excluded with s > t[i][j]. By the tree's bounds first, per
  // query: a subtree wholly above a threshold counts at once, one wholly
  // below is skipped, and the leaves across one are listed; then the listed
  // leaves are scored grouped by leaf (ScoreLeaf), as ScoreLeavesBatched.
  //
  // With `collect`, (*collect)[i] also receives the rows (not excluded) that
  // score above query i's window hi, which must then be one of t[i].
  void CountAbove(const std::vector<Query>& queries, const std::vector<std::vector<float>>& t,
                  std::vector<std::vector<size_t>>* out,
                  std::vector<std::vector<uint32_t>>* collect = nullptr);

  // The rows of f's subtree not excluded for q, into `out`.
  void CollectAll(const Query& q, int32_t f, std::vector<uint32_t>* out) const;

  // excluded_below for CountAbove and the frontier: per node, the excluded
  // rows in its subtree.
  absl::flat_hash_map<int32_t, uint32_t> ExcludedBelow(const Query& q) const;

 private:
  const Tree& tree_;
  const Routing& routing_;
  const EmbeddingStore& store_;
  const PointSource points_;
  const SearchParams& p_;
  const int dim_;
  const double inv_tau_;
  size_t visits_ = 0;
  size_t proposals_ = 0, accepted_ = 0;
  std::vector<Fused>* fused_ = nullptr;
  RowMatrix gathered_, query_rows_;  // ScoreLeaf's scratch
};

}  // namespace negmine

#endif  // NEGMINE_CORE_TREE_SEARCHER_H_
