// TreeIndex: routing, the Searcher (top-k, the filters' counts, the proposal
// and exact samplers, log Z) and the tree's maintenance.
//
// Why one file (about 1,650 lines): the Searcher is a class private to this
// file whose parts share its scratch, its visit counters and the tree view.
// The seam to cut along is its sampling half (the proposal's DrawLeaves /
// DrawWithinLeaves and the frontier's SampleExact / Complete / LogZ): move
// the Searcher's declaration to a private header (core/tree/searcher.h) and
// its sampling members to core/tree/tree_sampling.cc. Not done yet.
#include "core/tree/tree_index.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <numeric>
#include <queue>

#include <Eigen/Core>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "core/random.h"
#include "core/status.h"
#include "core/top_k.h"
#include "core/tree/draw_rounds.h"

namespace negmine {
namespace {

using RowMatrix =
    Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
constexpr double kNegInfD = -std::numeric_limits<double>::infinity();
// Leaves of the beam: for approximate top-k by default, and as the first pass
// of exact top-k (whose threshold then prunes the rest).
constexpr int kDefaultBeamLeaves = 256;
constexpr int kCertifyBeamLeaves = 16;
// Routing (Searcher::Route): groups of at most this many leaf sizes of
// targets, and candidate leaves per routed leaf.
constexpr int kGroupLeafSizes = 8;
constexpr size_t kRouteOversample = 2;
// A leaf visited by fewer queries of a batch is scored by dot products, not
// gathered for a matrix product.
constexpr uint32_t kMinGemmQueries = 4;
// The proposal sampler's coarse groups (at most this many leaf sizes of
// targets); it weighs the leaves of the best 1/kExpandFraction of them (at
// least kMinExpand) one by one (DrawLeaves).
constexpr int kCoarseGroupLeafSizes = 32;
constexpr size_t kExpandFraction = 16;
constexpr size_t kMinExpand = 8;
// Rows a gather prefetches ahead (PointSource::Prefetch).
constexpr size_t kPrefetchRows = 4;

// Eigen's dot product is vectorized (a plain loop is not, without
// -ffast-math, since it reorders the sum).
float Dot(const float* a, const float* b, int dim) {
  return Eigen::Map<const Eigen::VectorXf>(a, dim).dot(
      Eigen::Map<const Eigen::VectorXf>(b, dim));
}

// Bounds are computed in float like the scores; this slack keeps rounding
// from pruning a target that ties the threshold.
float Slack(float hi) { return 1e-5f * (1.0f + std::abs(hi)); }

double LogSumExp(const std::vector<double>& v) {
  double m = kNegInfD;
  for (double x : v) m = std::max(m, x);
  if (m == kNegInfD) return m;
  double s = 0;
  for (double x : v) s += std::exp(x - m);
  return m + std::log(s);
}

// log(exp(a) - exp(b)) for a >= b.
double LogDiffExp(double a, double b) {
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

}  // namespace

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

  explicit Routing(const Tree& tree) : structure_version(tree.structure_version()) {
    const size_t leaf_size = tree.params().leaf_size;
    if (tree.num_nodes() > 0) {
      Visit(tree, 0, kGroupLeafSizes * leaf_size, kCoarseGroupLeafSizes * leaf_size, false);
    }
    position.assign(tree.num_nodes(), -1);
    for (size_t i = 0; i < leaves.size(); ++i) position[leaves[i]] = static_cast<int32_t>(i);
    coarse_of.resize(leaves.size());
    for (size_t g = 0; g + 1 < coarse_begin.size(); ++g) {
      std::fill(coarse_of.begin() + coarse_begin[g], coarse_of.begin() + coarse_begin[g + 1],
                static_cast<int32_t>(g));
    }
    group_centers = Centers(tree, groups);
    coarse_centers = Centers(tree, coarse_groups);
    leaf_centers = Centers(tree, leaves);
  }

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
  void Visit(const Tree& tree, int32_t f, size_t group_max, size_t coarse_max, bool in_coarse) {
    if (tree.count(f) == 0) return;
    const bool opens = !in_coarse && (tree.is_leaf(f) || tree.count(f) <= coarse_max);
    if (opens) coarse_groups.push_back(f);
    if (tree.is_leaf(f) || tree.count(f) <= group_max) {
      groups.push_back(f);
      CollectLeaves(tree, f);
      begin.push_back(static_cast<int32_t>(leaves.size()));
    } else {
      for (int32_t c = tree.first_child(f); c < tree.first_child(f) + tree.num_children(f); ++c) {
        Visit(tree, c, group_max, coarse_max, in_coarse || opens);
      }
    }
    if (opens) coarse_begin.push_back(static_cast<int32_t>(leaves.size()));
  }

  static RowMatrix Centers(const Tree& tree, const std::vector<int32_t>& nodes) {
    RowMatrix c(nodes.size(), tree.dim());
    for (size_t i = 0; i < nodes.size(); ++i) {
      std::copy_n(tree.center(nodes[i]), tree.dim(), c.row(i).data());
    }
    return c;
  }

  void CollectLeaves(const Tree& tree, int32_t f) {
    if (tree.count(f) == 0) return;
    if (tree.is_leaf(f)) {
      leaves.push_back(f);
      return;
    }
    for (int32_t c = tree.first_child(f); c < tree.first_child(f) + tree.num_children(f); ++c) {
      CollectLeaves(tree, c);
    }
  }
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

// The algorithms, over one consistent tree (the caller holds mu_ shared).
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

  // Leaf routing, for approximate top-k and the first pass of exact top-k:
  // the `width` leaves whose centers score highest, found in two steps.
  // Every group center (Routing) is scored, for a chunk of queries at once,
  // by one matrix product; the leaves of the best groups (about
  // kRouteOversample x width leaves) are scored, and the best `width` kept.
  // Routing by center score beats the tree's best-first descent: on
  // drift-bench data (1M x 128, leaves of 64) 256 routed leaves gave the
  // recall@64 that best-first needed 512 leaves for (BENCHMARKS.md).
  void Route(const std::vector<Query>& queries, int width,
             std::vector<std::vector<int32_t>>* leaves) {
    const Routing& r = routing_;
    const size_t num_groups = r.num_groups();
    const size_t total_leaves = r.leaves.size();
    if (total_leaves == 0) return;
    const size_t want = std::min<size_t>(width, total_leaves);
    // Groups whose leaves number about kRouteOversample x want.
    const size_t groups = std::min<size_t>(
        num_groups, (kRouteOversample * want * num_groups + total_leaves - 1) / total_leaves);
    const size_t chunk = std::max<size_t>(1, (size_t{4} << 20) / num_groups);
    RowMatrix qm, dots;
    Eigen::VectorXf leaf_dots;
    std::vector<std::pair<float, int32_t>> best, candidates;
    for (size_t b = 0; b < queries.size(); b += chunk) {
      const size_t c = std::min(chunk, queries.size() - b);
      qm.resize(c, dim_);
      for (size_t i = 0; i < c; ++i) std::copy_n(queries[b + i].q.data(), dim_, qm.row(i).data());
      dots.noalias() = qm * r.group_centers.transpose();
      visits_ += c * num_groups;
      for (size_t i = 0; i < c; ++i) {
        const Eigen::Map<const Eigen::VectorXf> q(queries[b + i].q.data(), dim_);
        BestOf(dots.row(i).data(), num_groups, groups, &best);
        candidates.clear();
        for (const auto& [unused, g] : best) {
          const int32_t first = r.begin[g], n = r.begin[g + 1] - first;
          leaf_dots.noalias() = r.leaf_centers.middleRows(first, n) * q;
          for (int32_t j = 0; j < n; ++j) candidates.push_back({leaf_dots[j], first + j});
        }
        visits_ += candidates.size();
        KeepBest(want, &candidates);
        std::vector<int32_t>& out = (*leaves)[b + i];
        for (const auto& [unused, j] : candidates) out.push_back(r.leaves[j]);
      }
    }
  }

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
                          std::vector<TopHeap>* heaps) {
    // (leaf, query) pairs sorted by leaf: a counting sort over node ids.
    std::vector<uint32_t> begin(tree_.num_nodes() + 1, 0);
    for (const auto& l : leaves) {
      for (int32_t f : l) ++begin[f + 1];
    }
    for (size_t f = 0; f < tree_.num_nodes(); ++f) begin[f + 1] += begin[f];
    std::vector<uint32_t> qids(begin.back()), fill(begin.begin(), begin.end() - 1);
    for (size_t qi = 0; qi < leaves.size(); ++qi) {
      for (int32_t f : leaves[qi]) qids[fill[f]++] = static_cast<uint32_t>(qi);
    }
    RowMatrix s;
    Eigen::VectorXf row_max;
    std::vector<uint64_t> ids;
    for (size_t leaf = 0; leaf < tree_.num_nodes(); ++leaf) {
      const uint32_t q0 = begin[leaf], nq = begin[leaf + 1] - q0;
      if (nq == 0) continue;
      auto rows = tree_.members(static_cast<int32_t>(leaf));
      ids.resize(rows.size());
      for (size_t j = 0; j < rows.size(); ++j) ids[j] = store_.id(rows[j]);
      ScoreLeaf(rows, queries, &qids[q0], nq, &s);
      row_max = s.rowwise().maxCoeff();
      visits_ += nq;
      for (size_t i = 0; i < nq; ++i) {
        if (fused_ != nullptr) {
          Fused& c = (*fused_)[qids[q0 + i]];
          if (!c.t.empty() && row_max[i] > c.t.front()) {
            const Query& q = queries[qids[q0 + i]];
            const float* row = s.row(i).data();
            for (size_t j = 0; j < rows.size(); ++j) {
              if (!(row[j] > c.t.front()) || q.excluded.contains(rows[j])) continue;
              for (size_t t = 0; t < c.t.size(); ++t) c.n[t] += row[j] > c.t[t];
            }
          }
        }
        TopHeap& heap = (*heaps)[qids[q0 + i]];
        // Most leaves hold nothing for a query whose heap is full.
        if (heap.full() && row_max[i] < heap.threshold()) continue;
        const Query& q = queries[qids[q0 + i]];
        const float* row = s.row(i).data();
        for (size_t j = 0; j < rows.size(); ++j) {
          if (heap.full() && row[j] < heap.threshold()) continue;
          if (!q.Eligible(row[j])) continue;
          if (!q.excluded.empty() && q.excluded.contains(rows[j])) continue;
          heap.Push({row[j], ids[j], rows[j]});
        }
      }
    }
  }

