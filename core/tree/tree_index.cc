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

namespace negmine {
namespace {

using RowMatrix =
    Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
constexpr double kNegInfD = -std::numeric_limits<double>::infinity();
// Leaves of the beam: for approximate top-k by default, and as the first pass
// of exact top-k (whose threshold then prunes the rest).
constexpr int kDefaultBeamLeaves = 128;
constexpr int kCertifyBeamLeaves = 16;
constexpr float kBeamRadiusWeight = 0.5f;

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
  size_t Draw(Rng& rng) const {
    const double u = rng.Uniform() * cdf_.back();
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

// One query as the searcher sees it.
struct TreeIndex::Query {
  std::vector<float> q;  // scoring space: normalized for cosine
  float norm = 0;
  absl::flat_hash_set<uint32_t> excluded;  // store rows
};

// The algorithms, over one consistent tree (the caller holds mu_ shared).
class TreeIndex::Searcher {
 public:
  Searcher(const Tree& tree, const EmbeddingStore& store,
           const PointSource& points, const SearchParams& params)
      : tree_(tree), store_(store), points_(points), p_(params),
        dim_(points.dim), inv_tau_(1.0 / params.temperature) {}

  size_t visits() const { return visits_; }
  // Exact sampler: draws proposed and accepted, over this searcher's life.
  size_t proposals() const { return proposals_; }
  size_t accepted() const { return accepted_; }

  float Score(const Query& q, uint32_t row) const {
    return Dot(q.q.data(), points_.data + size_t{row} * dim_, dim_) *
           points_.Scale(row);
  }

  // Best-first until `width` non-empty leaves are found. Nodes are ordered by
  // <q, c> + kBeamRadiusWeight * r |q|. The full upper bound (weight 1)
  // over-favours wide nodes; the center alone (0) dives into one subtree,
  // since deep centers score higher than shallow ones. Measured on drift-bench
  // data (200k x 128, leaves of 64): recall@64 at 128 leaves was 0.95 with
  // 0.5, 0.89 with 0.25 and 0.73 with 0.
  void Beam(const Query& q, int width, std::vector<int32_t>* leaves) {
    std::priority_queue<std::pair<float, int32_t>> pq;
    pq.push({0.0f, 0});
    while (!pq.empty() && static_cast<int>(leaves->size()) < width) {
      const int32_t f = pq.top().second;
      pq.pop();
      if (tree_.count(f) == 0) continue;
      if (tree_.is_leaf(f)) {
        leaves->push_back(f);
        continue;
      }
      ++visits_;
      for (int32_t c = tree_.first_child(f);
           c < tree_.first_child(f) + tree_.num_children(f); ++c) {
        if (tree_.count(c) == 0) continue;
        pq.push({Dot(q.q.data(), tree_.center(c), dim_) +
                     kBeamRadiusWeight * tree_.radius(c) * q.norm,
                 c});
      }
    }
  }

  // Scores each query's leaves, grouped by leaf: one matrix product per leaf
  // against all of the queries that visit it.
  void ScoreLeavesBatched(const std::vector<Query>& queries,
                          const std::vector<std::vector<int32_t>>& leaves,
                          std::vector<TopHeap>* heaps) {
    absl::flat_hash_map<int32_t, std::vector<uint32_t>> by_leaf;
    for (size_t qi = 0; qi < leaves.size(); ++qi) {
      for (int32_t f : leaves[qi]) by_leaf[f].push_back(static_cast<uint32_t>(qi));
    }
    RowMatrix m, qs, s;
    for (auto& [leaf, qids] : by_leaf) {
      auto rows = tree_.members(leaf);
      m.resize(rows.size(), dim_);
      for (size_t i = 0; i < rows.size(); ++i) points_.Get(rows[i], m.row(i).data());
      qs.resize(qids.size(), dim_);
      for (size_t i = 0; i < qids.size(); ++i) {
        std::copy_n(queries[qids[i]].q.data(), dim_, qs.row(i).data());
      }
      s.noalias() = qs * m.transpose();
      visits_ += qids.size();
      for (size_t i = 0; i < qids.size(); ++i) {
        const Query& q = queries[qids[i]];
        TopHeap& heap = (*heaps)[qids[i]];
        for (size_t j = 0; j < rows.size(); ++j) {
          if (q.excluded.contains(rows[j])) continue;
          heap.Push({s(i, j), store_.id(rows[j]), rows[j]});
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
        if (hi + Slack(hi) >= threshold) stack.push_back(c);
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
    for (size_t qi = 0; qi < queries.size(); ++qi) Beam(queries[qi], width, &leaves[qi]);
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

  // The proposal sampler for query `qi`; `center_dots` holds <q, c_f> for
  // every leaf of tree_.leaves().
  void SampleProposal(const Query& q, const float* center_dots, int count,
                      Rng& rng, QueryResult* out) {
    const auto& leaves = tree_.leaves();
    absl::flat_hash_map<int32_t, uint32_t> excluded_in;
    for (uint32_t row : q.excluded) {
      const int32_t f = tree_.leaf_of(row);
      if (f != Tree::kNone) ++excluded_in[f];
    }
    const double spread_scale = double{q.norm} * q.norm / (2.0 * dim_) * inv_tau_ * inv_tau_;
    std::vector<double> logw(leaves.size());
    size_t eligible = 0;
    for (size_t i = 0; i < leaves.size(); ++i) {
      const int32_t f = leaves[i];
      auto it = excluded_in.find(f);
      const uint32_t n = tree_.count(f) - (it == excluded_in.end() ? 0 : it->second);
      eligible += n;
      logw[i] = n == 0 ? kNegInfD
                       : std::log(double(n)) + center_dots[i] * inv_tau_ +
                             tree_.spread(f) * spread_scale;
    }
    if (eligible == 0) return;
    const Categorical pick(logw);
    struct LeafDraw {
      std::vector<uint32_t> rows;
      std::vector<float> scores;
      Categorical* within = nullptr;
      double log_z = 0;
    };
    absl::flat_hash_map<size_t, LeafDraw> cache;
    std::vector<std::unique_ptr<Categorical>> owned;
    absl::flat_hash_set<uint32_t> taken;
    const size_t want = p_.with_replacement ? count : std::min<size_t>(count, eligible);
    const size_t max_attempts = 200 * want + 10000;
    for (size_t a = 0; a < max_attempts && out->ids.size() - out->num_top < want; ++a) {
      const size_t i = pick.Draw(rng);
      auto [it, fresh] = cache.try_emplace(i);
      LeafDraw& d = it->second;
      if (fresh) {
        ++visits_;
        std::vector<double> lw;
        for (uint32_t row : tree_.members(leaves[i])) {
          if (q.excluded.contains(row)) continue;
          d.rows.push_back(row);
          d.scores.push_back(Score(q, row));
          lw.push_back(d.scores.back() * inv_tau_);
        }
        owned.push_back(std::make_unique<Categorical>(lw));
        d.within = owned.back().get();
        d.log_z = d.within->log_total();
      }
      const size_t j = d.within->Draw(rng);
      const uint32_t row = d.rows[j];
      if (!p_.with_replacement && !taken.insert(row).second) continue;
      out->ids.push_back(store_.id(row));
      out->scores.push_back(d.scores[j]);
      out->log_q.push_back(static_cast<float>(logw[i] - pick.log_total() +
                                              d.scores[j] * inv_tau_ - d.log_z));
    }
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
    e.log_draw = std::log(double(n)) + e.hi * inv_tau_;
    e.log_u = n_eff == 0 ? kNegInfD : std::log(double(n_eff)) + e.hi * inv_tau_;
    e.log_l = n_eff == 0 ? kNegInfD : std::log(double(n_eff)) + lo * inv_tau_;
    return e;
  }

  void MakeExact(const Query& q, Entry* e) {
    ++visits_;
    e->exact = true;
    for (uint32_t row : tree_.members(e->node)) {
      if (q.excluded.contains(row)) continue;
      e->rows.push_back(row);
      e->logw.push_back(Score(q, row) * inv_tau_);
    }
    e->log_draw = e->log_u = e->log_l = LogSumExp(e->logw);
  }

  class Frontier {
   public:
    Frontier(Searcher* s, const Query& q) : s_(s), q_(q) {
      for (uint32_t row : q.excluded) {
        for (int32_t f = s->tree_.leaf_of(row); f != Tree::kNone; f = s->tree_.parent(f)) {
          ++excluded_below_[f];
        }
      }
      if (s->tree_.count(0) > 0) Add(0);
    }

    // Expands the loosest entry until the log Z interval is at most `width`
    // wide or `budget` expansions are done. Returns false if nothing is left
    // to refine. The loosest entry comes from a heap; the interval (an O(F)
    // sum) is checked every F/16 expansions, so the work is O(F log F).
    bool Refine(double width, size_t budget) {
      size_t until_check = 0;
      for (size_t b = 0; b < budget; ++b) {
        if (until_check == 0) {
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
    // unlikely; the attempts are capped and fewer results come back.
    const size_t max_attempts = 1000 * want + 100000;
    const size_t before = out->ids.size();
    size_t a = 0;
    for (; a < max_attempts && out->ids.size() - out->num_top < want; ++a) {
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
        if (q.excluded.contains(row)) {
          ++misses;
          continue;
        }
        logw = Score(q, row) * inv_tau_;
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
  }

  std::pair<double, double> LogZ(const Query& q) {
    Frontier frontier(this, q);
    frontier.Refine(p_.log_z_width, std::numeric_limits<size_t>::max());
    return frontier.Interval();
  }

 private:
  const Tree& tree_;
  const EmbeddingStore& store_;
  const PointSource points_;
  const SearchParams& p_;
  const int dim_;
  const double inv_tau_;
  size_t visits_ = 0;
  size_t proposals_ = 0, accepted_ = 0;
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
  MaybeScheduleRebuildLocked();
}

void TreeIndex::OnDeleteLocked(absl::Span<const uint32_t> rows) {
  for (uint32_t row : rows) tree_->Remove(row);
  changes_since_build_ += rows.size();
  MaybeScheduleRebuildLocked();
}

void TreeIndex::PrepareDrift(const PointSource& after) {
  drift_bounds_ = tree_->ComputeBounds(after);
}

void TreeIndex::OnDriftLocked() {
  tree_->SetBounds(std::move(drift_bounds_));
  if (tree_->LeafRadiusSum() > (1 + kMaxDriftGrowth) * leaf_radius_at_build_) {
    RequestRebuild();
  }
}

void TreeIndex::OnRebase() { RequestRebuild(); }

void TreeIndex::RequestRebuild() {
  if (!options_.tree.background_rebuild) return;
  absl::MutexLock lock(&rebuild_mu_);
  rebuild_requested_ = true;
}

size_t TreeIndex::ExtraMemoryLocked() const { return tree_->MemoryBytes(); }

void TreeIndex::MaybeScheduleRebuildLocked() {
  if (changes_since_build_ > std::max<size_t>(size_at_build_ / 2, 1024)) RequestRebuild();
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
  while (true) {
    {
      absl::MutexLock lock(&rebuild_mu_);
      rebuild_mu_.AwaitWithTimeout(
          absl::Condition(
              +[](TreeIndex* t) ABSL_EXCLUSIVE_LOCKS_REQUIRED(t->rebuild_mu_) {
                return t->stopping_ || t->rebuild_requested_;
              },
              this),
          absl::Seconds(30));
      if (stopping_) return;
      if (!rebuild_requested_) continue;
      rebuild_requested_ = false;
    }
    // Snapshot the scoring vectors under the reader lock; build off-lock.
    std::vector<float> data, scale;
    std::vector<uint32_t> rows;
    {
      absl::ReaderMutexLock lock(&mu_);
      const PointSource points = Points();
      data.assign(points.data, points.data + store_.num_rows() * options_.dim);
      if (points.scale) scale.assign(points.scale, points.scale + store_.num_rows());
      for (uint32_t r = 0; r < store_.num_rows(); ++r) {
        if (store_.live(r)) rows.push_back(r);
      }
    }
    const auto start = std::chrono::steady_clock::now();
    const size_t snapshot_rows = data.size() / options_.dim;
    const PointSource snapshot{.data = data.data(),
                               .scale = scale.empty() ? nullptr : scale.data(),
                               .dim = options_.dim};
    std::unique_ptr<Tree> fresh = BuildTree(snapshot, std::move(rows));
    absl::MutexLock write_lock(&write_mu_);
    absl::WriterMutexLock lock(&mu_);
    changes_since_build_ = CatchUpLocked(fresh.get(), snapshot, snapshot_rows);
    tree_ = std::move(fresh);
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
  tree_ = std::move(tree);
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
  tree_ = BuildTree(Points(), std::move(rows));
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

absl::StatusOr<SearchResult> TreeIndex::SearchLocked(
    absl::Span<const float> queries, size_t n,
    absl::Span<const std::vector<uint64_t>> exclude,
    const SearchParams& params) const {
  const int dim = options_.dim;
  std::vector<Query> qs(n);
  for (size_t i = 0; i < n; ++i) {
    Query& q = qs[i];
    q.q.assign(queries.begin() + i * dim, queries.begin() + (i + 1) * dim);
    double sq = 0;
    for (float v : q.q) sq += double{v} * v;
    q.norm = static_cast<float>(std::sqrt(sq));
    if (options_.metric == Metric::kCosine && q.norm > 0) {
      for (float& v : q.q) v /= q.norm;
      q.norm = 1;
    }
    if (!exclude.empty()) {
      for (uint64_t id : exclude[i]) {
        if (std::optional<size_t> row = store_.Row(id)) q.excluded.insert(*row);
      }
    }
  }
  // The parameters as the searcher uses them (temperature 1 when unused).
  SearchParams p = params;
  if (!(p.temperature > 0)) p.temperature = 1;
  Searcher searcher(*tree_, store_, Points(), p);

  SearchResult result;
  result.index_version = version_;
  result.queries.resize(n);
  const size_t num_hard = p.mode == MineMode::kTopK   ? p.k
                          : p.mode == MineMode::kMixed ? p.num_hard
                                                        : 0;
  const size_t m = p.rank_offset + num_hard;
  if (m > 0) {
    RETURN_IF_ERROR(CheckCancelled(p));
    std::vector<std::vector<Hit>> top = searcher.TopBatch(qs, m);
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
  const int num_samples = p.mode == MineMode::kTopK ? 0 : p.k - static_cast<int>(num_hard);
  if (num_samples > 0 && p.sampler == Sampler::kProposal) {
    // <q, c_f> for every leaf and query: one matrix product per query chunk.
    const auto& leaves = tree_->leaves();
    RowMatrix centers(leaves.size(), dim);
    for (size_t i = 0; i < leaves.size(); ++i) {
      std::copy_n(tree_->center(leaves[i]), dim, centers.row(i).data());
    }
    const size_t chunk = std::max<size_t>(1, (size_t{16} << 20) / std::max<size_t>(leaves.size(), 1));
    RowMatrix qm, dots;
    for (size_t b = 0; b < n; b += chunk) {
      RETURN_IF_ERROR(CheckCancelled(p));
      const size_t c = std::min(chunk, n - b);
      qm.resize(c, dim);
      for (size_t i = 0; i < c; ++i) std::copy_n(qs[b + i].q.data(), dim, qm.row(i).data());
      dots.noalias() = qm * centers.transpose();
      for (size_t i = 0; i < c; ++i) {
        Rng rng(p.seed, b + i);
        searcher.SampleProposal(qs[b + i], dots.row(i).data(), num_samples, rng,
                                &result.queries[b + i]);
      }
    }
  } else if (num_samples > 0) {
    for (size_t i = 0; i < n; ++i) {
      RETURN_IF_ERROR(CheckCancelled(p));
      Rng rng(p.seed, i);
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
  const std::pair<uint64_t, uint64_t> stamp{version_, rebuilds_};
  if (!force && device.has_leaves() && stamp == device_stamp_) return absl::OkStatus();
  const Tree& t = *tree_;
  const int dim = options_.dim;
  const std::vector<int32_t>& leaves = t.leaves();
  std::vector<float> centers(leaves.size() * dim);
  std::vector<uint32_t> offsets(leaves.size() + 1, 0), members;
  members.reserve(store_.size());
  for (size_t i = 0; i < leaves.size(); ++i) {
    const int32_t f = leaves[i];
    std::copy_n(t.center(f), dim, centers.data() + i * dim);
    const absl::Span<const uint32_t> m = t.members(f);
    members.insert(members.end(), m.begin(), m.end());
    offsets[i + 1] = static_cast<uint32_t>(members.size());
  }
  RETURN_IF_ERROR(device.SetLeaves(centers, offsets, members));
  device_stamp_ = stamp;
  return absl::OkStatus();
}

}  // namespace negmine
