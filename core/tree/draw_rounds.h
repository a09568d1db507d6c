// DrawRounds: the bookkeeping of the proposal sampler's rounds, shared by the
// CPU tree and its device path (StoreIndex on CUDA).
//
// Each query wants `want` results (set_want). A round draws i.i.d. from the
// proposal: the first round `want` draws per query, each later one twice the
// query's shortfall. Without replacement a draw of a target already taken is
// rejected; taking the first distinct draws of an i.i.d. stream is the law of
// sequential sampling without replacement.
//
// A sampler that removes the taken targets' mass (removes_mass: each round
// draws from the proposal restricted to the targets not taken yet, which
// Took() records per leaf) gets at least one new result per round, and so
// never comes back short: it runs until every query has its results (at
// most want + 64 rounds, a guard against rounding). One that does not
// (the device path) stops a query after 200 want + 10000 draws (the last of
// k ~ eligible targets can be very unlikely under the proposal); it then
// returns fewer.
//
// Draws are numbered per query over all rounds (attempts()), so a query's
// random numbers can be counter-based and its samples do not depend on the
// batch around it.
#ifndef NEGMINE_CORE_TREE_DRAW_ROUNDS_H_
#define NEGMINE_CORE_TREE_DRAW_ROUNDS_H_

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <numeric>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"

namespace negmine {

class DrawRounds {
 public:
  DrawRounds(size_t num_queries, bool with_replacement, bool removes_mass = false)
      : want_(num_queries, 0),
        got_(num_queries, 0),
        attempts_(num_queries, 0),
        taken_(with_replacement ? 0 : num_queries),
        taken_leaves_(with_replacement || !removes_mass ? 0 : num_queries),
        active_(num_queries) {
    std::iota(active_.begin(), active_.end(), 0);
  }

  // The mass taken from one leaf: the sum of p(y | leaf) over the targets
  // taken in it, and their number.
  struct TakenMass {
    double mass = 0;
    uint32_t count = 0;
  };
  using LeafMass = absl::flat_hash_map<uint32_t, TakenMass>;
  // Records that query q's result (just taken) came from `leaf` with
  // probability p_within there. Only with removes_mass, without replacement.
  void Took(uint32_t q, uint32_t leaf, double p_within) {
    TakenMass& t = taken_leaves_[q][leaf];
    t.mass += p_within;
    ++t.count;
  }
  // Query q's taken mass by leaf (empty unless removes_mass).
  const LeafMass& taken_leaves(uint32_t q) const {
    static const LeafMass kNone;
    return taken_leaves_.empty() ? kNone : taken_leaves_[q];
  }
  bool removes_mass() const { return !taken_leaves_.empty(); }
  // Whether query q has taken `row` (always false with replacement).
  bool taken(uint32_t q, uint32_t row) const { return !taken_.empty() && taken_[q].contains(row); }

  // The queries that draw in this round.
  const std::vector<uint32_t>& active() const { return active_; }
  bool first_round() const { return first_round_; }
  // Query q wants `count` results out of `eligible` targets: all of them at
  // most without replacement, none when nothing is eligible.
  void set_want(uint32_t q, size_t count, size_t eligible) {
    want_[q] = eligible == 0 ? 0 : taken_.empty() ? count : std::min(count, eligible);
  }
  // Draws query q makes this round.
  size_t Need(uint32_t q) const {
    return first_round_ ? want_[q] : 2 * (want_[q] - got_[q]);
  }
  // Query q's draws so far (the number of its next draw).
  size_t attempts(uint32_t q) const { return attempts_[q]; }
  void Drew(uint32_t q, size_t draws) { attempts_[q] += draws; }
  // Offers query q's next draw, in draw order; true when it is a result.
  bool Take(uint32_t q, uint32_t row) {
    if (got_[q] == want_[q]) return false;
    if (!taken_.empty() && !taken_[q].insert(row).second) return false;
    ++got_[q];
    return true;
  }
  // Ends a round: the queries still short and under the cap stay active.
  void EndRound() {
    std::vector<uint32_t> still;
    ++rounds_;
    for (uint32_t q : active_) {
      const bool more = removes_mass() ? rounds_ < want_[q] + 64
                                       : attempts_[q] < 200 * want_[q] + 10000;
      if (got_[q] < want_[q] && more) still.push_back(q);
    }
    active_ = std::move(still);
    first_round_ = false;
  }

 private:
  std::vector<size_t> want_, got_, attempts_;
  std::vector<absl::flat_hash_set<uint32_t>> taken_;
  std::vector<LeafMass> taken_leaves_;
  std::vector<uint32_t> active_;
  size_t rounds_ = 0;
  bool first_round_ = true;
};

}  // namespace negmine

#endif  // NEGMINE_CORE_TREE_DRAW_ROUNDS_H_