  // The leaves not in `scored` whose upper bound reaches `threshold` (a lower
  // bound on the final m-th score): the only leaves that can still change
  // the top. Internal nodes below the threshold are pruned whole.
  void CandidateLeaves(const Query& q, float threshold,
                       const std::vector<int32_t>& scored,
                       std::vector<int32_t>* out) {
    absl::flat_hash_set<int32_t> done(scored.begin(), scored.end());
    std::vector<int32_t> stack = {0};
    while (!stack.empty()) {
      const int32_t f = stack.back();
      stack.pop_back();
      if (tree_.count(f) == 0) continue;
      if (tree_.is_leaf(f)) {
        if (!done.contains(f)) out->push_back(f);
        continue;
      }
      ++visits_;
      for (int32_t c = tree_.first_child(f);
           c < tree_.first_child(f) + tree_.num_children(f); ++c) {
        if (tree_.count(c) == 0) continue;
        const float hi = Dot(q.q.data(), tree_.center(c), dim_) + tree_.radius(c) * q.norm;
        // (Below the window: nothing eligible.)
        if (hi + Slack(hi) >= std::max(threshold, q.lo)) stack.push_back(c);
      }
    }
  }

  // The top `m` of every query (exact, or the beam alone when approximate).
  std::vector<std::vector<Hit>> TopBatch(const std::vector<Query>& queries,
                                         size_t m) {
    std::vector<TopHeap> heaps(queries.size(), TopHeap(m));
    std::vector<std::vector<int32_t>> leaves(queries.size());
    const int width = p_.beam_width > 0    ? p_.beam_width
                      : p_.approximate     ? kDefaultBeamLeaves
                                           : kCertifyBeamLeaves;
    Route(queries, width, &leaves);
    ScoreLeavesBatched(queries, leaves, &heaps);
    if (!p_.approximate) {
      // Certify: every leaf that can still beat the beam's m-th score is
      // scored too (batched the same way), which makes the result exact.
      std::vector<std::vector<int32_t>> more(queries.size());
      for (size_t qi = 0; qi < queries.size(); ++qi) {
        const float threshold = heaps[qi].full() ? heaps[qi].threshold()
                                                 : -std::numeric_limits<float>::infinity();
        CandidateLeaves(queries[qi], threshold, leaves[qi], &more[qi]);
      }
      ScoreLeavesBatched(queries, more, &heaps);
    }
    std::vector<std::vector<Hit>> out(queries.size());
    for (size_t qi = 0; qi < queries.size(); ++qi) out[qi] = heaps[qi].Sorted();
    return out;
  }

  // --- sampling ---

  // Proposal sampling for a batch, `count` draws per query into results[i]
  // (after its top part), in rounds (DrawRounds). Per query, leaves are
  // drawn from the proposal (their center scores for a chunk of queries by
  // one matrix product); the drawn leaves are then scored for the whole
  // batch grouped by leaf, and each draw takes a target from its leaf's
  // exact softmax. Query i's draws use the stream (seed, i) and do not
  // depend on the rest of the batch.
  absl::Status SampleProposalBatch(const std::vector<Query>& queries, int count,
                                   std::vector<QueryResult>* results) {
    const Routing& r = routing_;
    const size_t num_leaves = r.leaves.size(), n = queries.size();
    if (num_leaves == 0) return absl::OkStatus();
    // log n_f and spread_f per leaf and coarse group (writes change them
    // without a change of structure, so they are read per call).
    const NodeStats leaf_stats(tree_, r.leaves), group_stats(tree_, r.coarse_groups);
    // Without replacement, each round draws from the proposal restricted to
    // the targets not taken yet (their mass removed), so no query is short.
    DrawRounds rounds(n, p_.with_replacement, /*removes_mass=*/true);
    std::vector<ProposalDraw> draws;
    while (!rounds.active().empty()) {
      RETURN_IF_ERROR(StoreIndex::CheckCancelled(p_));
      draws.clear();
      RETURN_IF_ERROR(DrawLeaves(queries, count, leaf_stats, group_stats, rounds, &draws));
      RETURN_IF_ERROR(DrawWithinLeaves(queries, rounds, &draws));
      // The draws in order, per query (they were appended query by query).
      for (const ProposalDraw& x : draws) {
        if (!rounds.Take(x.query, x.row)) continue;
        if (rounds.removes_mass()) rounds.Took(x.query, x.leaf, std::exp(x.log_q - x.log_q_leaf));
        QueryResult& out = (*results)[x.query];
        out.ids.push_back(store_.id(x.row));
        out.scores.push_back(x.score);
        out.log_q.push_back(static_cast<float>(x.log_q));
      }
      rounds.EndRound();
    }
    return absl::OkStatus();
  }

  struct ProposalDraw {
    uint32_t query;
    uint32_t leaf;        // position in routing_.leaves
    uint64_t key;         // its random numbers: KeyUniform(key, 0 / 1 / 2)
    double log_q_leaf;    // log-probability of the leaf under the proposal
    uint32_t row = 0;     // then: the target drawn within the leaf
    float score = 0;
    double log_q = 0;     // log q(y) = log q(leaf) + log p(y | leaf)
  };

