// Tree: the dynamic ball tree over a collection's targets, in flat arrays.
//
// Every node f has a center c_f, a covering radius r_f (every live target y
// below f has ||x(y) - c_f|| <= r_f), a live descendant count n_f and the mean
// squared distance of its targets to the center (the "spread", used by the
// sampling proposal). By Cauchy-Schwarz, for a query q and every y below f:
//   <q, c_f> - r_f ||q||  <=  <q, x(y)>  <=  <q, c_f> + r_f ||q||.
//
// Layout (structure of arrays; node 0 is the root):
//
//   node:          0      1    2    3  ...  17   18  ...
//   first_child: [ 1 ]  [17] [33] [ -]     [ -] [ -]
//   num_children:[16 ]  [16] [16] [ 0]     [ 0] [ 0]        children contiguous
//   center:      [c_0 ] [c_1] ...                            num_nodes x dim
//   radius, count, spread, parent: one per node
//   member_begin, member_count, member_cap: leaves only; a leaf's targets are
//     members[member_begin, member_begin + member_count), store rows
//
// At build time every subtree's targets are contiguous in `members` (DFS order
// of leaves). Live inserts that overflow a leaf's block move it to the end, so
// contiguity is per leaf afterwards. Nodes cut off by a merge stay in the
// arrays (num_dead_nodes) until the next rebuild compacts them.
//
// Why hierarchical k-means for the bulk build: its nodes are tight clusters
// (small radii, so the Cauchy-Schwarz bounds prune well), every level is a
// handful of matrix products (the same GEMM-shaped work as batched search),
// the branching factor is a knob, and it is simple to rebuild a subtree.
// The reference code's cover/SG tree guarantees separation per level but gives
// wide, uneven fan-outs that do not batch well.
//
// Vectors live in the EmbeddingStore; the tree sees them through a
// PointSource, which applies the metric's scaling (cosine: 1/||x||), so the
// tree's geometry is that of the scoring space.
//
// Thread safety: none; TreeIndex guards a Tree with its reader-writer lock.
// Const methods may run concurrently with each other.
#ifndef NEGMINE_CORE_TREE_TREE_H_
#define NEGMINE_CORE_TREE_TREE_H_

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "core/index.h"
#include "core/persist/bytes.h"
#include "core/store/point_source.h"

namespace negmine {

struct TreeParams {
  // Target leaf size at build; a leaf splits above 2x this, and a subtree
  // whose count falls below half of it is merged into one leaf.
  int leaf_size = 64;
  // Children per internal node at build.
  int branching = 16;
  // Lloyd iterations per k-means, and points per cluster it trains on.
  int kmeans_iterations = 6;
  int kmeans_sample_per_cluster = 64;
  uint64_t seed = 1;
};


class Tree {
 public:
  static constexpr int32_t kNone = -1;

  Tree(int dim, const TreeParams& params);

  // Builds over `rows` (store rows) from scratch, replacing any content.
  void Build(const PointSource& points, std::vector<uint32_t> rows);

  // Adds `row` (whose vector is already in the store), descending to the
  // nearest leaf and growing radii on the way; splits an overflowing leaf.
  void Insert(const PointSource& points, uint32_t row);
  // Removes `row`; merges a subtree that became small. Returns false if the
  // row is not in the tree.
  bool Remove(uint32_t row);

  // After some vectors moved in place: grows every node's radius by the
  // largest movement[row] of a target below it, which keeps the bounds
  // valid (centers stay). O(N).
  void GrowRadii(absl::Span<const float> movement);

  // Every node's exact covering radius and spread around its (unchanged)
  // center, for `points` (after every vector moved: a drift update). The
  // structure is not touched, so this can run under a reader lock, and
  // SetBounds installs the result. O(N depth dim).
  struct Bounds {
    std::vector<float> radius, spread;
  };
  Bounds ComputeBounds(const PointSource& points) const;
  void SetBounds(Bounds bounds);
  // Sum of the leaves' radii: grows as the centers go stale.
  double LeafRadiusSum() const;

  // Every node's looseness: its stored radius over the radius a fresh build
  // would give it (the largest distance of its targets from their mean); 1
  // for an empty node or one whose targets coincide. Deletes (the radius
  // never shrinks), inserts and drift (the center goes stale) raise it.
  // O(N depth dim).
  std::vector<float> Looseness(const PointSource& points) const;
  // The highest nodes whose looseness exceeds `max_looseness`.
  std::vector<int32_t> LooseSubtrees(const PointSource& points,
                                     float max_looseness) const;
  // Rebuilds the subtree below f from its targets with the bulk build. The
  // ancestors' bounds still hold (the targets are the same); the old nodes
  // below f are dead until a full build compacts them.
  void RebuildSubtree(const PointSource& points, int32_t f);

