#include "core/batches/gcbs.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <numeric>
#include <thread>

#include <Eigen/Core>

#include "absl/strings/str_cat.h"
#include "core/index.h"
#include "core/linalg.h"
#include "core/random.h"
#include "core/status.h"

namespace negmine {
namespace {

using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using Adjacency = std::vector<std::vector<uint32_t>>;

constexpr size_t kQuantileSamples = 1000000;
constexpr size_t kSearchChunk = 4096;

absl::Status Validate(absl::Span<const float> queries, absl::Span<const float> positives,
                      int dim, const BatchOptions& o) {
  if (dim <= 0) return absl::InvalidArgumentError(absl::StrCat("dim = ", dim, " must be >= 1"));
  if (queries.empty() || queries.size() % dim != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "queries hold ", queries.size(), " floats, not a positive multiple of dim ", dim));
  }
  if (positives.size() != queries.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("positives hold ", positives.size(), " floats; the ",
                     queries.size() / dim, " queries need as many (", queries.size(), ")"));
  }
  if (o.batch_size < 1) {
    return absl::InvalidArgumentError(absl::StrCat("batch_size = ", o.batch_size, " must be >= 1"));
  }
  if (o.neighbors < 1) {
    return absl::InvalidArgumentError(absl::StrCat("neighbors = ", o.neighbors, " must be >= 1"));
  }
  if (!(o.quantile >= 0 && o.quantile < 1)) {
    return absl::InvalidArgumentError(absl::StrCat("quantile = ", o.quantile, " must be in [0, 1)"));
  }
  if (o.beam_width < 1) {
    return absl::InvalidArgumentError(absl::StrCat("beam_width = ", o.beam_width, " must be >= 1"));
  }
  RETURN_IF_ERROR(CheckFinite(queries, dim, "queries"));
  RETURN_IF_ERROR(CheckFinite(positives, dim, "positives"));
  const size_t n = queries.size() / dim;
  for (const auto& [x, what] : {std::pair{queries, "queries"}, std::pair{positives, "positives"}}) {
    for (size_t i = 0; i < n; ++i) {
      bool zero = true;
      for (int j = 0; j < dim && zero; ++j) zero = x[i * dim + j] == 0;
      if (zero) {
        return absl::InvalidArgumentError(
            absl::StrCat(what, ": row ", i, " is zero; examples are compared by cosine"));
      }
    }
  }
  return absl::OkStatus();
}

std::vector<float> Normalized(absl::Span<const float> x, int dim) {
  std::vector<float> out(x.begin(), x.end());
  NormalizeRows(out.data(), out.size() / dim, dim);
  return out;
}

absl::Status Report(const BatchOptions& o, double fraction) {
  if (o.progress && !o.progress(fraction)) {
    return absl::CancelledError("batch assignment cancelled");
  }
  return absl::OkStatus();
}

// Symmetrized, sorted, deduplicated adjacency from directed edges.
Adjacency Symmetrize(size_t n, const std::vector<std::pair<uint32_t, uint32_t>>& edges) {
  Adjacency adj(n);
  for (auto [i, j] : edges) {
    adj[i].push_back(j);
    adj[j].push_back(i);
  }
  for (auto& list : adj) {
    std::sort(list.begin(), list.end());
    list.erase(std::unique(list.begin(), list.end()), list.end());
  }
  return adj;
}