  // log n_f and spread_f of a list of nodes.
  struct NodeStats {
    Eigen::ArrayXf log_count, spread;
    NodeStats(const Tree& tree, const std::vector<int32_t>& nodes)
        : log_count(nodes.size()), spread(nodes.size()) {
      for (size_t i = 0; i < nodes.size(); ++i) {
        log_count[i] = std::log(static_cast<float>(tree.count(nodes[i])));
        spread[i] = tree.spread(nodes[i]);
      }
    }
  };

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
                          DrawRounds& rounds, std::vector<ProposalDraw>* draws) {
    const std::vector<uint32_t>& active = rounds.active();
    const Routing& r = routing_;
    const size_t num_groups = r.num_coarse();
    const size_t expand = std::min(num_groups, std::max(kMinExpand, num_groups / kExpandFraction));
    constexpr size_t kBlock = 64;  // the CDF is searched by blocks
    const size_t chunk = std::max<size_t>(1, (size_t{4} << 20) / num_groups);
    const float inv_tau = static_cast<float>(inv_tau_);
    RowMatrix qm, dots;
    Eigen::ArrayXf glw, w;
    Eigen::VectorXf leaf_dots;
    std::vector<float> comp_lw, comp_draw, within;
    std::vector<double> within_draw;
    std::vector<int32_t> comp;        // component -> leaf index, or ~group
    std::vector<size_t> comp_first;   // group -> its first component
    std::vector<uint8_t> expanded;
    std::vector<double> block_cdf;
    std::vector<std::pair<float, int32_t>> best;
    for (size_t b = 0; b < active.size(); b += chunk) {
      const size_t c = std::min(chunk, active.size() - b);
      qm.resize(c, dim_);
      for (size_t i = 0; i < c; ++i) {
        std::copy_n(queries[active[b + i]].q.data(), dim_, qm.row(i).data());
      }
      dots.noalias() = qm * r.coarse_centers.transpose();
      for (size_t i = 0; i < c; ++i) {
        const uint32_t qi = active[b + i];
        const Query& q = queries[qi];
        const float spread_scale =
            static_cast<float>(double{q.norm} * q.norm / (2.0 * dim_) * inv_tau_ * inv_tau_);
        // Eligible targets per leaf and group, where exclusions fall.
        absl::flat_hash_map<int32_t, uint32_t> leaf_excluded, group_excluded;
        for (uint32_t row : q.excluded) {
          const int32_t f = tree_.leaf_of(row);
          if (f == Tree::kNone || r.position[f] < 0) continue;
          ++leaf_excluded[r.position[f]];
          ++group_excluded[r.coarse_of[r.position[f]]];
        }
        size_t eligible = tree_.num_nodes() ? tree_.count(0) : 0;
        for (const auto& [g, k] : group_excluded) eligible -= k;
        if (rounds.first_round()) {
          rounds.set_want(qi, count, eligible);
        }
        const size_t need = rounds.Need(qi);
        if (need == 0) continue;
        const auto eligible_only = [](float lw, float log_count, uint32_t n, uint32_t k) {
          return k >= n ? -std::numeric_limits<float>::infinity()
                        : lw - log_count + std::log(static_cast<float>(n - k));
        };
        // The log weights of group g's leaves, into `within`.
        const Eigen::Map<const Eigen::VectorXf> qv(q.q.data(), dim_);
        const auto leaf_weights = [&](int32_t g) {
          const int32_t first = r.coarse_begin[g], n = r.coarse_begin[g + 1] - first;
          leaf_dots.noalias() = r.leaf_centers.middleRows(first, n) * qv;
          within.resize(n);
          for (int32_t j = 0; j < n; ++j) {
            const int32_t pos = first + j;
            within[j] = leaf_dots[j] * inv_tau + leaf_stats.log_count[pos] +
                        leaf_stats.spread[pos] * spread_scale;
            auto it = leaf_excluded.find(pos);
            if (it != leaf_excluded.end()) {
              within[j] = eligible_only(within[j], leaf_stats.log_count[pos],
                                        tree_.count(r.leaves[pos]), it->second);
            }
          }
        };
        glw = dots.row(i).transpose().array() * inv_tau + group_stats.log_count +
              group_stats.spread * spread_scale;
        for (const auto& [g, k] : group_excluded) {
          glw[g] = eligible_only(glw[g], group_stats.log_count[g], tree_.count(r.coarse_groups[g]), k);
        }
        BestOf(glw.data(), num_groups, expand, &best);
        expanded.assign(num_groups, 0);
        for (const auto& [unused, g] : best) expanded[g] = 1;
        comp_lw.clear();
        comp.clear();
        comp_first.resize(num_groups);
        for (size_t g = 0; g < num_groups; ++g) {
          comp_first[g] = comp.size();
          if (!expanded[g]) {
            comp_lw.push_back(glw[g]);
            comp.push_back(~static_cast<int32_t>(g));
            continue;
          }
          leaf_weights(static_cast<int32_t>(g));
          for (size_t j = 0; j < within.size(); ++j) {
            comp_lw.push_back(within[j]);
            comp.push_back(r.coarse_begin[g] + static_cast<int32_t>(j));
          }
        }
        // Without replacement, the draws come from the proposal restricted
        // to the targets not taken yet: a component's weight times the share
        // of its mass left (a group's from its leaves'); log q stays the
        // proposal's own.
        const DrawRounds::LeafMass& taken = rounds.taken_leaves(qi);
        const auto left = [&](int32_t pos) {
          auto t = taken.find(static_cast<uint32_t>(pos));
          if (t == taken.end()) return 1.0;
          auto x = leaf_excluded.find(pos);
          const uint32_t n_eff =
              tree_.count(r.leaves[pos]) - (x == leaf_excluded.end() ? 0 : x->second);
          return t->second.count >= n_eff ? 0.0 : std::max(1.0 - t->second.mass, 1e-300);
        };
        // Group g's leaves' weights for drawing, into within_draw (after
        // leaf_weights(g)); returns the share of g's mass left.
        const auto leaves_left = [&](int32_t g) {
          const double lse = LogSumExp(std::vector<double>(within.begin(), within.end()));
          within_draw.resize(within.size());
          double kept = 0;
          for (size_t l = 0; l < within.size(); ++l) {
            const double share = left(r.coarse_begin[g] + static_cast<int32_t>(l));
            within_draw[l] = share > 0 ? within[l] + std::log(share) : kNegInfD;
            kept += std::exp(within[l] - lse) * share;
          }
          return kept;
        };
        comp_draw = comp_lw;
        absl::flat_hash_set<int32_t> taken_groups;
        for (const auto& [pos, unused] : taken) {
          const int32_t g = r.coarse_of[pos];
          if (expanded[g]) {
            comp_draw[comp_first[g] + (pos - r.coarse_begin[g])] +=
                static_cast<float>(std::log(left(static_cast<int32_t>(pos))));
          } else if (taken_groups.insert(g).second) {
            leaf_weights(g);
            comp_draw[comp_first[g]] += static_cast<float>(std::log(leaves_left(g)));
          }
        }
        // In float, for speed: a query whose weights overflow float (scores
        // far beyond the temperature) is refused.
        const size_t m = comp_lw.size();
        const Eigen::Map<const Eigen::ArrayXf> lw(comp_lw.data(), m), lw_draw(comp_draw.data(), m);
        const float top = lw.maxCoeff();
        if (!std::isfinite(top)) return Overflow(qi);
        const size_t num_blocks = (m + kBlock - 1) / kBlock;
        block_cdf.resize(num_blocks);
        const auto block_sums = [&]() {
          double total = 0;
          for (size_t k = 0; k < num_blocks; ++k) {
            total += w.segment(k * kBlock, std::min(kBlock, m - k * kBlock)).sum();
            block_cdf[k] = total;
          }
          return total;
        };
        w = (lw - top).exp();
        double total = block_sums();
        const double log_total = top + std::log(total);
        if (!std::isfinite(log_total)) return Overflow(qi);
        if (!taken.empty()) {
          w = (lw_draw - top).exp();
          total = block_sums();
          if (!(total > 0)) continue;  // every eligible target taken (rounding)
        }
        for (size_t t = 0; t < need; ++t) {
          const uint64_t key = DrawKey(qi, rounds.attempts(qi) + t);
          double u = KeyUniform(key, 0) * total;
          size_t k = std::upper_bound(block_cdf.begin(), block_cdf.end(), u) - block_cdf.begin();
          k = std::min(k, num_blocks - 1);
          u -= k > 0 ? block_cdf[k - 1] : 0.0;
          const size_t end = std::min(m, (k + 1) * kBlock);
          size_t j = k * kBlock, last = j;
          for (; j < end; ++j) {
            if (w[j] > 0) last = j;  // never a zero-weight component
            u -= w[j];
            if (u < 0 && w[j] > 0) break;
          }
          j = std::min(j, last);
          double log_q = double{lw[j]} - log_total;
          int32_t pos = comp[j];
          if (pos < 0) {
            // A group: one of its leaves, in proportion to their weights.
            const int32_t g = ~pos;
            leaf_weights(g);
            const Categorical leaf(std::vector<double>(within.begin(), within.end()));
            size_t l;
            if (taken_groups.contains(g)) {
              leaves_left(g);
              l = Categorical(within_draw).DrawAt(KeyUniform(key, 2));
            } else {
              l = leaf.DrawAt(KeyUniform(key, 2));
            }
            pos = r.coarse_begin[g] + static_cast<int32_t>(l);
            log_q += double{within[l]} - leaf.log_total();
          }
          draws->push_back({.query = qi, .leaf = static_cast<uint32_t>(pos), .key = key,
                            .log_q_leaf = log_q});
        }
        rounds.Drew(qi, need);
      }
    }
    return absl::OkStatus();
  }

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
                                std::vector<ProposalDraw>* draws) {
    const Routing& r = routing_;
    // Draw indices sorted by leaf (stable: by query, then in draw order).
    std::vector<uint32_t> begin(r.leaves.size() + 1, 0);
    for (const ProposalDraw& d : *draws) ++begin[d.leaf + 1];
    for (size_t f = 0; f < r.leaves.size(); ++f) begin[f + 1] += begin[f];
    std::vector<uint32_t> order(draws->size()), fill(begin.begin(), begin.end() - 1);
    for (size_t d = 0; d < draws->size(); ++d) order[fill[(*draws)[d].leaf]++] = d;
    std::vector<uint32_t> qids;
    std::vector<uint32_t> eligible;  // member indices
    std::vector<double> logw;        // their s / tau
    RowMatrix s;
    for (size_t f = 0; f < r.leaves.size(); ++f) {
      if (begin[f] == begin[f + 1]) continue;
      qids.clear();
      for (uint32_t k = begin[f]; k < begin[f + 1]; ++k) {
        const uint32_t qi = (*draws)[order[k]].query;
        if (qids.empty() || qids.back() != qi) qids.push_back(qi);
      }
      const absl::Span<const uint32_t> rows = tree_.members(r.leaves[f]);
      ScoreLeaf(rows, queries, qids.data(), qids.size(), &s);
      visits_ += qids.size();
      uint32_t k = begin[f];
      for (size_t i = 0; i < qids.size(); ++i) {
        const Query& q = queries[qids[i]];
        const float* score = s.row(i).data();
        eligible.clear();
        logw.clear();
        for (size_t j = 0; j < rows.size(); ++j) {
          if (!q.excluded.empty() && q.excluded.contains(rows[j])) continue;
          eligible.push_back(static_cast<uint32_t>(j));
          logw.push_back(score[j] * inv_tau_);
        }
        const Categorical target(logw);
        const double log_z = target.log_total();
        // (A drawn leaf has an eligible target.)
        if (target.empty() || !std::isfinite(log_z)) return Overflow(qids[i]);
        // Without replacement: the targets taken in earlier rounds out.
        std::optional<Categorical> untaken;
        if (rounds.removes_mass() && !rounds.first_round()) {
          std::vector<double> lw = logw;
          bool any = false;
          for (size_t e = 0; e < eligible.size(); ++e) {
            if (rounds.taken(qids[i], rows[eligible[e]])) {
              lw[e] = kNegInfD;
              any = true;
            }
          }
          if (any) untaken.emplace(lw);
          if (untaken && untaken->empty()) return Overflow(qids[i]);
        }
        const Categorical& pick = untaken ? *untaken : target;
        for (; k < begin[f + 1] && (*draws)[order[k]].query == qids[i]; ++k) {
          ProposalDraw& d = (*draws)[order[k]];
          const uint32_t j = eligible[pick.DrawAt(KeyUniform(d.key, 1))];
          d.row = rows[j];
          d.score = score[j];
          d.log_q = d.log_q_leaf + score[j] * inv_tau_ - log_z;
        }
      }
    }
    return absl::OkStatus();
  }

  // Scores so large against the temperature that the softmax overflows.
  absl::Status Overflow(uint32_t query) const {
    return absl::InvalidArgumentError(absl::StrCat(
        "query ", query, ": its scores over the temperature ", p_.temperature,
        " overflow; scale the embeddings or raise the temperature"));
  }

  // A frontier of nodes whose subtrees partition the targets, with certified
  // bounds on each subtree's softmax mass.
  struct Entry {
    int32_t node;
    float hi;
    double log_draw;  // proposal weight: n exp(hi/tau), or Z exactly
    double log_u, log_l;  // bounds on the mass of the eligible targets
    bool exact = false;
    std::vector<uint32_t> rows;  // exact only: eligible rows and their s/tau
    std::vector<double> logw;
  };

  Entry MakeEntry(const Query& q, int32_t f,
                  const absl::flat_hash_map<int32_t, uint32_t>& excluded_below) {
    Entry e;
    e.node = f;
    auto it = excluded_below.find(f);
    const uint32_t n = tree_.count(f);
    const uint32_t n_eff = n - (it == excluded_below.end() ? 0 : it->second);
    const float d = Dot(q.q.data(), tree_.center(f), dim_);
    e.hi = d + tree_.radius(f) * q.norm;
    e.hi += Slack(e.hi);
    const float lo = d - tree_.radius(f) * q.norm - Slack(e.hi);
    // A window: the subtree's eligible targets score at most q.hi, and only
    // a subtree wholly inside it has a lower bound above zero.
    bool inside = true;
    if (q.window) {
      if (e.hi < q.lo || lo > q.hi) {
        e.log_draw = e.log_u = e.log_l = kNegInfD;
        return e;
      }
      inside = lo >= q.lo && e.hi <= q.hi;
      e.hi = std::min(e.hi, q.hi);
    }
    e.log_draw = std::log(double(n)) + e.hi * inv_tau_;
    e.log_u = n_eff == 0 ? kNegInfD : std::log(double(n_eff)) + e.hi * inv_tau_;
    e.log_l = n_eff == 0 || !inside ? kNegInfD : std::log(double(n_eff)) + lo * inv_tau_;
    return e;
  }

  void MakeExact(const Query& q, Entry* e) {
    ++visits_;
    e->exact = true;
    for (uint32_t row : tree_.members(e->node)) {
      if (q.excluded.contains(row)) continue;
      const float s = Score(q, row);
      if (!q.Eligible(s)) continue;
      e->rows.push_back(row);
      e->logw.push_back(s * inv_tau_);
    }
    e->log_draw = e->log_u = e->log_l = LogSumExp(e->logw);
  }

  class Frontier {
   public:
    Frontier(Searcher* s, const Query& q) : s_(s), q_(q), excluded_below_(s->ExcludedBelow(q)) {
      if (s->tree_.count(0) > 0) Add(0);
    }

    // Expands the loosest entry until the log Z interval is at most `width`
    // wide or `budget` expansions are done. Returns false if nothing is left
    // to refine. The loosest entry comes from a heap; the interval (an O(F)
    // sum) is checked every F/16 expansions, so the work is O(F log F).
    bool Refine(double width, size_t budget) {
      size_t until_check = 0;
      for (size_t b = 0; b < budget; ++b) {
        // (Width 0 is reached only with every entry exact: no check.)
        if (until_check == 0 && width > 0) {
          const auto [lo, hi] = Interval();
          if (hi - lo <= width) return true;
          until_check = std::max<size_t>(1, entries_.size() / 16);
        }
        --until_check;
        if (loosest_.empty()) return false;
        const size_t i = loosest_.top().second;
        loosest_.pop();
        // The entry is replaced: by its children, or by its exact self.
        Entry e = entries_[i];
        entries_[i].log_draw = entries_[i].log_u = entries_[i].log_l = kNegInfD;
        if (s_->tree_.is_leaf(e.node)) {
          s_->MakeExact(q_, &e);
          entries_.push_back(std::move(e));
        } else {
          ++s_->visits_;
          for (int32_t c = s_->tree_.first_child(e.node);
               c < s_->tree_.first_child(e.node) + s_->tree_.num_children(e.node); ++c) {
            if (s_->tree_.count(c) > 0) Add(c);
          }
        }
      }
      return true;
    }

    std::pair<double, double> Interval() const {
      std::vector<double> lo, hi;
      for (const Entry& e : entries_) {
        lo.push_back(e.log_l);
        hi.push_back(e.log_u);
      }
      return {LogSumExp(lo), LogSumExp(hi)};
    }

    // Replaced entries stay, with zero weight and bounds.
    std::vector<Entry>& entries() { return entries_; }
    size_t size() const { return entries_.size(); }

   private:
    void Add(int32_t f) {
      entries_.push_back(s_->MakeEntry(q_, f, excluded_below_));
      const Entry& e = entries_.back();
      loosest_.push({LogDiffExp(e.log_u, e.log_l), entries_.size() - 1});
    }

    Searcher* s_;
    const Query& q_;
    absl::flat_hash_map<int32_t, uint32_t> excluded_below_;
    std::vector<Entry> entries_;
    // Non-exact, live entries by log(U - L), loosest on top.
    std::priority_queue<std::pair<double, size_t>> loosest_;
  };

  // Exact softmax draws by rejection from the frontier's proposal.
  void SampleExact(const Query& q, int count, size_t eligible, Rng& rng,
                   QueryResult* out) {
    Frontier frontier(this, q);
    frontier.Refine(p_.log_z_width, std::numeric_limits<size_t>::max());
    const auto [lo, hi] = frontier.Interval();
    const double log_z = 0.5 * (lo + hi);
    const size_t want = p_.with_replacement ? count : std::min<size_t>(count, eligible);
    absl::flat_hash_set<uint32_t> taken;
    auto build = [&]() {
      std::vector<double> w;
      for (const Entry& e : frontier.entries()) w.push_back(e.log_draw);
      return Categorical(w);
    };
    Categorical pick = build();
    size_t misses = 0;
    bool all_exact = false;
    // Without replacement, the last of k ~ eligible targets can be very
    // unlikely under rejection: once the frontier is exact (or the attempts
    // run out), the rest are drawn by Complete, which does not reject.
    const size_t max_attempts = 1000 * want + 100000;
    const size_t before = out->ids.size();
    size_t a = 0;
    for (; a < max_attempts && out->ids.size() - out->num_top < want; ++a) {
      if (all_exact && !p_.with_replacement) break;
      if (misses > 64 && !all_exact) {
        // Acceptance is low: refine more (doubling the frontier) and go on.
        // Each accepted draw is exact for the proposal it came from.
        all_exact = !frontier.Refine(0, frontier.size());
        pick = build();
        misses = 0;
      }
      const Entry& e = frontier.entries()[pick.Draw(rng)];
      uint32_t row;
      double logw;
      if (e.exact) {
        if (e.rows.empty()) continue;
        const size_t j = Categorical(e.logw).Draw(rng);
        row = e.rows[j];
        logw = e.logw[j];
      } else {
        // A uniform descendant: children in proportion to their counts.
        int32_t f = e.node;
        while (!tree_.is_leaf(f)) {
          uint64_t u = rng.Below(tree_.count(f));
          int32_t c = tree_.first_child(f);
          for (; c < tree_.first_child(f) + tree_.num_children(f) - 1; ++c) {
            if (u < tree_.count(c)) break;
            u -= tree_.count(c);
          }
          f = c;
        }
        auto m = tree_.members(f);
        row = m[rng.Below(m.size())];
        const float s = Score(q, row);
        if (q.excluded.contains(row) || !q.Eligible(s)) {
          ++misses;
          continue;
        }
        logw = s * inv_tau_;
        if (std::log(rng.Uniform()) > logw - e.hi * inv_tau_) {
          ++misses;
          continue;
        }
      }
      if (!p_.with_replacement && !taken.insert(row).second) {
        ++misses;
        continue;
      }
      misses = 0;
      const float s = static_cast<float>(logw / inv_tau_);
      out->ids.push_back(store_.id(row));
      out->scores.push_back(s);
      out->log_q.push_back(static_cast<float>(logw - log_z));
    }
    proposals_ += a;
    accepted_ += out->ids.size() - before;
    if (!p_.with_replacement && out->ids.size() - out->num_top < want) {
      Complete(frontier, taken, want - (out->ids.size() - out->num_top), log_z, rng, out);
    }
  }

  // The rest of a sequential draw without replacement from the softmax:
  // the frontier refined until exact, the targets not taken ordered by
  // s / tau + Gumbel (Gumbel-top-k), whose first `count` are distributed as
  // `count` further sequential draws. Fewer only when fewer are eligible.
  void Complete(Frontier& frontier, const absl::flat_hash_set<uint32_t>& taken,
                size_t count, double log_z, Rng& rng, QueryResult* out) {
    frontier.Refine(0, std::numeric_limits<size_t>::max());
    std::vector<std::pair<double, size_t>> keys;  // (key, position in rows)
    std::vector<uint32_t> rows;
    std::vector<double> logw;
    for (const Entry& e : frontier.entries()) {
      if (!e.exact) continue;
      for (size_t j = 0; j < e.rows.size(); ++j) {
        if (taken.contains(e.rows[j])) continue;
        keys.push_back({e.logw[j] + rng.Gumbel(), rows.size()});
        rows.push_back(e.rows[j]);
        logw.push_back(e.logw[j]);
      }
    }
    const size_t m = std::min(count, keys.size());
    std::partial_sort(keys.begin(), keys.begin() + m, keys.end(),
                      [](const auto& a, const auto& b) { return a.first > b.first; });
    for (size_t t = 0; t < m; ++t) {
      const size_t j = keys[t].second;
      out->ids.push_back(store_.id(rows[j]));
      out->scores.push_back(static_cast<float>(logw[j] / inv_tau_));
      out->log_q.push_back(static_cast<float>(logw[j] - log_z));
    }
  }

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
                  std::vector<std::vector<uint32_t>>* collect = nullptr) {
    struct Across {
      int32_t leaf;
      uint32_t query, mask;
    };
    std::vector<Across> across;
    std::vector<std::pair<int32_t, uint32_t>> stack;
    for (uint32_t qi = 0; qi < queries.size(); ++qi) {
      const std::vector<float>& ts = t[qi];
      if (ts.empty() || tree_.num_nodes() == 0 || tree_.count(0) == 0) continue;
      const Query& q = queries[qi];
      const absl::flat_hash_map<int32_t, uint32_t> excluded_below = ExcludedBelow(q);
      const size_t j_hi = collect ? std::find(ts.begin(), ts.end(), q.hi) - ts.begin() : ts.size();
      stack.assign(1, {0, (uint32_t{1} << ts.size()) - 1});
      while (!stack.empty()) {
        const auto [f, mask] = stack.back();
        stack.pop_back();
        auto it = excluded_below.find(f);
        const uint32_t n_eff = tree_.count(f) - (it == excluded_below.end() ? 0 : it->second);
        if (n_eff == 0) continue;
        ++visits_;
        const float d = Dot(q.q.data(), tree_.center(f), dim_);
        const float hi = d + tree_.radius(f) * q.norm, lo = d - tree_.radius(f) * q.norm;
        const float slack = Slack(std::max(std::abs(hi), std::abs(lo)));
        uint32_t rest = 0;
        for (size_t j = 0; j < ts.size(); ++j) {
          if (!(mask >> j & 1)) continue;
          if (lo - slack > ts[j]) {
            (*out)[qi][j] += n_eff;
            if (j == j_hi) CollectAll(q, f, &(*collect)[qi]);
          } else if (hi + slack > ts[j]) {
            rest |= uint32_t{1} << j;
          }
        }
        if (rest == 0) continue;
        if (tree_.is_leaf(f)) {
          across.push_back({f, qi, rest});
          continue;
        }
        for (int32_t c = tree_.first_child(f); c < tree_.first_child(f) + tree_.num_children(f);
             ++c) {
          if (tree_.count(c) > 0) stack.push_back({c, rest});
        }
      }
    }
    std::sort(across.begin(), across.end(), [](const Across& a, const Across& b) {
      return a.leaf < b.leaf || (a.leaf == b.leaf && a.query < b.query);
    });
    std::vector<uint32_t> qids;
    RowMatrix s;
    for (size_t b = 0; b < across.size();) {
      size_t e = b;
      qids.clear();
      for (; e < across.size() && across[e].leaf == across[b].leaf; ++e) {
        qids.push_back(across[e].query);
      }
      const absl::Span<const uint32_t> rows = tree_.members(across[b].leaf);
      ScoreLeaf(rows, queries, qids.data(), qids.size(), &s);
      for (size_t i = 0; i < qids.size(); ++i) {
        const Query& q = queries[qids[i]];
        const std::vector<float>& ts = t[qids[i]];
        const uint32_t mask = across[b + i].mask;
        std::vector<size_t>& o = (*out)[qids[i]];
        // (A leaf decided for hi was listed whole above, or holds nothing.)
        const size_t j_hi =
            collect ? std::find(ts.begin(), ts.end(), q.hi) - ts.begin() : ts.size();
        const bool take = j_hi < ts.size() && (mask >> j_hi & 1);
        for (size_t j = 0; j < rows.size(); ++j) {
          if (q.excluded.contains(rows[j])) continue;
          for (size_t k = 0; k < ts.size(); ++k) {
            if (mask >> k & 1) o[k] += s(i, j) > ts[k];
          }
          if (take && s(i, j) > q.hi) (*collect)[qids[i]].push_back(rows[j]);
        }
      }
      b = e;
    }
  }

  // The rows of f's subtree not excluded for q, into `out`.
  void CollectAll(const Query& q, int32_t f, std::vector<uint32_t>* out) const {
    if (tree_.is_leaf(f)) {
      for (uint32_t row : tree_.members(f)) {
        if (!q.excluded.contains(row)) out->push_back(row);
      }
      return;
    }
    for (int32_t c = tree_.first_child(f); c < tree_.first_child(f) + tree_.num_children(f); ++c) {
      if (tree_.count(c) > 0) CollectAll(q, c, out);
    }
  }

  // excluded_below for CountAbove and the frontier: per node, the excluded
  // rows in its subtree.
  absl::flat_hash_map<int32_t, uint32_t> ExcludedBelow(const Query& q) const {
    absl::flat_hash_map<int32_t, uint32_t> below;
    for (uint32_t row : q.excluded) {
      for (int32_t f = tree_.leaf_of(row); f != Tree::kNone; f = tree_.parent(f)) ++below[f];
    }
    return below;
  }

  std::pair<double, double> LogZ(const Query& q) {
    Frontier frontier(this, q);
    frontier.Refine(p_.log_z_width, std::numeric_limits<size_t>::max());
    return frontier.Interval();
  }

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

