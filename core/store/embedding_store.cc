#include "core/store/embedding_store.h"

#include <algorithm>

namespace negmine {

void EmbeddingStore::Reserve(size_t rows) {
  data_.reserve(rows * dim_);
  ids_.reserve(rows);
  steps_.reserve(rows);
  live_.reserve(rows);
  id_to_row_.reserve(rows);
}

size_t EmbeddingStore::AllocateRow() {
  if (!free_rows_.empty()) {
    size_t row = free_rows_.back();
    free_rows_.pop_back();
    return row;
  }
  size_t row = ids_.size();
  data_.resize(data_.size() + dim_);
  ids_.push_back(0);
  steps_.push_back(0);
  live_.push_back(0);
  return row;
}

void EmbeddingStore::Upsert(absl::Span<const uint64_t> ids,
                            absl::Span<const float> vectors,
                            int64_t model_step) {
  for (size_t i = 0; i < ids.size(); ++i) {
    auto [it, inserted] = id_to_row_.try_emplace(ids[i], 0);
    if (inserted) it->second = AllocateRow();
    const size_t row = it->second;
    std::copy_n(vectors.data() + i * dim_, dim_, data_.data() + row * dim_);
    ids_[row] = ids[i];
    steps_[row] = model_step;
    live_[row] = 1;
  }
}

bool EmbeddingStore::Delete(uint64_t id) {
  auto it = id_to_row_.find(id);
  if (it == id_to_row_.end()) return false;
  live_[it->second] = 0;
  free_rows_.push_back(it->second);
  id_to_row_.erase(it);
  return true;
}

std::optional<size_t> EmbeddingStore::Row(uint64_t id) const {
  auto it = id_to_row_.find(id);
  if (it == id_to_row_.end()) return std::nullopt;
  return it->second;
}

size_t EmbeddingStore::MemoryBytes() const {
  return data_.capacity() * sizeof(float) +
         ids_.capacity() * sizeof(uint64_t) +
         steps_.capacity() * sizeof(int64_t) + live_.capacity() +
         free_rows_.capacity() * sizeof(size_t) +
         id_to_row_.capacity() * (sizeof(uint64_t) + sizeof(size_t) + 1);
}

void EmbeddingStore::Save(ByteWriter& w) const {
  w.Put<int32_t>(dim_);
  w.PutArray(data_);
  w.PutArray(ids_);
  w.PutArray(steps_);
  w.PutArray(live_);
  w.PutArray(free_rows_);
}

bool EmbeddingStore::Load(ByteReader& r) {
  int32_t dim = 0;
  std::vector<float> data;
  std::vector<uint64_t> ids;
  std::vector<int64_t> steps;
  std::vector<uint8_t> live;
  std::vector<size_t> free_rows;
  if (!r.Get(&dim) || dim != dim_ || !r.GetArray(&data) || !r.GetArray(&ids) ||
      !r.GetArray(&steps) || !r.GetArray(&live) || !r.GetArray(&free_rows)) {
    return false;
  }
  const size_t rows = ids.size();
  if (data.size() != rows * dim_ || steps.size() != rows || live.size() != rows) return false;
  absl::flat_hash_map<uint64_t, size_t> id_to_row;
  for (size_t row = 0; row < rows; ++row) {
    if (live[row] > 1) return false;
    if (live[row] && !id_to_row.emplace(ids[row], row).second) return false;
  }
  for (size_t row : free_rows) {
    if (row >= rows || live[row]) return false;
  }
  data_ = std::move(data);
  ids_ = std::move(ids);
  steps_ = std::move(steps);
  live_ = std::move(live);
  free_rows_ = std::move(free_rows);
  id_to_row_ = std::move(id_to_row);
  return true;
}

}  // namespace negmine
