#include "core/tree/tree.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include <Eigen/Core>

#include "absl/strings/str_cat.h"
#include "core/random.h"

namespace negmine {
namespace {

using RowMatrix =
    Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

float SquaredDistance(const float* a, const float* b, int dim) {
  return (Eigen::Map<const Eigen::VectorXf>(a, dim) -
          Eigen::Map<const Eigen::VectorXf>(b, dim))
      .squaredNorm();
}

// Assigns each of the n points to its nearest center (squared L2), in blocks
// so that the n x k distance matrix stays small.
void Assign(const float* points, size_t n, int dim, const RowMatrix& centers,
            std::vector<int>* labels, std::vector<float>* dist) {
  const int k = static_cast<int>(centers.rows());
  const Eigen::VectorXf c_norms = centers.rowwise().squaredNorm();
  labels->resize(n);
  if (dist) dist->resize(n);
  constexpr size_t kBlock = 4096;
  RowMatrix dots;
  for (size_t b = 0; b < n; b += kBlock) {
    const size_t m = std::min(kBlock, n - b);
    Eigen::Map<const RowMatrix> x(points + b * dim, m, dim);
    dots.noalias() = x * centers.transpose();
    for (size_t i = 0; i < m; ++i) {
      int best = 0;
      float best_d = std::numeric_limits<float>::infinity();
      for (int c = 0; c < k; ++c) {
        const float d = c_norms[c] - 2 * dots(i, c);
        if (d < best_d) {
          best_d = d;
          best = c;
        }
      }
      (*labels)[b + i] = best;
      if (dist) (*dist)[b + i] = best_d;
    }
  }
}

}  // namespace

std::vector<int> KMeans(const float* points, size_t n, int dim, int k,
                        int iterations, int sample_per_cluster, uint64_t seed,
                        std::vector<float>* centers_out) {
  Rng rng(seed, 17);
  // Train on a sample.
  const size_t m = std::min(n, static_cast<size_t>(k) * sample_per_cluster);
  std::vector<size_t> idx(n);
  std::iota(idx.begin(), idx.end(), 0);
  for (size_t i = 0; i < m; ++i) std::swap(idx[i], idx[i + rng.Below(n - i)]);
  RowMatrix sample(m, dim);
  for (size_t i = 0; i < m; ++i) {
    std::copy_n(points + idx[i] * dim, dim, sample.row(i).data());
  }
  // k-means++ seeding.
  RowMatrix centers(k, dim);
  std::vector<float> d2(m, std::numeric_limits<float>::infinity());
  size_t pick = rng.Below(m);
  for (int c = 0; c < k; ++c) {
    centers.row(c) = sample.row(pick);
    double total = 0;
    for (size_t i = 0; i < m; ++i) {
      d2[i] = std::min(d2[i], SquaredDistance(sample.row(i).data(),
                                              centers.row(c).data(), dim));
      total += d2[i];
    }
    if (c + 1 == k) break;
    double u = rng.Uniform() * total;
    pick = m - 1;
    for (size_t i = 0; i < m; ++i) {
      u -= d2[i];
      if (u <= 0) {
        pick = i;
        break;
      }
    }
  }
  // Lloyd iterations on the sample.
  std::vector<int> labels;
  std::vector<float> dist;
  for (int it = 0; it < iterations; ++it) {
    Assign(sample.data(), m, dim, centers, &labels, &dist);
    RowMatrix sums = RowMatrix::Zero(k, dim);
    std::vector<size_t> counts(k, 0);
    for (size_t i = 0; i < m; ++i) {
      sums.row(labels[i]) += sample.row(i);
      ++counts[labels[i]];
    }
    for (int c = 0; c < k; ++c) {
      if (counts[c] > 0) {
        centers.row(c) = sums.row(c) / static_cast<float>(counts[c]);
      } else {
        // An empty cluster takes the point farthest from its center.
        const size_t far =
            std::max_element(dist.begin(), dist.end()) - dist.begin();
        centers.row(c) = sample.row(far);
        dist[far] = 0;
      }
    }
  }
  Assign(points, n, dim, centers, &labels, nullptr);
  if (centers_out) centers_out->assign(centers.data(), centers.data() + centers.size());
  return labels;
}

Tree::Tree(int dim, const TreeParams& params) : dim_(dim), params_(params) {
  params_.leaf_size = std::max(2, params_.leaf_size);
  params_.branching = std::max(2, params_.branching);
}

int32_t Tree::NewNodes(int n, int32_t parent) {
  const int32_t first = static_cast<int32_t>(radius_.size());
  center_.resize(center_.size() + size_t(n) * dim_, 0.0f);
  radius_.resize(radius_.size() + n, 0.0f);
  spread_.resize(spread_.size() + n, 0.0f);
  count_.resize(count_.size() + n, 0);
  first_child_.resize(first_child_.size() + n, kNone);
  num_children_.resize(num_children_.size() + n, 0);
  parent_.resize(parent_.size() + n, parent);
  member_begin_.resize(member_begin_.size() + n, 0);
  member_count_.resize(member_count_.size() + n, 0);
  member_cap_.resize(member_cap_.size() + n, 0);
  return first;
}

void Tree::Summarize(const PointSource& points, int32_t f,
                     absl::Span<const uint32_t> rows, float* x) {
  std::vector<double> mean(dim_, 0.0);
  for (uint32_t r : rows) {
    points.Get(r, x);
    for (int j = 0; j < dim_; ++j) mean[j] += x[j];
  }
  float* c = center_.data() + size_t(f) * dim_;
  for (int j = 0; j < dim_; ++j) {
    c[j] = rows.empty() ? 0.0f : static_cast<float>(mean[j] / rows.size());
  }
  float r2 = 0;
  double sq = 0;
  for (uint32_t r : rows) {
    points.Get(r, x);
    const float d = SquaredDistance(x, c, dim_);
    r2 = std::max(r2, d);
    sq += d;
  }
  // Rounding in the distance can put a target a hair outside; pad by a
  // relative 1e-6 so that the covering property holds in float arithmetic.
  radius_[f] = std::sqrt(r2) * (1.0f + 1e-6f) + 1e-7f;
  spread_[f] = rows.empty() ? 0.0f : static_cast<float>(sq / rows.size());
  count_[f] = static_cast<uint32_t>(rows.size());
}

void Tree::MakeLeaf(int32_t f, const uint32_t* rows, size_t n) {
  num_children_[f] = 0;
  first_child_[f] = kNone;
  member_begin_[f] = static_cast<uint32_t>(members_.size());
  member_count_[f] = static_cast<uint32_t>(n);
  member_cap_[f] = static_cast<uint32_t>(n);
  members_.insert(members_.end(), rows, rows + n);
  for (size_t i = 0; i < n; ++i) {
    if (rows[i] >= leaf_of_row_.size()) leaf_of_row_.resize(rows[i] + 1, kNone);
    leaf_of_row_[rows[i]] = f;
  }
}

void Tree::BuildNode(const PointSource& points, int32_t f, uint32_t* rows,
                     size_t n, uint64_t seed) {
  std::vector<float> x(dim_);
  Summarize(points, f, {rows, n}, x.data());
  const size_t leaf = params_.leaf_size;
  if (n <= leaf) {
    MakeLeaf(f, rows, n);
    return;
  }
  const int k = static_cast<int>(
      std::min<size_t>(params_.branching, (n + leaf - 1) / leaf));
  std::vector<float> data(n * dim_);
  for (size_t i = 0; i < n; ++i) points.Get(rows[i], data.data() + i * dim_);
  std::vector<int> labels =
      KMeans(data.data(), n, dim_, k, params_.kmeans_iterations,
             params_.kmeans_sample_per_cluster, seed, nullptr);
  data = {};
  // Counting sort of the rows by cluster; drop empty clusters.
  std::vector<size_t> sizes(k, 0);
  for (int l : labels) ++sizes[l];
  int nonempty = 0;
  for (size_t s : sizes) nonempty += s > 0;
  if (nonempty < 2) {
    // Degenerate (e.g. duplicates): split in halves so that the recursion
    // ends.
    for (size_t i = 0; i < n; ++i) labels[i] = i < n / 2 ? 0 : 1;
    std::fill(sizes.begin(), sizes.end(), 0);
    sizes[0] = n / 2;
    sizes[1] = n - n / 2;
    nonempty = 2;
  }
  std::vector<int> child_of(k, -1);
  std::vector<size_t> offset(k, 0);
  size_t total = 0;
  int next = 0;
  for (int c = 0; c < k; ++c) {
    if (sizes[c] == 0) continue;
    child_of[c] = next++;
    offset[c] = total;
    total += sizes[c];
  }
  std::vector<uint32_t> sorted(n);
  {
    std::vector<size_t> pos = offset;
    for (size_t i = 0; i < n; ++i) sorted[pos[labels[i]]++] = rows[i];
  }
  std::copy(sorted.begin(), sorted.end(), rows);
  const int32_t first = NewNodes(nonempty, f);
  first_child_[f] = first;
  num_children_[f] = nonempty;
  for (int c = 0; c < k; ++c) {
    if (child_of[c] < 0) continue;
    BuildNode(points, first + child_of[c], rows + offset[c], sizes[c],
              Mix64(seed + 1 + c));
  }
}

void Tree::Build(const PointSource& points, std::vector<uint32_t> rows) {
  center_.clear();
  radius_.clear();
  spread_.clear();
  count_.clear();
  first_child_.clear();
  num_children_.clear();
  parent_.clear();
  member_begin_.clear();
  member_count_.clear();
  member_cap_.clear();
  members_.clear();
  leaf_of_row_.assign(leaf_of_row_.size(), kNone);
  dead_nodes_ = 0;
  members_.reserve(rows.size());
  NewNodes(1, kNone);
  BuildNode(points, 0, rows.data(), rows.size(), params_.seed);
  ++structure_version_;
  RefreshLeaves();
}

int32_t Tree::NearestChild(int32_t f, const float* x) const {
  int32_t best = first_child_[f];
  float best_d = std::numeric_limits<float>::infinity();
  for (int32_t c = first_child_[f]; c < first_child_[f] + num_children_[f]; ++c) {
    const float d = SquaredDistance(x, center(c), dim_);
    if (d < best_d) {
      best_d = d;
      best = c;
    }
  }
  return best;
}

void Tree::AppendMember(int32_t leaf, uint32_t row) {
  if (member_count_[leaf] == member_cap_[leaf]) {
    // Move the block to the end with room to grow.
    const uint32_t cap = std::max<uint32_t>(2 * member_cap_[leaf],
                                            2 * params_.leaf_size + 1);
    const uint32_t begin = static_cast<uint32_t>(members_.size());
    members_.resize(members_.size() + cap);
    std::copy_n(members_.begin() + member_begin_[leaf], member_count_[leaf],
                members_.begin() + begin);
    member_begin_[leaf] = begin;
    member_cap_[leaf] = cap;
  }
  members_[member_begin_[leaf] + member_count_[leaf]++] = row;
  if (row >= leaf_of_row_.size()) leaf_of_row_.resize(row + 1, kNone);
  leaf_of_row_[row] = leaf;
}

void Tree::Insert(const PointSource& points, uint32_t row) {
  std::vector<float> x(dim_);
  points.Get(row, x.data());
  if (radius_.empty()) NewNodes(1, kNone);
  int32_t f = 0;
  bool structure_changed = false;
  while (true) {
    float* c = center_.data() + size_t(f) * dim_;
    if (count_[f] == 0) {
      // An empty node recenters on its first target.
      std::copy(x.begin(), x.end(), c);
      radius_[f] = 0;
      spread_[f] = 0;
      structure_changed = true;  // an empty leaf becomes visible
    }
    const float d2 = SquaredDistance(x.data(), c, dim_);
    radius_[f] = std::max(radius_[f], std::sqrt(d2) * (1.0f + 1e-6f) + 1e-7f);
    spread_[f] = (spread_[f] * count_[f] + d2) / (count_[f] + 1);
    ++count_[f];
    if (is_leaf(f)) break;
    f = NearestChild(f, x.data());
  }
  AppendMember(f, row);
  if (member_count_[f] > 2u * params_.leaf_size) {
    Split(points, f);
  } else if (structure_changed) {
    ++structure_version_;
    RefreshLeaves();
  }
}

void Tree::Split(const PointSource& points, int32_t leaf) {
  std::vector<uint32_t> rows(members(leaf).begin(), members(leaf).end());
  member_count_[leaf] = 0;  // the block is abandoned
  // Rebuilding the leaf as a subtree splits it with the build's k-means.
  uint64_t seed = Mix64(params_.seed ^ (uint64_t(leaf) << 20) ^ structure_version_);
  BuildNode(points, leaf, rows.data(), rows.size(), seed);
  ++structure_version_;
  RefreshLeaves();
}

void Tree::CollectRows(int32_t f, std::vector<uint32_t>* rows) const {
  if (is_leaf(f)) {
    auto m = members(f);
    rows->insert(rows->end(), m.begin(), m.end());
    return;
  }
  for (int32_t c = first_child_[f]; c < first_child_[f] + num_children_[f]; ++c) {
    CollectRows(c, rows);
  }
}

void Tree::DiscardBelow(int32_t f) {
  std::vector<int32_t> stack = {f};
  while (!stack.empty()) {
    const int32_t g = stack.back();
    stack.pop_back();
    if (g != f) ++dead_nodes_;
    for (int32_t c = first_child_[g]; c >= 0 && c < first_child_[g] + num_children_[g]; ++c) {
      stack.push_back(c);
    }
  }
}

void Tree::CollapseToLeaf(int32_t f) {
  std::vector<uint32_t> rows;
  CollectRows(f, &rows);
  DiscardBelow(f);
  // The radius stays: it still covers every row below.
  MakeLeaf(f, rows.data(), rows.size());
  ++structure_version_;
  RefreshLeaves();
}

void Tree::RebuildSubtree(const PointSource& points, int32_t f) {
  std::vector<uint32_t> rows;
  CollectRows(f, &rows);
  DiscardBelow(f);
  const uint64_t seed = Mix64(params_.seed ^ (uint64_t(f) << 20) ^ structure_version_);
  BuildNode(points, f, rows.data(), rows.size(), seed);
  ++structure_version_;
  RefreshLeaves();
}

std::vector<float> Tree::Looseness(const PointSource& points) const {
  const size_t n = num_nodes();
  // Pass 1: every node's mean; pass 2: the largest distance from it.
  std::vector<double> sum(n * dim_, 0.0);
  std::vector<float> x(dim_);
  for (int32_t leaf : leaves_) {
    for (uint32_t row : members(leaf)) {
      points.Get(row, x.data());
      for (int32_t f = leaf; f != kNone; f = parent_[f]) {
        double* s = sum.data() + size_t(f) * dim_;
        for (int j = 0; j < dim_; ++j) s[j] += x[j];
      }
    }
  }
  std::vector<float> mean(n * dim_, 0.0f), r2(n, 0.0f);
  for (size_t f = 0; f < n; ++f) {
    if (count_[f] == 0) continue;
    for (int j = 0; j < dim_; ++j) mean[f * dim_ + j] = static_cast<float>(sum[f * dim_ + j] / count_[f]);
  }
  sum = {};
  for (int32_t leaf : leaves_) {
    for (uint32_t row : members(leaf)) {
      points.Get(row, x.data());
      for (int32_t f = leaf; f != kNone; f = parent_[f]) {
        r2[f] = std::max(r2[f], SquaredDistance(x.data(), mean.data() + size_t(f) * dim_, dim_));
      }
    }
  }
  std::vector<float> out(n, 1.0f);
  for (size_t f = 0; f < n; ++f) {
    if (count_[f] > 0 && r2[f] > 0) out[f] = radius_[f] / std::sqrt(r2[f]);
  }
  return out;
}

std::vector<int32_t> Tree::LooseSubtrees(const PointSource& points,
                                         float max_looseness) const {
  std::vector<int32_t> out;
  if (radius_.empty()) return out;
  const std::vector<float> loose = Looseness(points);
  std::vector<int32_t> stack = {0};
  while (!stack.empty()) {
    const int32_t f = stack.back();
    stack.pop_back();
    if (count_[f] == 0) continue;
    if (loose[f] > max_looseness) {
      out.push_back(f);
      continue;
    }
    for (int32_t c = first_child_[f]; c >= 0 && c < first_child_[f] + num_children_[f]; ++c) {
      stack.push_back(c);
    }
  }
  return out;
}

bool Tree::Remove(uint32_t row) {
  const int32_t leaf = leaf_of(row);
  if (leaf == kNone) return false;
  uint32_t* m = members_.data() + member_begin_[leaf];
  const uint32_t n = member_count_[leaf];
  const uint32_t pos = static_cast<uint32_t>(std::find(m, m + n, row) - m);
  m[pos] = m[n - 1];
  --member_count_[leaf];
  leaf_of_row_[row] = kNone;
  // Counts up the path; find the highest internal ancestor that became small
  // enough to be one leaf.
  int32_t merge = kNone;
  for (int32_t f = leaf; f != kNone; f = parent_[f]) {
    --count_[f];
    if (!is_leaf(f) && count_[f] < uint32_t(params_.leaf_size) / 2) merge = f;
  }
  if (merge != kNone) {
    CollapseToLeaf(merge);
  } else if (member_count_[leaf] == 0) {
    ++structure_version_;
    RefreshLeaves();
  }
  return true;
}

void Tree::GrowRadii(absl::Span<const float> movement) {
  std::vector<float> grow(num_nodes(), 0.0f);
  for (int32_t leaf : leaves_) {
    for (uint32_t row : members(leaf)) grow[leaf] = std::max(grow[leaf], movement[row]);
  }
  // Children come after their parent in the arrays.
  for (int32_t f = static_cast<int32_t>(num_nodes()) - 1; f > 0; --f) {
    if (parent_[f] != kNone) grow[parent_[f]] = std::max(grow[parent_[f]], grow[f]);
  }
  for (size_t f = 0; f < num_nodes(); ++f) radius_[f] += grow[f];
}

Tree::Bounds Tree::ComputeBounds(const PointSource& points) const {
  Bounds b{.radius = radius_, .spread = spread_};
  std::vector<float> r2(num_nodes(), 0.0f);
  std::vector<double> sq(num_nodes(), 0.0);
  std::vector<float> x(dim_);
  for (int32_t leaf : leaves_) {
    for (uint32_t row : members(leaf)) {
      points.Get(row, x.data());
      for (int32_t f = leaf; f != kNone; f = parent_[f]) {
        const float d = SquaredDistance(x.data(), center(f), dim_);
        r2[f] = std::max(r2[f], d);
        sq[f] += d;
      }
    }
  }
  for (size_t f = 0; f < num_nodes(); ++f) {
    if (count_[f] == 0) continue;
    // Padded as in Summarize, so the covering property holds in float.
    b.radius[f] = std::sqrt(r2[f]) * (1.0f + 1e-6f) + 1e-7f;
    b.spread[f] = static_cast<float>(sq[f] / count_[f]);
  }
  return b;
}

void Tree::SetBounds(Bounds bounds) {
  radius_ = std::move(bounds.radius);
  spread_ = std::move(bounds.spread);
}

void Tree::Save(ByteWriter& w) const {
  w.Put<int32_t>(dim_);
  w.PutArray(center_);
  w.PutArray(radius_);
  w.PutArray(spread_);
  w.PutArray(count_);
  w.PutArray(first_child_);
  w.PutArray(num_children_);
  w.PutArray(parent_);
  w.PutArray(member_begin_);
  w.PutArray(member_count_);
  w.PutArray(member_cap_);
  w.PutArray(members_);
  w.PutArray(leaf_of_row_);
  w.Put<uint64_t>(dead_nodes_);
}

bool Tree::Load(ByteReader& r, size_t num_rows) {
  Tree t(dim_, params_);
  int32_t dim = 0;
  uint64_t dead = 0;
  if (!r.Get(&dim) || dim != dim_ || !r.GetArray(&t.center_) || !r.GetArray(&t.radius_) ||
      !r.GetArray(&t.spread_) || !r.GetArray(&t.count_) || !r.GetArray(&t.first_child_) ||
      !r.GetArray(&t.num_children_) || !r.GetArray(&t.parent_) ||
      !r.GetArray(&t.member_begin_) || !r.GetArray(&t.member_count_) ||
      !r.GetArray(&t.member_cap_) || !r.GetArray(&t.members_) || !r.GetArray(&t.leaf_of_row_) ||
      !r.Get(&dead)) {
    return false;
  }
  const size_t n = t.radius_.size();
  for (const size_t size : {t.spread_.size(), t.count_.size(), t.first_child_.size(),
                            t.num_children_.size(), t.parent_.size(), t.member_begin_.size(),
                            t.member_count_.size(), t.member_cap_.size()}) {
    if (size != n) return false;
  }
  if (t.center_.size() != n * dim_) return false;
  for (size_t f = 0; f < n; ++f) {
    if (t.parent_[f] != kNone && (t.parent_[f] < 0 || size_t(t.parent_[f]) >= n)) return false;
    if (t.num_children_[f] < 0 ||
        (t.num_children_[f] > 0 &&
         (t.first_child_[f] <= static_cast<int32_t>(f) ||
          size_t(t.first_child_[f]) + t.num_children_[f] > n))) {
      return false;
    }
    if (uint64_t{t.member_begin_[f]} + t.member_cap_[f] > t.members_.size() ||
        t.member_count_[f] > t.member_cap_[f]) {
      return false;
    }
  }
  for (uint32_t row : t.members_) {
    if (row >= num_rows) return false;
  }
  if (t.leaf_of_row_.size() > num_rows) return false;
  for (int32_t leaf : t.leaf_of_row_) {
    if (leaf != kNone && (leaf < 0 || size_t(leaf) >= n || t.num_children_[leaf] != 0)) {
      return false;
    }
  }
  t.dead_nodes_ = dead;
  t.RefreshLeaves();
  *this = std::move(t);
  ++structure_version_;
  return true;
}

double Tree::LeafRadiusSum() const {
  double sum = 0;
  for (int32_t leaf : leaves_) sum += radius_[leaf];
  return sum;
}

void Tree::RefreshLeaves() {
  leaves_.clear();
  if (radius_.empty()) return;
  std::vector<int32_t> stack = {0};
  while (!stack.empty()) {
    const int32_t f = stack.back();
    stack.pop_back();
    if (count_[f] == 0) continue;
    if (is_leaf(f)) {
      leaves_.push_back(f);
      continue;
    }
    for (int32_t c = first_child_[f] + num_children_[f] - 1; c >= first_child_[f]; --c) {
      stack.push_back(c);
    }
  }
}

absl::Status Tree::CheckInvariants(const PointSource& points) const {
  if (radius_.empty()) return absl::OkStatus();
  std::vector<float> x(dim_);
  std::vector<uint8_t> seen(leaf_of_row_.size(), 0);
  std::vector<int32_t> stack = {0};
  while (!stack.empty()) {
    const int32_t f = stack.back();
    stack.pop_back();
    std::vector<uint32_t> rows;
    CollectRows(f, &rows);
    if (rows.size() != count_[f]) {
      return absl::InternalError(absl::StrCat("node ", f, ": count ", count_[f],
                                              " but ", rows.size(), " targets below"));
    }
    for (uint32_t r : rows) {
      points.Get(r, x.data());
      const float d = std::sqrt(SquaredDistance(x.data(), center(f), dim_));
      if (d > radius_[f]) {
        return absl::InternalError(absl::StrCat("node ", f, ": row ", r, " at distance ",
                                                d, " outside radius ", radius_[f]));
      }
    }
    if (is_leaf(f)) {
      for (uint32_t r : members(f)) {
        if (r >= leaf_of_row_.size() || leaf_of_row_[r] != f) {
          return absl::InternalError(absl::StrCat("row ", r, " in leaf ", f,
                                                  " but leaf_of says otherwise"));
        }
        if (seen[r]++) {
          return absl::InternalError(absl::StrCat("row ", r, " is in two leaves"));
        }
      }
      continue;
    }
    for (int32_t c = first_child_[f]; c < first_child_[f] + num_children_[f]; ++c) {
      if (parent_[c] != f) {
        return absl::InternalError(absl::StrCat("node ", c, ": parent ", parent_[c],
                                                ", expected ", f));
      }
      stack.push_back(c);
    }
  }
  size_t live = 0;
  for (size_t r = 0; r < leaf_of_row_.size(); ++r) {
    if (leaf_of_row_[r] != kNone && !seen[r]) {
      return absl::InternalError(absl::StrCat("row ", r, " maps to leaf ", leaf_of_row_[r],
                                              " but is not in it"));
    }
    live += seen[r];
  }
  if (live != count_[0]) {
    return absl::InternalError(absl::StrCat("root count ", count_[0], " but ", live,
                                            " rows in leaves"));
  }
  return absl::OkStatus();
}

TreeSummary Tree::Stats(const PointSource& points) const {
  TreeSummary s;
  s.num_dead_nodes = dead_nodes_;
  s.leaf_size_histogram.assign(9, 0);
  s.min_leaf = std::numeric_limits<size_t>::max();
  if (radius_.empty()) {
    s.min_leaf = 0;
    return s;
  }
  const std::vector<float> loose = Looseness(points);
  std::vector<std::pair<int32_t, int>> stack = {{0, 1}};
  size_t total = 0;
  while (!stack.empty()) {
    auto [f, depth] = stack.back();
    stack.pop_back();
    ++s.num_nodes;
    s.depth = std::max(s.depth, depth);
    s.looseness = std::max(s.looseness, double{loose[f]});
    if (is_leaf(f)) {
      ++s.num_leaves;
      const size_t n = member_count_[f];
      s.min_leaf = std::min(s.min_leaf, n);
      s.max_leaf = std::max(s.max_leaf, n);
      total += n;
      const size_t bucket = std::min<size_t>(8, n * 4 / params_.leaf_size);
      ++s.leaf_size_histogram[bucket];
      continue;
    }
    for (int32_t c = first_child_[f]; c < first_child_[f] + num_children_[f]; ++c) {
      stack.push_back({c, depth + 1});
    }
  }
  s.mean_leaf = s.num_leaves ? double(total) / s.num_leaves : 0;
  return s;
}

size_t Tree::MemoryBytes() const {
  return center_.capacity() * 4 + radius_.capacity() * 4 + spread_.capacity() * 4 +
         count_.capacity() * 4 + first_child_.capacity() * 4 +
         num_children_.capacity() * 4 + parent_.capacity() * 4 +
         member_begin_.capacity() * 12 + members_.capacity() * 4 +
         leaf_of_row_.capacity() * 4 + leaves_.capacity() * 4;
}

}  // namespace negmine