TreeIndex::TreeIndex(const IndexOptions& options)
    : StoreIndex(options),
      tree_(std::make_unique<Tree>(
          options.dim, TreeParams{.leaf_size = options.tree.leaf_size,
                                  .branching = options.tree.branching})) {
  if (options.tree.background_rebuild) {
    rebuilder_ = std::thread([this] { RebuildLoop(); });
  }
}

TreeIndex::~TreeIndex() {
  {
    absl::MutexLock lock(&rebuild_mu_);
    stopping_ = true;
  }
  if (rebuilder_.joinable()) rebuilder_.join();
}

void TreeIndex::OnUpsertLocked(absl::Span<const uint32_t> inserted,
                               absl::Span<const uint32_t> updated) {
  const PointSource points = Points();
  // A first bulk load builds the tree instead of inserting one by one.
  const bool empty = tree_->num_nodes() == 0 ||
                     (tree_->num_nodes() == 1 && tree_->count(0) == 0);
  if (empty && updated.empty() &&
      inserted.size() > size_t(options_.tree.leaf_size)) {
    tree_->Build(points, std::vector<uint32_t>(inserted.begin(), inserted.end()));
    size_at_build_ = inserted.size();
    changes_since_build_ = 0;
    leaf_radius_at_build_ = tree_->LeafRadiusSum();
    return;
  }
  for (uint32_t row : updated) {
    tree_->Remove(row);
    tree_->Insert(points, row);
  }
  for (uint32_t row : inserted) tree_->Insert(points, row);
  changes_since_build_ += inserted.size() + updated.size();
  changes_since_check_ += inserted.size() + updated.size();
  MaybeScheduleRebuildLocked();
}

