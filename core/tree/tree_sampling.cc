// TreeIndex::Searcher's proposal sampler: leaves drawn from the proposal
// over the coarse groups and their leaves (DrawLeaves), then each draw's
// target from its leaf's exact softmax (DrawWithinLeaves), in rounds
// (DrawRounds). The class and the contracts are in core/tree/searcher.h.
#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>

#include <Eigen/Core>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "core/status.h"
#include "core/tree/draw_rounds.h"
#include "core/tree/searcher.h"

namespace negmine {

struct TreeIndex::Searcher::ProposalDraw {
  uint32_t query;
  uint32_t leaf;        // position in routing_.leaves
  uint64_t key;         // its random numbers: KeyUniform(key, 0 / 1 / 2)
  double log_q_leaf;    // log-probability of the leaf under the proposal
  uint32_t row = 0;     // then: the target drawn within the leaf
  float score = 0;
  double log_q = 0;     // log q(y) = log q(leaf) + log p(y | leaf)
};

struct TreeIndex::Searcher::NodeStats {
  Eigen::ArrayXf log_count, spread;
  NodeStats(const Tree& tree, const std::vector<int32_t>& nodes)
      : log_count(nodes.size()), spread(nodes.size()) {
    for (size_t i = 0; i < nodes.size(); ++i) {
      log_count[i] = std::log(static_cast<float>(tree.count(nodes[i])));
      spread[i] = tree.spread(nodes[i]);
    }
  }
};

absl::Status TreeIndex::Searcher::SampleProposalBatch(const std::vector<Query>& queries, int count,
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

absl::Status TreeIndex::Searcher::DrawLeaves(const std::vector<Query>& queries, int count,
                                             const NodeStats& leaf_stats,
                                             const NodeStats& group_stats, DrawRounds& rounds,
                                             std::vector<ProposalDraw>* draws) {
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

absl::Status TreeIndex::Searcher::DrawWithinLeaves(const std::vector<Query>& queries,
                                                   const DrawRounds& rounds,
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
}  // namespace negmine
