// TreeIndex::Searcher, its top-k (routing the leaves, scoring them batched
// by leaf, certifying an exact top-k), the frontier (the exact sampler and
// log Z) and the filters' counts. The class and the algorithms' contracts
// are in core/tree/searcher.h; the proposal sampler is in tree_sampling.cc.
#include <algorithm>
#include <cmath>
#include <limits>
#include <queue>

#include <Eigen/Core>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "core/random.h"
#include "core/top_k.h"
#include "core/tree/searcher.h"

namespace negmine {

void TreeIndex::Searcher::Route(const std::vector<Query>& queries, int width,
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

void TreeIndex::Searcher::ScoreLeavesBatched(const std::vector<Query>& queries,
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

void TreeIndex::Searcher::CandidateLeaves(const Query& q, float threshold,
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

std::vector<std::vector<Hit>> TreeIndex::Searcher::TopBatch(const std::vector<Query>& queries,
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

struct TreeIndex::Searcher::Entry {
  int32_t node;
  float hi;
  double log_draw;  // proposal weight: n exp(hi/tau), or Z exactly
  double log_u, log_l;  // bounds on the mass of the eligible targets
  bool exact = false;
  std::vector<uint32_t> rows;  // exact only: eligible rows and their s/tau
  std::vector<double> logw;
};

TreeIndex::Searcher::Entry TreeIndex::Searcher::MakeEntry(
    const Query& q, int32_t f, const absl::flat_hash_map<int32_t, uint32_t>& excluded_below) {
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

void TreeIndex::Searcher::MakeExact(const Query& q, Entry* e) {
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

class TreeIndex::Searcher::Frontier {
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

void TreeIndex::Searcher::SampleExact(const Query& q, int count, size_t eligible, Rng& rng,
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

void TreeIndex::Searcher::Complete(Frontier& frontier, const absl::flat_hash_set<uint32_t>& taken,
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

std::pair<double, double> TreeIndex::Searcher::LogZ(const Query& q) {
  Frontier frontier(this, q);
  frontier.Refine(p_.log_z_width, std::numeric_limits<size_t>::max());
  return frontier.Interval();
}

void TreeIndex::Searcher::CountAbove(const std::vector<Query>& queries,
                                     const std::vector<std::vector<float>>& t,
                                     std::vector<std::vector<size_t>>* out,
                                     std::vector<std::vector<uint32_t>>* collect) {
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

void TreeIndex::Searcher::CollectAll(const Query& q, int32_t f, std::vector<uint32_t>* out) const {
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

absl::flat_hash_map<int32_t, uint32_t> TreeIndex::Searcher::ExcludedBelow(const Query& q) const {
  absl::flat_hash_map<int32_t, uint32_t> below;
  for (uint32_t row : q.excluded) {
    for (int32_t f = tree_.leaf_of(row); f != Tree::kNone; f = tree_.parent(f)) ++below[f];
  }
  return below;
}
}  // namespace negmine