void TreeIndex::OnDeleteLocked(absl::Span<const uint32_t> rows) {
  for (uint32_t row : rows) tree_->Remove(row);
  changes_since_build_ += rows.size();
  changes_since_check_ += rows.size();
  MaybeScheduleRebuildLocked();
}

void TreeIndex::PrepareDrift(const PointSource& after) {
  drift_bounds_ = tree_->ComputeBounds(after);
}

void TreeIndex::OnDriftLocked() {
  tree_->SetBounds(std::move(drift_bounds_));
  if (tree_->LeafRadiusSum() > (1 + kMaxDriftGrowth) * leaf_radius_at_build_) {
    RequestRebuild();
  } else {
    RequestCheck();
  }
}

void TreeIndex::OnRebase() { RequestRebuild(); }

void TreeIndex::RequestRebuild() {
  if (!options_.tree.background_rebuild) return;
  absl::MutexLock lock(&rebuild_mu_);
  rebuild_requested_ = true;
}

void TreeIndex::RequestCheck() {
  if (!options_.tree.background_rebuild) return;
  absl::MutexLock lock(&rebuild_mu_);
  check_requested_ = true;
}

std::optional<size_t> TreeIndex::RepairLooseSubtrees(Tree* tree, const PointSource& points) {
  const std::vector<int32_t> loose = tree->LooseSubtrees(points, kMaxLooseness);
  size_t rows = 0;
  for (int32_t f : loose) {
    if (f == 0) return std::nullopt;
    rows += tree->count(f);
  }
  if (rows > tree->count(0) / 2) return std::nullopt;
  for (int32_t f : loose) tree->RebuildSubtree(points, f);
  return loose.size();
}

