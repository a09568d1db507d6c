#include "core/store_index.h"

#include <cmath>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "core/status.h"

namespace negmine {

StoreIndex::StoreIndex(const IndexOptions& options)
    : options_(options), store_(options.dim) {
  store_.Reserve(options.initial_capacity);
}

IndexStats StoreIndex::Stats() const {
  absl::ReaderMutexLock lock(&mu_);
  return {.num_targets = store_.size(),
          .capacity_rows = store_.num_rows(),
          .memory_bytes = store_.MemoryBytes() +
                          inv_norms_.capacity() * sizeof(float) +
                          ExtraMemoryLocked(),
          .version = version_};
}

PointSource StoreIndex::Points() const {
  return {.data = store_.data(),
          .scale = inv_norms_.empty() ? nullptr : inv_norms_.data(),
          .dim = options_.dim};
}

absl::Status StoreIndex::Upsert(absl::Span<const uint64_t> ids,
                                absl::Span<const float> vectors,
                                int64_t model_step) {
  const int dim = options_.dim;
  if (vectors.size() != ids.size() * dim) {
    return absl::InvalidArgumentError(
        absl::StrCat("vectors hold ", vectors.size(), " floats; ", ids.size(),
                     " ids x dim ", dim, " needs ", ids.size() * dim));
  }
  {
    absl::flat_hash_set<uint64_t> seen;
    seen.reserve(ids.size());
    for (size_t i = 0; i < ids.size(); ++i) {
      if (!seen.insert(ids[i]).second) {
        return absl::InvalidArgumentError(
            absl::StrCat("ids: duplicate id ", ids[i], " at position ", i));
      }
    }
  }
  RETURN_IF_ERROR(CheckFinite(vectors, dim, "vectors"));
  std::vector<float> inv(options_.metric == Metric::kCosine ? ids.size() : 0);
  for (size_t i = 0; i < inv.size(); ++i) {
    double sq = 0;
    for (int j = 0; j < dim; ++j) sq += double{vectors[i * dim + j]} * vectors[i * dim + j];
    inv[i] = static_cast<float>(1.0 / std::sqrt(sq));
    if (!std::isfinite(inv[i])) {
      return absl::InvalidArgumentError(
          absl::StrCat("vectors: row ", i, " (id ", ids[i],
                       ") has zero norm, which a cosine collection cannot "
                       "score"));
    }
  }

  absl::WriterMutexLock lock(&mu_);
  std::vector<uint32_t> updated;
  for (uint64_t id : ids) {
    if (std::optional<size_t> row = store_.Row(id)) updated.push_back(*row);
  }
  store_.Upsert(ids, vectors, model_step);
  if (!inv.empty()) {
    inv_norms_.resize(store_.num_rows());
    for (size_t i = 0; i < ids.size(); ++i) {
      inv_norms_[*store_.Row(ids[i])] = inv[i];
    }
  }
  std::vector<uint32_t> inserted;
  if (updated.size() < ids.size()) {
    absl::flat_hash_set<uint32_t> old(updated.begin(), updated.end());
    for (uint64_t id : ids) {
      const uint32_t row = static_cast<uint32_t>(*store_.Row(id));
      if (!old.contains(row)) inserted.push_back(row);
    }
  }
  OnUpsertLocked(inserted, updated);
  ++version_;
  return absl::OkStatus();
}

absl::StatusOr<size_t> StoreIndex::Delete(absl::Span<const uint64_t> ids,
                                          bool allow_missing) {
  absl::WriterMutexLock lock(&mu_);
  if (!allow_missing) {
    for (uint64_t id : ids) {
      if (!store_.Row(id)) {
        return absl::NotFoundError(absl::StrCat("ids: unknown id ", id));
      }
    }
  }
  std::vector<uint32_t> rows;
  for (uint64_t id : ids) {
    std::optional<size_t> row = store_.Row(id);
    if (row && store_.Delete(id)) rows.push_back(static_cast<uint32_t>(*row));
  }
  if (!rows.empty()) {
    OnDeleteLocked(rows);
    ++version_;
  }
  return rows.size();
}

absl::Status StoreIndex::Get(absl::Span<const uint64_t> ids,
                             std::vector<float>* vectors,
                             std::vector<int64_t>* steps) const {
  const int dim = options_.dim;
  absl::ReaderMutexLock lock(&mu_);
  vectors->resize(ids.size() * dim);
  steps->resize(ids.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    std::optional<size_t> row = store_.Row(ids[i]);
    if (!row) return absl::NotFoundError(absl::StrCat("ids: unknown id ", ids[i]));
    std::copy_n(store_.vector(*row), dim, vectors->data() + i * dim);
    (*steps)[i] = store_.model_step(*row);
  }
  return absl::OkStatus();
}

absl::StatusOr<SearchResult> StoreIndex::Search(
    absl::Span<const float> queries,
    absl::Span<const std::vector<uint64_t>> exclude,
    const SearchParams& params) const {
  const int dim = options_.dim;
  if (queries.empty() || queries.size() % dim != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("queries hold ", queries.size(),
                     " floats, not a positive multiple of dim ", dim));
  }
  const size_t n = queries.size() / dim;
  if (!exclude.empty() && exclude.size() != n) {
    return absl::InvalidArgumentError(
        absl::StrCat("exclude has ", exclude.size(), " lists for ", n,
                     " queries; send none or one per query"));
  }
  RETURN_IF_ERROR(CheckFinite(queries, dim, "queries"));
  absl::ReaderMutexLock lock(&mu_);
  RETURN_IF_ERROR(ValidateSearchParams(params, store_.size()));
  return SearchLocked(queries, n, exclude, params);
}

}  // namespace negmine