// Steps 3 and 4 and the objectives, shared by both methods.
BatchAssignment OrderAndCut(const Adjacency& adj, const std::vector<float>& x,
                            const std::vector<float>& y, int dim, const BatchOptions& o) {
  const size_t n = adj.size();
  BatchAssignment out;
  for (const auto& list : adj) out.edges += list.size();
  out.edges /= 2;
  const std::vector<uint32_t> order = ReverseCuthillMcKee(adj, o.seed, &out.components);
  std::vector<uint32_t> identity(n);
  std::iota(identity.begin(), identity.end(), 0);
  out.bandwidth_before = Bandwidth(adj, identity);
  out.bandwidth_after = Bandwidth(adj, order);
  auto cut = [&](const std::vector<uint32_t>& ord) {
    std::vector<std::vector<uint32_t>> batches;
    for (size_t b = 0; b < n; b += o.batch_size) {
      batches.emplace_back(ord.begin() + b, ord.begin() + std::min(n, b + o.batch_size));
    }
    return batches;
  };
  out.in_batch_similarity_before = InBatchSimilarity(cut(identity), x.data(), y.data(), dim);
  out.batches = cut(order);
  out.in_batch_similarity_after = InBatchSimilarity(out.batches, x.data(), y.data(), dim);
  if (o.shuffle_batches) {
    Rng rng(o.seed, /*stream=*/0x62617463);
    for (size_t i = out.batches.size(); i > 1; --i) {
      std::swap(out.batches[i - 1], out.batches[rng.Below(i)]);
    }
  }
  return out;
}

}  // namespace

std::vector<uint32_t> ReverseCuthillMcKee(const Adjacency& adj, uint64_t seed,
                                          size_t* components) {
  const size_t n = adj.size();
  std::vector<uint64_t> key(n);
  for (size_t i = 0; i < n; ++i) key[i] = Mix64(seed ^ Mix64(i));
  auto before = [&](uint32_t a, uint32_t b) {
    return adj[a].size() != adj[b].size() ? adj[a].size() < adj[b].size() : key[a] < key[b];
  };
  std::vector<int32_t> level(n, -1);
  // Breadth-first from s over unvisited nodes: the nodes in visiting order
  // (neighbours by increasing degree), with their levels in `level`.
  std::vector<uint32_t> scratch;
  auto bfs = [&](uint32_t s, std::vector<uint32_t>* out) {
    out->clear();
    out->push_back(s);
    level[s] = 0;
    for (size_t head = 0; head < out->size(); ++head) {
      const uint32_t u = (*out)[head];
      scratch.clear();
      for (uint32_t v : adj[u]) {
        if (level[v] < 0) {
          level[v] = level[u] + 1;
          scratch.push_back(v);
        }
      }
      std::sort(scratch.begin(), scratch.end(), before);
      out->insert(out->end(), scratch.begin(), scratch.end());
    }
  };
  std::vector<uint32_t> starts, isolated;
  for (uint32_t i = 0; i < n; ++i) (adj[i].empty() ? isolated : starts).push_back(i);
  std::sort(starts.begin(), starts.end(), before);
  std::sort(isolated.begin(), isolated.end(), [&](uint32_t a, uint32_t b) { return key[a] < key[b]; });

  std::vector<uint8_t> done(n, 0);
  std::vector<uint32_t> order, component;
  order.reserve(n);
  *components = 0;
  for (uint32_t s : starts) {
    if (done[s]) continue;
    // George-Liu: move to a minimum-degree node of the last level while the
    // eccentricity grows (a pseudo-peripheral node); at most a few rounds.
    bfs(s, &component);
    for (int round = 0; round < 8; ++round) {
      const int32_t depth = level[component.back()];
      uint32_t best = component.back();
      for (uint32_t v : component) {
        if (level[v] == depth && before(v, best)) best = v;
      }
      for (uint32_t v : component) level[v] = -1;
      bfs(best, &component);
      if (level[component.back()] <= depth) break;
      s = best;
    }
    for (uint32_t v : component) done[v] = 1;  // levels stay set: not revisited
    ++*components;
    order.insert(order.end(), component.begin(), component.end());
  }
  std::reverse(order.begin(), order.end());
  order.insert(order.end(), isolated.begin(), isolated.end());
  *components += isolated.size();
  return order;
}

int64_t Bandwidth(const Adjacency& adj, const std::vector<uint32_t>& order) {
  std::vector<int64_t> pos(order.size());
  for (size_t p = 0; p < order.size(); ++p) pos[order[p]] = static_cast<int64_t>(p);
  int64_t bw = 0;
  for (size_t i = 0; i < adj.size(); ++i) {
    for (uint32_t j : adj[i]) bw = std::max(bw, std::abs(pos[i] - pos[j]));
  }
  return bw;
}