std::optional<size_t> TreeIndex::RepairNow() {
  absl::MutexLock write_lock(&write_mu_);
  absl::WriterMutexLock lock(&mu_);
  auto copy = std::make_unique<Tree>(*tree_);
  const std::optional<size_t> repaired = RepairLooseSubtrees(copy.get(), Points());
  if (!repaired) {
    RebuildLocked();
  } else if (*repaired > 0) {
    SetTreeLocked(std::move(copy));
    subtree_rebuilds_ += *repaired;
  }
  return repaired;
}

size_t TreeIndex::ExtraMemoryLocked() const {
  absl::MutexLock lock(&routing_mu_);
  return tree_->MemoryBytes() + (routing_ ? routing_->MemoryBytes() : 0);
}

void TreeIndex::SetTreeLocked(std::unique_ptr<Tree> tree) {
  tree_ = std::move(tree);
  ++tree_epoch_;
  absl::MutexLock lock(&routing_mu_);
  routing_.reset();
}

std::shared_ptr<const TreeIndex::Routing> TreeIndex::RoutingLocked() const {
  absl::MutexLock lock(&routing_mu_);
  if (!routing_ || routing_->structure_version != tree_->structure_version()) {
    routing_ = std::make_shared<const Routing>(*tree_);
  }
  return routing_;
}

void TreeIndex::MaybeScheduleRebuildLocked() {
  if (changes_since_build_ > std::max<size_t>(size_at_build_ / 2, 1024)) {
    RequestRebuild();
  } else if (changes_since_check_ > std::max<size_t>(store_.size() / 16, 1024)) {
    changes_since_check_ = 0;
    RequestCheck();
  }
}

