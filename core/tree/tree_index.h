// TreeIndex: the dynamic tree index (DESIGN.md idea 1), the default index of a
// collection. The exact index stays the oracle it is tested against.
//
// Algorithms (DESIGN.md 1b), per query of a batch:
//   - routing (Searcher::Route): the leaves whose centers score highest.
//     Leaves are grouped under the highest nodes of at most 8 leaf sizes;
//     one matrix product scores every group center for a chunk of queries,
//     and the leaves of the best groups (about twice as many as wanted) are
//     scored to keep the best. The groups and a contiguous copy of the leaf
//     centers are cached per structure version (Routing).
//   - exact top-k: 16 routed leaves, scored for the whole batch grouped by
//     leaf (one matrix product per leaf); then per query every leaf whose
//     upper bound reaches the k-th score so far (a branch and bound over the
//     tree with that threshold), scored the same batched way. Identical to
//     brute force (ties by id). In high dimension the ball bounds prune
//     little, and this costs about as much as brute force.
//   - approximate top-k (params.approximate): the routed leaves alone; their
//     number is params.beam_width (default 256).
//   - SAMPLE with Sampler::kProposal (default): a node f weighs n_f
//     exp(<q, c_f>/tau + |q|^2 spread_f / (2 d tau^2)). The proposal's
//     components are the leaves of the best 1/16 of the coarse groups
//     (nodes of at most 32 leaf sizes, scored by one matrix product per
//     chunk of queries) and every other coarse group, which, once drawn,
//     draws a leaf by its leaves' weights. Then y is drawn within the leaf
//     from its exact softmax. The log q returned is the exact
//     log-probability of that proposal. A batch draws its leaves first, then
//     scores the drawn leaves grouped by leaf.
//   - SAMPLE with Sampler::kExact: rejection from a frontier of nodes, each
//     proposing n_f exp(hi_f/tau); a uniform descendant is accepted with
//     probability exp((s - hi_f)/tau). Refined nodes (exactly scored leaves)
//     are sampled exactly. Samples follow the exact softmax; log q is
//     s/tau - log Z with log Z from the certified interval.
//   - log Z: a certified interval [log sum L_f, log sum U_f] over a frontier,
//     refined (largest U_f - L_f first) until its width is params.log_z_width.
//   - MIXED and the rank window: the top rank_offset + num_hard are found
//     exactly; the first rank_offset are skipped, and samples exclude all of
//     them.
//
// Maintenance: inserts, deletes and in-place updates change the tree under
// the writer lock (O(depth) per target, plus a leaf split or subtree merge).
// A drift update moves every target a little: the structure and the
// centers stay, and every node's radius and spread are recomputed exactly
// for the moved targets (Tree::ComputeBounds, O(N depth dim), under the
// reader lock), so the bounds stay valid without a rebuild. As the centers
// go stale the radii grow. A background thread rebuilds the whole tree after
// heavy churn (see IndexOptions::Tree) or once the leaves' summed radius has
// grown by kMaxDriftGrowth since the build. Between full rebuilds, after every
// drift update and every size/16 writes (at most once per
// kMinCheckInterval, since each check copies the scoring vectors), it
// measures every node's looseness
// (Tree::Looseness: stored radius over the radius a fresh build would give)
// and rebuilds only the highest subtrees looser than kMaxLooseness, in a copy
// of the tree, installed the same way; when those hold more than half of the
// targets, it rebuilds the whole tree instead. It
// builds off-lock from a copy of the scoring vectors (so a rebuild briefly
// doubles their memory), then, holding the writer lock, catches the new
// tree up with the writes made meanwhile (removed rows out, new rows in,
// rows moved far re-inserted, the bounds grown over the others, or refit
// exactly when a drift update moved them all) and installs it.
// Queries meanwhile run on the current tree.
//
// Thread safety: as the Index contract.
#ifndef NEGMINE_CORE_TREE_TREE_INDEX_H_
#define NEGMINE_CORE_TREE_TREE_INDEX_H_

#include <atomic>
#include <memory>
#include <optional>
#include <thread>
#include <utility>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "core/store_index.h"
#include "core/tree/tree.h"

namespace negmine {


class TreeIndex final : public StoreIndex {
 public:
  explicit TreeIndex(const IndexOptions& options);
  ~TreeIndex() override;

  // A score window (filters) makes sampling use the exact sampler, which
  // draws from the restricted softmax by rejection; the proposal's leaf
  // weights cannot see which targets a window removes.
  //
  // The counts (`above`): an exact top-k scores every target above the
  // window's hi (they lie in leaves whose bound beats the k-th eligible
  // score), so it counts those as it goes; a threshold below hi, or a search
  // without an exact top-k, is counted by the tree's bounds (a subtree
  // wholly above or below a threshold counts at once; only the leaves
  // across it are scored).
  absl::StatusOr<SearchResult> SearchLocked(absl::Span<const QueryPlan> plans,
                                            const SearchParams& params,
                                            std::vector<std::vector<size_t>>* above) const override
      ABSL_SHARED_LOCKS_REQUIRED(mu_);

  // The tree's invariants (Tree::CheckInvariants) and that it holds exactly
  // the store's live rows. For tests.
  absl::Status CheckInvariants() const;
  std::optional<TreeSummary> TreeInfo() const override;
  // Rebuilds the whole tree now, on the calling thread, under the writer
  // lock (tests and benchmarks).
  void RebuildNow();
  // Rebuilds the loose subtrees now, as the background thread does, on the
  // calling thread under the writer lock (tests). Returns how many were
  // rebuilt, or nullopt if a full rebuild was due and done instead.
  std::optional<size_t> RepairNow();

