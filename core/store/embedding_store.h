// EmbeddingStore: target ids (uint64) to float32 rows, with the model step at
// which each target was encoded.
//
// Memory layout: one contiguous row-major float32 block of capacity x dim
// (row r occupies data()[r * dim, (r + 1) * dim)), plus per-row arrays:
//
//   row:       0        1        2        3   ...
//   vectors: [x_0    ][x_1    ][(free) ][x_3    ]
//   ids:     [ 17    ][ 4     ][  -     ][ 99    ]
//   steps:   [ 0     ][ 0     ][  -     ][ 12    ]
//   live:    [ 1     ][ 1     ][  0     ][ 1     ]
//
// Deleted rows go on a free list and are reused by later inserts, so row
// numbers are stable for the life of a target but not across delete/insert.
// Indexes score rows directly and skip rows that are not live.
//
// Thread safety: none. The owning index serializes writers and excludes them
// from readers.
#ifndef NEGMINE_CORE_STORE_EMBEDDING_STORE_H_
#define NEGMINE_CORE_STORE_EMBEDDING_STORE_H_

#include <cstdint>
#include <optional>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/types/span.h"
#include "core/persist/bytes.h"

namespace negmine {

class EmbeddingStore {
 public:
  explicit EmbeddingStore(int dim) : dim_(dim) {}

  int dim() const { return dim_; }
  size_t size() const { return id_to_row_.size(); }
  // Rows allocated (live or free); row numbers are < num_rows().
  size_t num_rows() const { return ids_.size(); }

  void Reserve(size_t rows);

  // Inserts or overwrites each id with its row of `vectors`. The caller has
  // validated the input (sizes, no duplicate ids); this cannot fail.
  void Upsert(absl::Span<const uint64_t> ids, absl::Span<const float> vectors,
              int64_t model_step);

  // Frees the row of `id`; returns false if the id is unknown.
  bool Delete(uint64_t id);

  // The row of `id`, if stored.
  std::optional<size_t> Row(uint64_t id) const;

  bool live(size_t row) const { return live_[row] != 0; }
  // One flag per row (num_rows()), 1 for live; and the id per row (stale
  // for free rows).
  const uint8_t* live_flags() const { return live_.data(); }
  const uint64_t* row_ids() const { return ids_.data(); }
  uint64_t id(size_t row) const { return ids_[row]; }
  int64_t model_step(size_t row) const { return steps_[row]; }
  const float* vector(size_t row) const { return data_.data() + row * dim_; }
  // All rows, num_rows() x dim, row-major. Free rows hold stale values.
  const float* data() const { return data_.data(); }

  size_t MemoryBytes() const;

  // Every row (live or free), in a form Load takes back.
  void Save(ByteWriter& w) const;
  // Replaces the content with what Save wrote; false if it does not parse or
  // is inconsistent (then the store is unchanged).
  bool Load(ByteReader& r);

 private:
  size_t AllocateRow();

  int dim_;
  std::vector<float> data_;
  std::vector<uint64_t> ids_;
  std::vector<int64_t> steps_;
  std::vector<uint8_t> live_;
  std::vector<size_t> free_rows_;
  absl::flat_hash_map<uint64_t, size_t> id_to_row_;
};

}  // namespace negmine

#endif  // NEGMINE_CORE_STORE_EMBEDDING_STORE_H_