std::unique_ptr<Tree> TreeIndex::BuildTree(const PointSource& points,
                                           std::vector<uint32_t> rows) const {
  auto tree = std::make_unique<Tree>(
      options_.dim, TreeParams{.leaf_size = options_.tree.leaf_size,
                               .branching = options_.tree.branching});
  tree->Build(points, std::move(rows));
  return tree;
}

void TreeIndex::RebuildLoop() {
  absl::Time last_check = absl::InfinitePast();
  while (true) {
    bool full;
    {
      absl::MutexLock lock(&rebuild_mu_);
      rebuild_mu_.AwaitWithTimeout(
          absl::Condition(
              +[](TreeIndex* t) ABSL_EXCLUSIVE_LOCKS_REQUIRED(t->rebuild_mu_) {
                return t->stopping_ || t->rebuild_requested_ || t->check_requested_;
              },
              this),
          absl::Seconds(30));
      if (stopping_) return;
      if (!rebuild_requested_ && !check_requested_) continue;
      // Each check copies the scoring vectors: at most one per
      // kMinCheckInterval, however fast the writes come. A full rebuild is
      // not held back.
      if (!rebuild_requested_ && absl::Now() < last_check + kMinCheckInterval) {
        rebuild_mu_.AwaitWithDeadline(
            absl::Condition(
                +[](TreeIndex* t) ABSL_EXCLUSIVE_LOCKS_REQUIRED(t->rebuild_mu_) {
                  return t->stopping_ || t->rebuild_requested_;
                },
                this),
            last_check + kMinCheckInterval);
        if (stopping_) return;
      }
      full = rebuild_requested_;
      rebuild_requested_ = check_requested_ = false;
    }
    if (!full) last_check = absl::Now();
    // Snapshot the scoring vectors (and, for repairs, the tree) under the
    // reader lock; build off-lock.
    std::vector<float> data, scale;
    std::vector<uint32_t> rows;
    std::unique_ptr<Tree> fresh;
    {
      absl::ReaderMutexLock lock(&mu_);
      const PointSource points = Points();
      data.assign(points.data, points.data + store_.num_rows() * options_.dim);
      if (points.scale) scale.assign(points.scale, points.scale + store_.num_rows());
      for (uint32_t r = 0; r < store_.num_rows(); ++r) {
        if (store_.live(r)) rows.push_back(r);
      }
      if (!full) fresh = std::make_unique<Tree>(*tree_);
    }
    const auto start = std::chrono::steady_clock::now();
    const size_t snapshot_rows = data.size() / options_.dim;
    const PointSource snapshot{.data = data.data(),
                               .scale = scale.empty() ? nullptr : scale.data(),
                               .dim = options_.dim};
    size_t repaired = 0;
    if (!full) {
      const std::optional<size_t> n = RepairLooseSubtrees(fresh.get(), snapshot);
      if (n == 0) continue;  // nothing loose
      full = !n.has_value();
      repaired = n.value_or(0);
    }
    if (full) fresh = BuildTree(snapshot, std::move(rows));
    absl::MutexLock write_lock(&write_mu_);
    absl::WriterMutexLock lock(&mu_);
    const size_t caught_up = CatchUpLocked(fresh.get(), snapshot, snapshot_rows);
    SetTreeLocked(std::move(fresh));
    if (!full) {
      subtree_rebuilds_ += repaired;
      continue;
    }
    changes_since_build_ = caught_up;
    size_at_build_ = store_.size();
    leaf_radius_at_build_ = tree_->LeafRadiusSum();
    ++rebuilds_;
    last_rebuild_seconds_ =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }
}

size_t TreeIndex::CatchUpLocked(Tree* fresh, const PointSource& snapshot,
                                size_t snapshot_rows) const {
  const int dim = options_.dim;
  const PointSource now = Points();
  std::vector<float> movement(store_.num_rows(), 0.0f), a(dim), b(dim);
  size_t changed = 0;
  for (uint32_t r = 0; r < snapshot_rows; ++r) {
    if (fresh->leaf_of(r) == Tree::kNone) continue;
    if (r >= store_.num_rows() || !store_.live(r)) {
      fresh->Remove(r);
      ++changed;
      continue;
    }
    now.Get(r, a.data());
    snapshot.Get(r, b.data());
    double sq = 0;
    for (int j = 0; j < dim; ++j) sq += (double{a[j]} - b[j]) * (double{a[j]} - b[j]);
    if (sq == 0) continue;
    ++changed;
    const float moved = static_cast<float>(std::sqrt(sq) * (1 + 1e-6));
    if (moved > fresh->radius(fresh->leaf_of(r))) {
      fresh->Remove(r);  // moved far (re-encoded): place it anew
      fresh->Insert(now, r);
    } else {
      movement[r] = moved;
    }
  }
  for (uint32_t r = 0; r < store_.num_rows(); ++r) {
    if (store_.live(r) && fresh->leaf_of(r) == Tree::kNone) {
      fresh->Insert(now, r);
      ++changed;
    }
  }
  // A few moved rows: grow the radii over them (O(N)). Many (a drift
  // update came in): refit every bound exactly (O(N depth dim)).
  if (changed > store_.size() / 10) {
    fresh->SetBounds(fresh->ComputeBounds(now));
  } else {
    fresh->GrowRadii(movement);
  }
  return changed;
}

void TreeIndex::RebuildNow() {
  absl::MutexLock write_lock(&write_mu_);
  absl::WriterMutexLock lock(&mu_);
  RebuildLocked();
}

void TreeIndex::SaveExtraLocked(ByteWriter& w) const { tree_->Save(w); }

bool TreeIndex::RestoreExtraLocked(ByteReader& r) {
  if (r.done()) {  // a snapshot without a tree (or a reset): build one
    RebuildLocked();
    return true;
  }
  auto tree = std::make_unique<Tree>(
      options_.dim, TreeParams{.leaf_size = options_.tree.leaf_size,
                               .branching = options_.tree.branching});
  if (!tree->Load(r, store_.num_rows()) || !r.done() || !tree->CheckInvariants(Points()).ok()) {
    return false;
  }
  // Exactly the live rows are in the tree.
  for (uint32_t row = 0; row < store_.num_rows(); ++row) {
    if (store_.live(row) != (tree->leaf_of(row) != Tree::kNone)) return false;
  }
  if ((tree->num_nodes() ? tree->count(0) : 0) != store_.size()) return false;
  SetTreeLocked(std::move(tree));
  size_at_build_ = store_.size();
  changes_since_build_ = 0;
  leaf_radius_at_build_ = tree_->LeafRadiusSum();
  return true;
}