  // A subtree whose stored radius exceeds this many times the radius a fresh
  // build would give is rebuilt.
  static constexpr float kMaxLooseness = 1.5f;

 protected:
  void OnUpsertLocked(absl::Span<const uint32_t> inserted,
                      absl::Span<const uint32_t> updated) override
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void OnDeleteLocked(absl::Span<const uint32_t> rows) override
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void PrepareDrift(const PointSource& after) override
      ABSL_SHARED_LOCKS_REQUIRED(mu_) ABSL_EXCLUSIVE_LOCKS_REQUIRED(write_mu_);
  void OnDriftLocked() override ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_, write_mu_);
  // Snapshots carry the tree's arrays; a restored tree is checked against
  // the restored vectors (CheckInvariants) and rebuilt if it does not fit
  // or is absent.
  void SaveExtraLocked(ByteWriter& w) const override ABSL_SHARED_LOCKS_REQUIRED(mu_);
  bool RestoreExtraLocked(ByteReader& r) override ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // A drift re-base: a fresh tree over the new frame, in the background.
  void OnRebase() override ABSL_EXCLUSIVE_LOCKS_REQUIRED(write_mu_);
  size_t ExtraMemoryLocked() const override ABSL_SHARED_LOCKS_REQUIRED(mu_);
  void NoteDeviceVisits(double per_query) const override {
    visits_per_query_.store(per_query);
  }
  // The leaf level (centers, members) to the device after any write,
  // drift update or rebuild since the last upload.
  absl::Status SyncDeviceTreeLocked(DeviceMirror& device, bool force) const override
      ABSL_SHARED_LOCKS_REQUIRED(mu_) ABSL_EXCLUSIVE_LOCKS_REQUIRED(device_mu_);

 private:
  struct Query;
  // The queries as the searcher takes them.
  std::vector<Query> MakeQueries(absl::Span<const QueryPlan> plans) const
      ABSL_SHARED_LOCKS_REQUIRED(mu_);
  struct Routing;
  class Searcher;

  // Growth of the leaves' summed radius since the build (0.5: by half)
  // that triggers a rebuild after drift.
  static constexpr double kMaxDriftGrowth = 0.5;
  // The least time between two looseness checks.
  static constexpr absl::Duration kMinCheckInterval = absl::Seconds(30);

  void MaybeScheduleRebuildLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RequestRebuild();
  // Asks the background thread for a looseness check (and repairs).
  void RequestCheck();
  // Rebuilds the loose subtrees of `tree` (over `points`); returns how many,
  // or nullopt when they hold more than half of the targets.
  static std::optional<size_t> RepairLooseSubtrees(Tree* tree, const PointSource& points);
  // Builds the whole tree anew over the live rows, on this thread.
  void RebuildLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Brings `fresh`, built over `snapshot` (the scoring vectors when the
  // build began), up to the current rows and vectors; returns the rows
  // changed.
  size_t CatchUpLocked(Tree* fresh, const PointSource& snapshot,
                       size_t snapshot_rows) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RebuildLoop();
  // Builds a tree over the live rows of a copy of the store.
  std::unique_ptr<Tree> BuildTree(const PointSource& points,
                                  std::vector<uint32_t> rows) const;

  // The routing groups of the current tree (built on first use after a
  // change of structure); under its own lock, since searches share mu_.
  std::shared_ptr<const Routing> RoutingLocked() const ABSL_SHARED_LOCKS_REQUIRED(mu_);
  // Installs a new tree (and drops the old tree's routing).
  void SetTreeLocked(std::unique_ptr<Tree> tree) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  std::unique_ptr<Tree> tree_ ABSL_GUARDED_BY(mu_);
  mutable absl::Mutex routing_mu_;
  mutable std::shared_ptr<const Routing> routing_ ABSL_GUARDED_BY(routing_mu_);
  // Writes (rows changed) since the tree was built, and since the last
  // looseness check was requested.
  size_t changes_since_build_ ABSL_GUARDED_BY(mu_) = 0;
  size_t changes_since_check_ ABSL_GUARDED_BY(mu_) = 0;
  size_t size_at_build_ ABSL_GUARDED_BY(mu_) = 0;
  double leaf_radius_at_build_ ABSL_GUARDED_BY(mu_) = 0;
  Tree::Bounds drift_bounds_ ABSL_GUARDED_BY(write_mu_);
  uint64_t rebuilds_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t subtree_rebuilds_ ABSL_GUARDED_BY(mu_) = 0;
  // Bumped whenever a tree is installed (SetTreeLocked).
  uint64_t tree_epoch_ ABSL_GUARDED_BY(mu_) = 0;
  double last_rebuild_seconds_ ABSL_GUARDED_BY(mu_) = 0;
  mutable std::atomic<double> visits_per_query_{0};
  mutable std::atomic<uint64_t> sampler_proposals_{0}, sampler_accepted_{0};

  // (version_, tree_epoch_) when the leaves were last uploaded to the device.
  mutable std::pair<uint64_t, uint64_t> device_stamp_ ABSL_GUARDED_BY(device_mu_){~0ull, ~0ull};
  // (structure_version, tree_epoch_) of the leaf centers on the device.
  mutable std::pair<uint64_t, uint64_t> device_structure_ ABSL_GUARDED_BY(device_mu_){~0ull,
                                                                                     ~0ull};

  mutable absl::Mutex rebuild_mu_;
  bool rebuild_requested_ ABSL_GUARDED_BY(rebuild_mu_) = false;
  bool check_requested_ ABSL_GUARDED_BY(rebuild_mu_) = false;
  bool stopping_ ABSL_GUARDED_BY(rebuild_mu_) = false;
  std::thread rebuilder_;
};

}  // namespace negmine

#endif  // NEGMINE_CORE_TREE_TREE_INDEX_H_