double InBatchSimilarity(const std::vector<std::vector<uint32_t>>& batches,
                         const float* x, const float* y, int dim) {
  double total = 0;
  RowMatrix xb, yb;
  for (const auto& batch : batches) {
    xb.resize(batch.size(), dim);
    yb.resize(batch.size(), dim);
    for (size_t i = 0; i < batch.size(); ++i) {
      std::copy_n(x + size_t{batch[i]} * dim, dim, xb.row(i).data());
      std::copy_n(y + size_t{batch[i]} * dim, dim, yb.row(i).data());
    }
    const RowMatrix s = xb * yb.transpose();
    total += s.sum() - s.trace();
  }
  return total;
}

absl::StatusOr<BatchAssignment> AssignBatches(absl::Span<const float> queries,
                                              absl::Span<const float> positives,
                                              int dim, const BatchOptions& o) {
  RETURN_IF_ERROR(Validate(queries, positives, dim, o));
  const size_t n = queries.size() / dim;
  const std::vector<float> x = Normalized(queries, dim), y = Normalized(positives, dim);
  RETURN_IF_ERROR(Report(o, 0.0));

  // 1. The kNN graph from a tree over the positives.
  std::vector<std::pair<uint32_t, uint32_t>> edges;
  std::vector<float> edge_scores;
  const int k = static_cast<int>(std::min<size_t>(o.neighbors, n - 1));
  if (k > 0) {
    IndexOptions io{.dim = dim, .metric = Metric::kInnerProduct, .backend = Backend::kCpu,
                    .kind = IndexKind::kTree, .initial_capacity = n};
    io.tree.background_rebuild = false;
    ASSIGN_OR_RETURN(std::unique_ptr<Index> index, CreateIndex(io));
    std::vector<uint64_t> ids(n);
    std::iota(ids.begin(), ids.end(), 0);
    RETURN_IF_ERROR(index->Upsert(ids, y, 0));
    RETURN_IF_ERROR(Report(o, 0.1));
    const size_t chunks = (n + kSearchChunk - 1) / kSearchChunk;
    std::vector<std::vector<std::pair<uint32_t, uint32_t>>> chunk_edges(chunks);
    std::vector<std::vector<float>> chunk_scores(chunks);
    std::vector<absl::Status> chunk_status(chunks);
    std::atomic<size_t> next{0}, finished{0};
    std::atomic<bool> cancelled{false};
    auto worker = [&](bool reporter) {
      for (size_t c; !cancelled && (c = next.fetch_add(1)) < chunks;) {
        const size_t begin = c * kSearchChunk, end = std::min(n, begin + kSearchChunk);
        std::vector<std::vector<uint64_t>> exclude(end - begin);
        for (size_t i = begin; i < end; ++i) exclude[i - begin] = {i};
        absl::StatusOr<SearchResult> r = index->Search(
            absl::MakeConstSpan(x).subspan(begin * dim, (end - begin) * dim), exclude,
            {.k = k, .approximate = true, .beam_width = o.beam_width});
        if (!r.ok()) {
          chunk_status[c] = r.status();
          continue;
        }
        for (size_t i = begin; i < end; ++i) {
          const QueryResult& q = r->queries[i - begin];
          for (size_t j = 0; j < q.ids.size(); ++j) {
            chunk_edges[c].emplace_back(static_cast<uint32_t>(i), static_cast<uint32_t>(q.ids[j]));
            chunk_scores[c].push_back(q.scores[j]);
          }
        }
        const size_t f = finished.fetch_add(1) + 1;
        if (reporter && !Report(o, 0.1 + 0.7 * double(f) / chunks).ok()) cancelled = true;
      }
    };
    std::vector<std::thread> pool;
    for (int t = 1; t < o.threads; ++t) pool.emplace_back(worker, false);
    worker(true);
    for (auto& t : pool) t.join();
    if (cancelled) return absl::CancelledError("batch assignment cancelled");
    for (size_t c = 0; c < chunks; ++c) {
      RETURN_IF_ERROR(chunk_status[c]);
      edges.insert(edges.end(), chunk_edges[c].begin(), chunk_edges[c].end());
      edge_scores.insert(edge_scores.end(), chunk_scores[c].begin(), chunk_scores[c].end());
    }
  }
  if (o.quantile > 0 && n > 1) {
    // The quantile of all off-diagonal similarities, from sampled pairs.
    Rng rng(o.seed, /*stream=*/0x7175616e);
    const size_t samples = std::min(kQuantileSamples, n * (n - 1));
    std::vector<float> s(samples);
    for (size_t t = 0; t < samples; ++t) {
      const size_t i = rng.Below(n);
      size_t j = rng.Below(n - 1);
      if (j >= i) ++j;
      s[t] = Eigen::Map<const Eigen::VectorXf>(x.data() + i * dim, dim)
                 .dot(Eigen::Map<const Eigen::VectorXf>(y.data() + j * dim, dim));
    }
    const size_t q = std::min(samples - 1, static_cast<size_t>(o.quantile * samples));
    std::nth_element(s.begin(), s.begin() + q, s.end());
    const float threshold = s[q];
    size_t kept = 0;
    for (size_t e = 0; e < edges.size(); ++e) {
      if (edge_scores[e] > threshold) edges[kept++] = edges[e];
    }
    edges.resize(kept);
  }
  RETURN_IF_ERROR(Report(o, 0.85));
  // 2-4.
  BatchAssignment out = OrderAndCut(Symmetrize(n, edges), x, y, dim, o);
  RETURN_IF_ERROR(Report(o, 1.0));
  return out;
}