void TreeIndex::RebuildLocked() {
  const auto start = std::chrono::steady_clock::now();
  std::vector<uint32_t> rows;
  for (uint32_t r = 0; r < store_.num_rows(); ++r) {
    if (store_.live(r)) rows.push_back(r);
  }
  size_at_build_ = rows.size();
  SetTreeLocked(BuildTree(Points(), std::move(rows)));
  changes_since_build_ = 0;
  leaf_radius_at_build_ = tree_->LeafRadiusSum();
  ++rebuilds_;
  last_rebuild_seconds_ =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

absl::Status TreeIndex::CheckInvariants() const {
  absl::ReaderMutexLock lock(&mu_);
  RETURN_IF_ERROR(tree_->CheckInvariants(Points()));
  const size_t in_tree = tree_->num_nodes() ? tree_->count(0) : 0;
  if (in_tree != store_.size()) {
    return absl::InternalError(absl::StrCat("the tree holds ", in_tree,
                                            " targets, the store ", store_.size()));
  }
  for (uint32_t r = 0; r < store_.num_rows(); ++r) {
    if (store_.live(r) && tree_->leaf_of(r) == Tree::kNone) {
      return absl::InternalError(absl::StrCat("live row ", r, " is in no leaf"));
    }
  }
  return absl::OkStatus();
}

std::optional<TreeSummary> TreeIndex::TreeInfo() const {
  absl::ReaderMutexLock lock(&mu_);
  TreeSummary s = tree_->Stats(Points());
  s.rebuilds = rebuilds_;
  s.subtree_rebuilds = subtree_rebuilds_;
  s.last_rebuild_seconds = last_rebuild_seconds_;
  s.visits_per_query = visits_per_query_.load();
  s.sampler_proposals = sampler_proposals_.load();
  s.sampler_accepted = sampler_accepted_.load();
  {
    absl::MutexLock lock(&rebuild_mu_);
    s.rebuild_pending = rebuild_requested_;
  }
  return s;
}

std::vector<TreeIndex::Query> TreeIndex::MakeQueries(absl::Span<const QueryPlan> plans) const {
  std::vector<Query> qs(plans.size());
  for (size_t i = 0; i < plans.size(); ++i) {
    Query& q = qs[i];
    q.q = plans[i].query;
    q.norm = plans[i].norm;
    q.excluded.insert(plans[i].excluded.begin(), plans[i].excluded.end());
    q.window = plans[i].window();
    q.lo = plans[i].lo;
    q.hi = plans[i].hi;
  }
  return qs;
}

absl::StatusOr<SearchResult> TreeIndex::SearchLocked(
    absl::Span<const QueryPlan> plans, const SearchParams& params,
    std::vector<std::vector<size_t>>* above) const {
  const size_t n = plans.size();
  std::vector<Query> qs = MakeQueries(plans);
  bool window = false;
  for (const Query& q : qs) window = window || q.window;
  // The parameters as the searcher uses them (temperature 1 when unused).
  SearchParams p = params;
  if (!(p.temperature > 0)) p.temperature = 1;
  const std::shared_ptr<const Routing> routing = RoutingLocked();
  Searcher searcher(*tree_, *routing, store_, Points(), p);

  SearchResult result;
  result.index_version = version_;
  result.queries.resize(n);
  const size_t num_hard = p.num_top();
  const size_t m = p.rank_offset + num_hard;
  // The thresholds an exact top-k counts as it goes (those >= hi).
  std::vector<Searcher::Fused> fused(above ? n : 0);
  const bool fuse = above != nullptr && m > 0 && !p.approximate;
  if (fuse) {
    for (size_t i = 0; i < n; ++i) {
      for (float t : plans[i].count_above) {
        if (t >= qs[i].hi) fused[i].t.push_back(t);
      }
      fused[i].n.assign(fused[i].t.size(), 0);
    }
    searcher.Fuse(&fused);
  }
  // Proposal sampling under a window with no lower end (the margins,
  // max_score): the targets above hi are found by the tree's bounds and
  // excluded, after which the proposal runs as with exclusions, exactly.
  // (Under min_score the sampling uses the exact sampler: the targets below
  // it are too many to list.)
  const int num_samples = p.num_samples();
  const bool upper_only = window && p.filters.min_score == -MineFilters::kInf;
  const bool collect = num_samples > 0 && p.sampler == Sampler::kProposal && upper_only;
  std::vector<std::vector<uint32_t>> above_hi(collect ? n : 0);
  if (above != nullptr || collect) {
    // Counts by the tree's bounds (the thresholds a top-k does not count),
    // before the top part joins the exclusions: they are over the plan's.
    std::vector<std::vector<float>> rest(n);
    std::vector<std::vector<size_t>> counted(n);
    for (size_t i = 0; i < n; ++i) {
      for (float t : plans[i].count_above) {
        if (above != nullptr && (!fuse || t < qs[i].hi)) rest[i].push_back(t);
      }
      const bool listed = std::find(rest[i].begin(), rest[i].end(), qs[i].hi) != rest[i].end();
      if (collect && qs[i].window && !listed) {
        rest[i].insert(std::upper_bound(rest[i].begin(), rest[i].end(), qs[i].hi), qs[i].hi);
      }
      counted[i].assign(rest[i].size(), 0);
    }
    searcher.CountAbove(qs, rest, &counted, collect ? &above_hi : nullptr);
    for (size_t i = 0; above != nullptr && i < n; ++i) {
      const std::vector<float>& all = plans[i].count_above;
      (*above)[i].assign(all.size(), 0);
      for (size_t j = 0; j < all.size(); ++j) {
        const auto it = std::find(rest[i].begin(), rest[i].end(), all[j]);
        if (it != rest[i].end()) (*above)[i][j] = counted[i][it - rest[i].begin()];
      }
    }
  }
  if (m > 0) {
    RETURN_IF_ERROR(CheckCancelled(p));
    std::vector<std::vector<Hit>> top = searcher.TopBatch(qs, m);
    searcher.Fuse(nullptr);
    for (size_t i = 0; fuse && i < n; ++i) {
      const std::vector<float>& all = plans[i].count_above;
      for (size_t j = 0, r = 0; j < all.size(); ++j) {
        if (r < fused[i].t.size() && all[j] == fused[i].t[r]) (*above)[i][j] = fused[i].n[r++];
      }
    }
    for (size_t i = 0; i < n; ++i) {
      QueryResult& out = result.queries[i];
      for (size_t r = 0; r < top[i].size(); ++r) {
        // The rank window and the top part leave the sampling set.
        qs[i].excluded.insert(top[i][r].row);
        if (r < size_t(p.rank_offset)) continue;
        out.ids.push_back(top[i][r].id);
        out.scores.push_back(top[i][r].score);
        out.log_q.push_back(0.0f);
      }
      out.num_top = static_cast<int>(out.ids.size());
    }
  }
  if (collect) {
    for (size_t i = 0; i < n; ++i) {
      qs[i].excluded.insert(above_hi[i].begin(), above_hi[i].end());
      qs[i].window = false;  // what the window removes is excluded now
    }
  }
  if (num_samples > 0 && p.sampler == Sampler::kProposal && (!window || collect)) {
    RETURN_IF_ERROR(searcher.SampleProposalBatch(qs, num_samples, &result.queries));
  } else if (num_samples > 0) {
    for (size_t i = 0; i < n; ++i) {
      RETURN_IF_ERROR(CheckCancelled(p));
      Rng rng(p.seed, p.stream_offset + i);
      const size_t eligible = store_.size() - qs[i].excluded.size();
      searcher.SampleExact(qs[i], num_samples, eligible, rng, &result.queries[i]);
    }
  }
  if (p.want_log_z) {
    for (size_t i = 0; i < n; ++i) {
      RETURN_IF_ERROR(CheckCancelled(p));
      QueryResult& out = result.queries[i];
      // log Z is over the eligible targets: exclusions and the rank window
      // out, the top part in.
      Query q = qs[i];
      for (int j = 0; j < out.num_top; ++j) q.excluded.erase(*store_.Row(out.ids[j]));
      std::tie(out.log_z_lo, out.log_z_hi) = searcher.LogZ(q);
    }
  }
  visits_per_query_.store(static_cast<double>(searcher.visits()) / n);
  sampler_proposals_ += searcher.proposals();
  sampler_accepted_ += searcher.accepted();
  return result;
}

absl::Status TreeIndex::SyncDeviceTreeLocked(DeviceMirror& device, bool force) const {
  const std::pair<uint64_t, uint64_t> stamp{version_, tree_epoch_};
  if (!force && device.has_leaves() && stamp == device_stamp_) return absl::OkStatus();
  const Tree& t = *tree_;
  const int dim = options_.dim;
  const std::vector<int32_t>& leaves = t.leaves();
  // The centers change only with the structure (or with a new tree).
  const std::pair<uint64_t, uint64_t> structure{t.structure_version(), tree_epoch_};
  const bool same_structure = !force && device.has_leaves() && structure == device_structure_;
  std::vector<float> centers(same_structure ? 0 : leaves.size() * dim);
  std::vector<float> spreads(leaves.size());
  std::vector<uint32_t> begin(leaves.size()), count(leaves.size());
  for (size_t i = 0; i < leaves.size(); ++i) {
    const int32_t f = leaves[i];
    if (!same_structure) std::copy_n(t.center(f), dim, centers.data() + i * dim);
    spreads[i] = t.spread(f);
    begin[i] = t.member_begin(f);
    count[i] = static_cast<uint32_t>(t.members(f).size());
  }
  RETURN_IF_ERROR(device.SetLeaves(centers, spreads, begin, count, t.member_pool()));
  device_stamp_ = stamp;
  device_structure_ = structure;
  return absl::OkStatus();
}

}  // namespace negmine