  // The arrays, for snapshots. Load replaces the content (of a tree over
  // store rows < num_rows) and checks the structure's consistency: sizes
  // agree, indices are in range, children come after their parent (so the
  // structure has no cycle). The caller checks the geometry with
  // CheckInvariants.
  void Save(ByteWriter& w) const;
  bool Load(ByteReader& r, size_t num_rows);

  // Every descendant lies within its ancestors' radii, counts are exact,
  // every row is in exactly one leaf. For tests; O(N depth dim).
  absl::Status CheckInvariants(const PointSource& points) const;

  // The structure fields of a TreeSummary; O(N depth dim) (looseness).
  TreeSummary Stats(const PointSource& points) const;
  size_t MemoryBytes() const;

  // --- read access for the search algorithms ---
  int dim() const { return dim_; }
  const TreeParams& params() const { return params_; }
  size_t num_nodes() const { return radius_.size(); }
  bool is_leaf(int32_t f) const { return num_children_[f] == 0; }
  const float* center(int32_t f) const { return center_.data() + size_t(f) * dim_; }
  float radius(int32_t f) const { return radius_[f]; }
  uint32_t count(int32_t f) const { return count_[f]; }
  float spread(int32_t f) const { return spread_[f]; }
  int32_t first_child(int32_t f) const { return first_child_[f]; }
  int32_t num_children(int32_t f) const { return num_children_[f]; }
  int32_t parent(int32_t f) const { return parent_[f]; }
  absl::Span<const uint32_t> members(int32_t leaf) const {
    return {members_.data() + member_begin_[leaf], member_count_[leaf]};
  }
  // The member pool that members() views: leaf f's targets are
  // member_pool()[member_begin(f), member_begin(f) + count). The device
  // mirrors it as is, so a write changes only a few of its entries there.
  absl::Span<const uint32_t> member_pool() const { return members_; }
  uint32_t member_begin(int32_t leaf) const { return member_begin_[leaf]; }
  // The leaf holding `row`, or kNone.
  int32_t leaf_of(uint32_t row) const {
    return row < leaf_of_row_.size() ? leaf_of_row_[row] : kNone;
  }
  // Reachable leaves with at least one target, in DFS order. Recomputed
  // after every structural change.
  const std::vector<int32_t>& leaves() const { return leaves_; }
  // Bumped by every change of structure (split, merge, build).
  uint64_t structure_version() const { return structure_version_; }

 private:
  int32_t NewNodes(int n, int32_t parent);
  // Fills node f's center, radius and spread from its rows.
  void Summarize(const PointSource& points, int32_t f,
                 absl::Span<const uint32_t> rows, float* scratch);
  // Recursively builds node f over rows (partitioned in place).
  void BuildNode(const PointSource& points, int32_t f, uint32_t* rows,
                 size_t n, uint64_t seed);
  void MakeLeaf(int32_t f, const uint32_t* rows, size_t n);
  void AppendMember(int32_t leaf, uint32_t row);
  void Split(const PointSource& points, int32_t leaf);
  void CollapseToLeaf(int32_t f);
  // Counts the nodes below f (not f) as dead.
  void DiscardBelow(int32_t f);
  void CollectRows(int32_t f, std::vector<uint32_t>* rows) const;
  void RefreshLeaves();
  int32_t NearestChild(int32_t f, const float* x) const;

  int dim_;
  TreeParams params_;
  std::vector<float> center_;
  std::vector<float> radius_;
  std::vector<float> spread_;
  std::vector<uint32_t> count_;
  std::vector<int32_t> first_child_;
  std::vector<int32_t> num_children_;
  std::vector<int32_t> parent_;
  std::vector<uint32_t> member_begin_, member_count_, member_cap_;
  std::vector<uint32_t> members_;
  std::vector<int32_t> leaf_of_row_;
  std::vector<int32_t> leaves_;
  size_t dead_nodes_ = 0;
  uint64_t structure_version_ = 0;
};

// k-means over `n` points of `dim` (row-major), k centers; returns the
// cluster of each point. Deterministic in `seed`. Trains on a sample of at
// most k * sample_per_cluster points, then assigns all of them.
std::vector<int> KMeans(const float* points, size_t n, int dim, int k,
                        int iterations, int sample_per_cluster, uint64_t seed,
                        std::vector<float>* centers);

}  // namespace negmine

#endif  // NEGMINE_CORE_TREE_TREE_H_