absl::StatusOr<BatchAssignment> AssignBatchesDense(absl::Span<const float> queries,
                                                   absl::Span<const float> positives,
                                                   int dim, const BatchOptions& o) {
  RETURN_IF_ERROR(Validate(queries, positives, dim, o));
  const size_t n = queries.size() / dim;
  const std::vector<float> x = Normalized(queries, dim), y = Normalized(positives, dim);
  Eigen::Map<const RowMatrix> xs(x.data(), n, dim), ys(y.data(), n, dim);
  const RowMatrix s = xs * ys.transpose();
  std::vector<std::pair<uint32_t, uint32_t>> edges;
  if (n > 1) {
    if (o.quantile > 0) {
      std::vector<float> off;
      off.reserve(n * (n - 1));
      for (size_t i = 0; i < n; ++i) {
        for (size_t j = 0; j < n; ++j) {
          if (i != j) off.push_back(s(i, j));
        }
      }
      const size_t q = std::min(off.size() - 1, static_cast<size_t>(o.quantile * off.size()));
      std::nth_element(off.begin(), off.begin() + q, off.end());
      const float threshold = off[q];
      for (size_t i = 0; i < n; ++i) {
        for (size_t j = 0; j < n; ++j) {
          if (i != j && s(i, j) > threshold) edges.emplace_back(i, j);
        }
      }
    } else {
      // The exact k nearest per example.
      const size_t k = std::min<size_t>(o.neighbors, n - 1);
      std::vector<uint32_t> idx;
      for (size_t i = 0; i < n; ++i) {
        idx.resize(n);
        std::iota(idx.begin(), idx.end(), 0);
        idx.erase(idx.begin() + i);
        std::partial_sort(idx.begin(), idx.begin() + k, idx.end(),
                          [&](uint32_t a, uint32_t b) { return s(i, a) > s(i, b); });
        for (size_t t = 0; t < k; ++t) edges.emplace_back(i, idx[t]);
      }
    }
  }
  return OrderAndCut(Symmetrize(n, edges), x, y, dim, o);
}

}  // namespace negmine
