// TreeIndex: routing and maintenance. The search entry point (SearchLocked:
// the queries, the counts' thresholds, the top part, then the samples and
// log Z, each handed to the Searcher), the routing groups (Routing), and the
// tree's upkeep: writes, drift updates, background and subtree rebuilds,
// snapshots, the leaf upload to the device. The Searcher itself is in
// core/tree/searcher.h, tree_search.cc and tree_sampling.cc.
#include "core/tree/tree_index.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "core/random.h"
#include "core/status.h"
#include "core/top_k.h"
#include "core/tree/searcher.h"

namespace negmine {

TreeIndex::Routing::Routing(const Tree& tree) : structure_version(tree.structure_version()) {
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

void TreeIndex::Routing::Visit(const Tree& tree, int32_t f, size_t group_max, size_t coarse_max,
                               bool in_coarse) {
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

RowMatrix TreeIndex::Routing::Centers(const Tree& tree, const std::vector<int32_t>& nodes) {
  RowMatrix c(nodes.size(), tree.dim());
  for (size_t i = 0; i < nodes.size(); ++i) {
    std::copy_n(tree.center(nodes[i]), tree.dim(), c.row(i).data());
  }
  return c;
}

void TreeIndex::Routing::CollectLeaves(const Tree& tree, int32_t f) {
  if (tree.count(f) == 0) return;
  if (tree.is_leaf(f)) {
    leaves.push_back(f);
    return;
  }
  for (int32_t c = tree.first_child(f); c < tree.first_child(f) + tree.num_children(f); ++c) {
    CollectLeaves(tree, c);
  }
}

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
